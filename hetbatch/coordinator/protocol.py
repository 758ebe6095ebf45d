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
from collections.abc import Callable
from typing import Any

from hetbatch.coordinator.messages import request
from hetbatch.io.paths import OutputPaths

MAX_MESSAGE_BYTES = 4 << 20
_HEADER = struct.Struct(">I")
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class ProtocolError(Exception):
    """The peer sent something that is not a valid message, or went away."""


def encode_message(message: dict[str, Any]) -> bytes:
    """One frame: the length, then the JSON body."""
    body = _ENCODER.encode(message).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _HEADER.pack(len(body)) + body


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode_message(message))


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


class CoordinatorRestarted(Exception):
    """The coordinator came back as a new process: whatever was leased from the old one is void."""


class JobComplete(Exception):
    """The job is finished and its coordinator gone: there is nothing left to do."""


# Where the coordinator is now: (host, port, epoch); the epoch changes when it restarts.
Locator = Callable[[], tuple[str, int, str]]


def file_locator(url: str) -> Locator:
    """Find the coordinator through the `coordinator.json` it writes once listening.

    A resubmitted coordinator may listen elsewhere; reading the file again on every reconnect
    follows it. A finished job (its `_SUCCESS` beside `_hetbatch/`) ends the search.
    """
    output = OutputPaths.of(url, OutputPaths.COORDINATOR)
    fs, root = output.fs, output.root
    path, success = output.path(OutputPaths.COORDINATOR), output.path(OutputPaths.SUCCESS)

    def locate() -> tuple[str, int, str]:
        fs.invalidate_cache()
        if fs.exists(success):
            raise JobComplete(f"{root}: the job is complete")
        try:
            with fs.open(path, "r") as fh:
                info = json.load(fh)
            return str(info["host"]), int(info["port"]), str(info.get("epoch", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OSError(f"no coordinator address in {url} yet ({exc})") from None

    return locate


class Client:
    """A worker's connection: one request, one reply, reconnecting when the link drops.

    Thread-safe: the worker's engine loop and its shard writer share one client. With a
    `locate` callback the address is looked up again before every connection, and reaching a
    coordinator of another epoch raises CoordinatorRestarted on every call until the owner
    calls `acknowledge_restart`, so no thread keeps working on leases the new one never gave.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        retry_s: float = 30.0,
        locate: Locator | None = None,
    ) -> None:
        self.host, self.port, self.token, self.retry_s = host, port, token, retry_s
        self.locate = locate
        self.epoch: str | None = None
        self.restarted = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.on_reconnect: Any = None

    def acknowledge_restart(self) -> None:
        with self._lock:
            self.restarted = False

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request (checked first, as the coordinator will check it) and return the
        reply; raises MessageError for a request the coordinator would refuse."""
        request(op, **fields)
        with self._lock:
            if self.restarted:
                raise CoordinatorRestarted(f"coordinator restarted; {op} refused")
            deadline = time.monotonic() + self.retry_s
            delay = 0.2
            while True:
                try:
                    return self._roundtrip({"op": op, "token": self.token, **fields})
                except (OSError, ProtocolError) as exc:
                    self._close()
                    if time.monotonic() >= deadline:
                        raise CoordinatorUnavailable(
                            f"coordinator {self.host}:{self.port} unreachable: {exc}"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 1.5, 2.0)  # a long outage is polled gently

    def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any]:
        fresh = self._sock is None
        if fresh:
            self._connect()
        if fresh and self.on_reconnect is not None and message["op"] != "hello":
            send_message(self._sock, self.on_reconnect())
            recv_message(self._sock)
        send_message(self._sock, message)
        reply = recv_message(self._sock)
        if "error" in reply:
            raise RejectedByCoordinator(reply["error"])
        return reply

    def _connect(self) -> None:
        epoch = None
        if self.locate is not None:
            self.host, self.port, epoch = self.locate()
        self._sock = socket.create_connection((self.host, self.port), timeout=60)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if epoch is not None and epoch != self.epoch:
            known, self.epoch = self.epoch, epoch
            if known is not None:
                self.restarted = True
                raise CoordinatorRestarted(f"coordinator restarted at {self.host}:{self.port}")

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
