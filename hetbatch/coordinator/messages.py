"""The messages workers, `hetbatch status` and the coordinator exchange, as checked types.

A request arrives as a JSON object with an `op`, the job's `token` and the fields of that
operation. `parse_request` turns it into one of the dataclasses below or raises MessageError
naming the field at fault: unknown operations, missing or extra fields, wrong types, numbers
outside what the job can mean (negative rows, ids beyond JSON's exact integers, NaN weights),
staging names that are not a plain file name. The server answers every such request with an
error reply; nothing malformed ever reaches the scheduler or the output folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

MAX_INT = 2**53  # the largest integer every JSON reader keeps exactly
MAX_TEXT = 256
MAX_ERROR_TEXT = 2000  # a row error quoted in a commit's stats
MAX_PROGRESS = 4096  # leases one heartbeat may report
MAX_CONCURRENCY = 1 << 20
MAX_CONTEXT = 1 << 40  # tokens of context an engine may say it holds
# A staged shard is a plain file name under the output's staging folder, or (on S3) the handle
# of an uncompleted multipart upload: `upload-` and URL-safe base64.
STAGING_NAME = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,250}\.(?:parquet|jsonl)|upload-[A-Za-z0-9_-]{1,16000}={0,2}"
)


class MessageError(ValueError):
    """A request that is not a well-formed message of its operation."""


def _int(value: Any, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int:
        raise MessageError(f"{name}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise MessageError(f"{name}: {value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, name: str, lo: float = 0.0, hi: float = float(MAX_INT)) -> float:
    if type(value) not in (int, float):
        raise MessageError(f"{name}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise MessageError(f"{name}: {value} is outside [{lo}, {hi}]")
    return float(value)


def _text(value: Any, name: str) -> str:
    if type(value) is not str:
        raise MessageError(f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise MessageError(f"{name}: longer than {MAX_TEXT} characters")
    return value


def _instance(value: Any, name: str = "instance") -> str:
    text = _text(value, name)
    if not text:
        raise MessageError(f"{name}: empty")
    return text


@dataclass(frozen=True)
class Request:
    """Base of every request; `OP` names it on the wire."""

    OP: ClassVar[str] = ""

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Request:
        return cls()

    def to_wire(self, token: str) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"op": self.OP, "token": token, **body}


@dataclass(frozen=True)
class JobRequest(Request):
    OP: ClassVar[str] = "job"


@dataclass(frozen=True)
class StatusRequest(Request):
    OP: ClassVar[str] = "status"


@dataclass(frozen=True)
class Hello(Request):
    OP: ClassVar[str] = "hello"
    instance: str
    weight: float = 1.0
    pool: str = ""
    concurrency: int | None = None
    context: int | None = None  # tokens its engine holds (max_model_len): prompt plus output

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Hello:
        concurrency = data.get("concurrency")
        context = data.get("context")
        weight = _float(data.get("weight", 1.0), "weight", lo=0.0, hi=1e12)
        if weight <= 0:
            raise MessageError("weight: must be positive")
        return cls(
            _instance(data.get("instance")),
            weight,
            _text(data.get("pool", ""), "pool"),
            None if concurrency is None else _int(concurrency, "concurrency", 1, MAX_CONCURRENCY),
            None if context is None else _int(context, "context", 1, MAX_CONTEXT),
        )


@dataclass(frozen=True)
class _InstanceRequest(Request):
    """A request that carries nothing but the instance it speaks for."""

    instance: str

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> _InstanceRequest:
        return cls(_instance(data.get("instance")))


@dataclass(frozen=True)
class LeaseRequest(_InstanceRequest):
    """Deal me rows."""

    OP: ClassVar[str] = "lease"


@dataclass(frozen=True)
class Bye(_InstanceRequest):
    """I am leaving: give back whatever I hold."""

    OP: ClassVar[str] = "bye"


@dataclass(frozen=True)
class Heartbeat(Request):
    """Still alive; per lease held, rows handed to the engine and rows finished."""

    OP: ClassVar[str] = "heartbeat"
    instance: str
    progress: dict[int, tuple[int, int]] = field(default_factory=dict)
    # The engine's own figures: requests running, requests waiting, KV-cache use (0 to 1).
    engine: tuple[int, int, float] | None = None

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Heartbeat:
        raw = data.get("progress", {})
        if type(raw) is not dict:
            raise MessageError("progress: expected an object of lease id -> [submitted, done]")
        if len(raw) > MAX_PROGRESS:
            raise MessageError(f"progress: more than {MAX_PROGRESS} leases")
        progress = {}
        for key, pair in raw.items():
            if type(key) is not str or not (key.isascii() and key.isdigit() and len(key) <= 16):
                raise MessageError(f"progress: lease id {str(key)[:20]!r} is not a number")
            if type(pair) is not list or len(pair) != 2:
                raise MessageError(f"progress[{key}]: expected [submitted, done]")
            lease_id = _int(int(key), "progress lease id")
            progress[lease_id] = (
                _int(pair[0], f"progress[{key}] submitted"),
                _int(pair[1], f"progress[{key}] done"),
            )
        return cls(_instance(data.get("instance")), progress, _engine_load(data.get("engine")))

    def to_wire(self, token: str) -> dict[str, Any]:
        progress = {str(k): list(v) for k, v in self.progress.items()}
        wire = {"op": self.OP, "token": token, "instance": self.instance, "progress": progress}
        if self.engine is not None:
            wire["engine"] = list(self.engine)
        return wire


def _engine_load(raw: Any) -> tuple[int, int, float] | None:
    if raw is None:
        return None
    if type(raw) is not list or len(raw) != 3:
        raise MessageError("engine: expected [running, waiting, kv_cache_usage]")
    return (
        _int(raw[0], "engine running"),
        _int(raw[1], "engine waiting"),
        _float(raw[2], "engine kv_cache_usage", hi=1.0),
    )


@dataclass(frozen=True)
class Release(Request):
    """Rows [cut, end) of a lease go back; `error` says why, when the worker could not write
    the unit's shard (the coordinator stops a job whose writes keep failing)."""

    OP: ClassVar[str] = "release"
    instance: str
    lease: int
    cut: int
    error: str | None = None

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Release:
        error = data.get("error")
        if error is not None and type(error) is not str:
            raise MessageError(f"error: expected a string, got {type(error).__name__}")
        return cls(
            _instance(data.get("instance")),
            _int(data.get("lease"), "lease"),
            _int(data.get("cut"), "cut"),
            None if error is None else error[:MAX_ERROR_TEXT],
        )


@dataclass(frozen=True)
class HandBack(Request):
    """The rows of a lease needing more context than `at` tokens are not for this instance
    (its engine's context, or the lease's limit): the coordinator deals them elsewhere."""

    OP: ClassVar[str] = "handback"
    instance: str
    lease: int
    at: int

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> HandBack:
        return cls(
            _instance(data.get("instance")),
            _int(data.get("lease"), "lease"),
            _int(data.get("at"), "at", 1, MAX_CONTEXT),
        )


@dataclass(frozen=True)
class CommitStats:
    """What a worker tells of a finished unit: its counts, its most common row error (for the
    job's error budget) and the null or repeated ids it saw (the id column is meant as a key)."""

    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    busy_s: float = 0.0
    top_error: str | None = None
    top_error_rows: int = 0
    null_ids: int = 0
    duplicate_ids: int = 0

    _COUNTS: ClassVar[tuple[str, ...]] = (
        "rows", "prompt_tokens", "completion_tokens", "errors", "top_error_rows", "null_ids",
        "duplicate_ids",
    )

    @classmethod
    def from_wire(cls, data: Any) -> CommitStats:
        if type(data) is not dict:
            raise MessageError("stats: expected an object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise MessageError(f"stats: unknown field {sorted(unknown)[0]!r}")
        top_error = data.get("top_error")
        if top_error is not None and type(top_error) is not str:
            kind = type(top_error).__name__
            raise MessageError(f"stats.top_error: expected a string, got {kind}")
        if top_error is not None:
            top_error = top_error[:MAX_ERROR_TEXT]  # an example for the user, not a key
        return cls(
            busy_s=_float(data.get("busy_s", 0.0), "stats.busy_s", hi=1e9),
            top_error=top_error,
            **{n: _int(data.get(n, 0), f"stats.{n}") for n in cls._COUNTS},
        )


@dataclass(frozen=True)
class Commit(Request):
    """Rows [start, end) of a lease are finished and staged as `staging` (a plain file name);
    with `above` or `top`, only its rows needing more than `above` and at most `top` tokens of
    context (a lease of long rows, or one that handed rows back)."""

    OP: ClassVar[str] = "commit"
    instance: str
    lease: int
    start: int
    end: int
    staging: str
    stats: CommitStats = CommitStats()
    above: int = 0
    top: int | None = None

    @property
    def band(self) -> tuple[int, int | None]:
        return self.above, self.top

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Commit:
        start, end = _int(data.get("start"), "start"), _int(data.get("end"), "end")
        if end <= start:
            raise MessageError(f"end: {end} is not after start {start}")
        staging = data.get("staging")
        if type(staging) is not str:
            raise MessageError(f"staging: expected a string, got {type(staging).__name__}")
        if not STAGING_NAME.fullmatch(staging) or ".." in staging:
            raise MessageError(
                f"staging: {staging[:40]!r} is neither a plain .parquet or .jsonl file name "
                "nor an upload"
            )
        return cls(
            _instance(data.get("instance")),
            _int(data.get("lease"), "lease"),
            start,
            end,
            staging,
            CommitStats.from_wire(data.get("stats", {})),
            _int(data.get("above", 0), "above", 0, MAX_CONTEXT),
            None if data.get("top") is None else _int(data["top"], "top", 1, MAX_CONTEXT),
        )

    def to_wire(self, token: str) -> dict[str, Any]:
        wire = super().to_wire(token)
        wire["stats"] = dict(self.stats.__dict__)
        for name, default in (("above", 0), ("top", None)):
            if wire[name] == default:
                del wire[name]
        return wire


REQUESTS: dict[str, type[Request]] = {
    cls.OP: cls
    for cls in (
        JobRequest, StatusRequest, Hello, LeaseRequest, Bye, Heartbeat, Release, HandBack, Commit
    )
}
_ENVELOPE = {"op", "token"}


def parse_request(data: Any) -> Request:
    """The typed request in a decoded JSON value, or MessageError saying what is wrong."""
    if type(data) is not dict:
        raise MessageError("a request must be a JSON object")
    op = data.get("op")
    cls = REQUESTS.get(op) if type(op) is str else None
    if cls is None:
        raise MessageError(f"unknown operation {str(op)[:40]!r}")
    allowed = {f.name for f in fields(cls)} | _ENVELOPE
    unknown = set(data) - allowed
    if unknown:
        raise MessageError(f"{op}: unknown field {sorted(map(str, unknown))[0][:40]!r}")
    try:
        return cls.from_fields(data)
    except MessageError as exc:
        raise MessageError(f"{op}: {exc}") from None


def request(op: str, **data: Any) -> Request:
    """Build a request from keyword fields, checked exactly as the coordinator checks it."""
    return parse_request({"op": op, **data})


# -- replies ----------------------------------------------------------------------------------


def error_reply(text: str) -> dict[str, Any]:
    return {"error": text}


def lease_reply(
    lease_id: int,
    start: int,
    end: int,
    above: int = 0,
    below: int | None = None,
    limit: int | None = None,
    final: bool = False,
    largest: int | None = None,
) -> dict[str, Any]:
    """A unit of rows [start, end). Rows dealt by the context they need: `above`/`below`, only
    its rows needing more than `above` and at most `below` tokens; `limit`, rows needing more
    are to be handed back; `final`, rows the worker's engine cannot hold are row errors (no
    live engine holds them); `largest`, the largest context of the job's engines (an engine
    that large keeps every row: none is held by another)."""
    lease: dict[str, Any] = {"id": lease_id, "start": start, "end": end}
    for name, value, default in (
        ("above", above, 0), ("below", below, None), ("limit", limit, None),
        ("final", final, False), ("largest", largest, None),
    ):
        if value != default:
            lease[name] = value
    return {"lease": lease}


def wait_reply(seconds: float) -> dict[str, Any]:
    return {"wait": seconds}


def done_reply(done: bool = True) -> dict[str, Any]:
    return {"done": done}


def heartbeat_reply(
    releases: list[tuple[int, int]], revoked: list[int], done: bool, restart: bool = False
) -> dict[str, Any]:
    """`restart`: finish the units held, take no more, and leave to be restarted in a new
    layout (the pool was re-planned)."""
    reply = {"releases": [list(r) for r in releases], "revoked": revoked, "done": done}
    if restart:
        reply["restart"] = True
    return reply


def commit_reply(status: str) -> dict[str, Any]:
    return {"status": status}


OK_REPLY: dict[str, Any] = {"ok": True}
