"""Wire format between workers and the coordinator: length-prefixed JSON over TCP.

Each message is a 4-byte big-endian length followed by a UTF-8 JSON object. Every request carries
the job's secret token; sizes are bounded so a stray client cannot make the coordinator allocate
without limit.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Any

MAX_MESSAGE_BYTES = 4 << 20
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid message, or went away."""


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> dict[str, Any]:
    (length,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if length > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {length} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(_recv_exactly(sock, length))
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


class CoordinatorUnavailable(Exception):
    """The coordinator could not be reached within the retry window."""


class Client:
    """A worker's connection: one request, one reply, reconnecting when the link drops.

    Thread-safe: the worker's engine loop and its shard writer share one client.
    """

    def __init__(self, host: str, port: int, token: str, retry_s: float = 30.0) -> None:
        self.host, self.port, self.token, self.retry_s = host, port, token, retry_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.on_reconnect: Any = None

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            deadline = time.monotonic() + self.retry_s
            while True:
                try:
                    return self._roundtrip({"op": op, "token": self.token, **fields})
                except (OSError, ProtocolError) as exc:
                    self._close()
                    if time.monotonic() >= deadline:
                        raise CoordinatorUnavailable(
                            f"coordinator {self.host}:{self.port} unreachable: {exc}"
                        ) from None
                    time.sleep(0.2)

    def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any]:
        fresh = self._sock is None
        if fresh:
            self._sock = socket.create_connection((self.host, self.port), timeout=60)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if fresh and self.on_reconnect is not None and message["op"] != "hello":
            send_message(self._sock, self.on_reconnect())
            recv_message(self._sock)
        send_message(self._sock, message)
        reply = recv_message(self._sock)
        if "error" in reply:
            raise RejectedByCoordinator(reply["error"])
        return reply

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


class RejectedByCoordinator(Exception):
    """The coordinator refused the request (bad token, unknown operation)."""
