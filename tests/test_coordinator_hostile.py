"""The coordinator's protocol under hostile input, over real TCP against a real coordinator.

Malformed frames, every field of every operation with a wrong type or an impossible value,
unknown operations, missing and wrong tokens, another instance's name and lease ids: each gets
an error reply (or, for another's lease id, the verdict a lapsed lease gets), and an honest
worker connected all along keeps its lease, heartbeats and finally commits its unit.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetbatch.coordinator import messages as m
from hetbatch.coordinator.ledger import OutputStore
from hetbatch.coordinator.protocol import Client, recv_message
from hetbatch.coordinator.server import Coordinator
from hetbatch.io.parquet import write_table
from hetbatch.scheduler.core import Scheduler, SchedulerConfig

TOKEN = "s3cret"
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Served:
    """A coordinator, an honest worker `a` holding one lease, and a hostile peer `mallory`."""

    def __init__(self, tmp: str) -> None:
        self.store = OutputStore(tmp)
        self.store.recover()
        scheduler = Scheduler(10_000, SchedulerConfig(max_unit_rows=100, lease_timeout_s=1e6))
        self.coord = Coordinator(scheduler, self.store, {"spec": {}}, token=TOKEN)
        self.coord.start()
        self.honest = Client(*self.coord.address, TOKEN, retry_s=2)
        self.honest.call("hello", instance="a", weight=1.0)
        self.lease = self.honest.call("lease", instance="a")["lease"]
        self.mallory = self.connect()
        assert self.send(self.mallory, {"op": "hello", "token": TOKEN, "instance": "mallory"}) == {
            "done": False
        }

    def connect(self) -> socket.socket:
        return socket.create_connection(self.coord.address, timeout=10)

    def send_frame(self, sock: socket.socket, body: bytes) -> dict[str, Any]:
        sock.sendall(struct.pack(">I", len(body)) + body)
        return recv_message(sock)

    def send(self, sock: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
        return self.send_frame(sock, json.dumps(message).encode())

    def assert_unharmed(self) -> None:
        """The honest worker still holds its lease and is answered normally."""
        held = self.coord.scheduler.leases[self.lease["id"]]
        lease = self.lease
        assert (held.instance, held.start, held.end) == ("a", lease["start"], lease["end"])
        progress = {str(self.lease["id"]): [0, 0]}
        reply = self.honest.call("heartbeat", instance="a", progress=progress)
        assert reply == {"releases": [], "revoked": [], "done": False}
        assert self.store.published_ranges() == []


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    s = Served(str(tmp_path_factory.mktemp("hostile") / "out"))
    yield s
    s.coord.stop()


def _valid_pair(value: Any) -> bool:
    """A well-formed [submitted, done] pair, which junk can happen to be."""
    return type(value) is list and len(value) == 2 and all(
        type(x) is int and 0 <= x <= m.MAX_INT for x in value
    )


def _valid(op: str, served: Served) -> dict[str, Any]:
    """A well-formed request of `op` from mallory (without envelope)."""
    fields: dict[str, dict[str, Any]] = {
        "job": {},
        "status": {},
        "hello": {"instance": "mallory", "weight": 2.0, "pool": "p", "concurrency": 8,
                  "context": 512},
        "lease": {"instance": "mallory"},
        "bye": {"instance": "mallory"},
        "heartbeat": {"instance": "mallory", "progress": {"7": [1, 0]}},
        "release": {"instance": "mallory", "lease": 7, "cut": 3},
        "handback": {"instance": "mallory", "lease": 7, "at": 64},
        "commit": {
            "instance": "mallory", "lease": 7, "start": 0, "end": 5, "staging": "m.parquet",
            "stats": {"rows": 5, "prompt_tokens": 1, "completion_tokens": 2, "errors": 0,
                      "busy_s": 0.5},
            "above": 64, "top": 512,
        },
    }
    return fields[op]


JUNK = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
NOT_JSON_SAFE_INT = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=m.MAX_INT + 1), st.floats(allow_nan=True)
)
BAD: dict[str, st.SearchStrategy[Any]] = {
    "instance": st.one_of(JUNK.filter(lambda v: not (isinstance(v, str) and v)),
                          st.just(""), st.just("x" * 300), st.integers()),
    "weight": st.one_of(
        st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
        st.floats(max_value=0.0), st.floats(min_value=1e13), st.just(math.nan),
        st.just(math.inf),
    ),
    "pool": st.one_of(st.integers(), st.booleans(), st.lists(st.text(), max_size=2),
                      st.just("p" * 300)),
    "concurrency": st.one_of(
        st.booleans(), st.text(max_size=5), st.floats(), st.integers(max_value=0),
        st.integers(min_value=m.MAX_CONCURRENCY + 1),
    ),
    "lease": st.one_of(JUNK, NOT_JSON_SAFE_INT),
    "context": st.one_of(st.booleans(), st.text(max_size=5), st.floats(),
                         st.integers(max_value=0), st.integers(min_value=m.MAX_CONTEXT + 1)),
    "at": st.one_of(JUNK, NOT_JSON_SAFE_INT, st.just(0)),
    "above": st.one_of(JUNK.filter(lambda v: v is not None), NOT_JSON_SAFE_INT),
    "top": st.one_of(st.booleans(), st.text(max_size=5), st.floats(), st.just(0),
                     st.integers(min_value=m.MAX_CONTEXT + 1)),
    "cut": st.one_of(JUNK, NOT_JSON_SAFE_INT),
    "start": st.one_of(JUNK, NOT_JSON_SAFE_INT, st.integers(min_value=5, max_value=m.MAX_INT)),
    "end": st.one_of(JUNK, NOT_JSON_SAFE_INT, st.integers(min_value=-3, max_value=0)),
    "staging": st.one_of(
        st.integers(), st.none(), st.sampled_from(
            ["../ledger.jsonl", "/etc/passwd", "a/b.parquet", "x.txt", "", ".hidden.parquet",
             "..parquet", "_SUCCESS", "a" * 300 + ".parquet"]),
    ),
    "progress": st.one_of(
        st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
        st.dictionaries(st.sampled_from(["x", "-1", "1.5", "", "9" * 20]),
                        st.just([0, 0]), min_size=1, max_size=2),
        st.dictionaries(st.just("1"), st.one_of(JUNK, st.just([1]), st.just([1, 2, 3]),
                                                 st.just([-1, 0]), st.just([0, 2**64]))
                        .filter(lambda v: not _valid_pair(v)), min_size=1),
    ),
    "stats": st.one_of(
        st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
        st.fixed_dictionaries({"rows": NOT_JSON_SAFE_INT}),
        st.fixed_dictionaries({"busy_s": st.one_of(st.just(math.inf), st.just(-1.0),
                                                   st.text(max_size=2))}),
        st.fixed_dictionaries({"surprise": st.integers()}),
    ),
}
FIELDS = [(op, name) for op in m.REQUESTS for name in _valid(op, None) if name in BAD]  # type: ignore[arg-type]


@SETTINGS
@given(case=st.sampled_from(FIELDS), data=st.data())
def test_every_field_with_a_wrong_value_is_refused(served: Served, case, data) -> None:
    op, name = case
    message = {"op": op, "token": TOKEN, **_valid(op, served)}
    message[name] = data.draw(BAD[name], label=name)
    reply = served.send(served.mallory, message)
    assert set(reply) == {"error"} and reply["error"].startswith(f"{op}:"), reply
    served.assert_unharmed()


@SETTINGS
@given(op=st.sampled_from(sorted(m.REQUESTS)), data=st.data())
def test_missing_and_extra_fields_are_refused(served: Served, op, data) -> None:
    message = {"op": op, "token": TOKEN, **_valid(op, served)}
    required = [k for k in message if k not in ("op", "token", "weight", "pool", "concurrency",
                                                "progress", "stats", "context", "above", "top")]
    if required and data.draw(st.booleans(), label="drop a field"):
        del message[data.draw(st.sampled_from(required), label="dropped")]
    else:
        extra = data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in message))
        message[extra] = data.draw(JUNK)
    assert "error" in served.send(served.mallory, message)
    served.assert_unharmed()


@SETTINGS
@given(op=st.one_of(st.text(max_size=20), JUNK).filter(lambda o: str(o) not in m.REQUESTS))
def test_unknown_operations_are_refused(served: Served, op) -> None:
    reply = served.send(served.mallory, {"op": op, "token": TOKEN})
    assert reply["error"].startswith("unknown operation")
    served.assert_unharmed()


@SETTINGS
@given(body=st.one_of(st.binary(max_size=64), st.text(max_size=30).map(str.encode)))
def test_frames_that_are_not_json_objects_are_refused(served: Served, body: bytes) -> None:
    with served.connect() as sock:
        assert "error" in served.send_frame(sock, body)
    served.assert_unharmed()


@SETTINGS
@given(
    token=st.one_of(st.none(), st.text(max_size=12).filter(lambda t: t != TOKEN), JUNK),
    op=st.sampled_from(sorted(m.REQUESTS)),
)
def test_missing_or_wrong_token_is_refused_and_the_connection_closed(
    served: Served, token, op
) -> None:
    message = {"op": op, **_valid(op, served)}
    if token is not None:
        message["token"] = token
    with served.connect() as sock:
        reply = served.send(sock, message)
        assert reply["error"].startswith("unauthorized")
        assert sock.recv(1) == b""
    served.assert_unharmed()


def test_another_instances_name_and_leases_change_nothing(served: Served) -> None:
    lease, sock = served.lease, served.mallory
    as_a = {"op": "heartbeat", "token": TOKEN, "instance": "a", "progress": {}}
    assert "speaks for 'mallory'" in served.send(sock, as_a)["error"]
    with served.connect() as fresh:
        lease_as_a = {"op": "lease", "token": TOKEN, "instance": "a"}
        assert "has not said hello" in served.send(fresh, lease_as_a)["error"]
    # Another instance's lease id gets the verdict a lapsed lease gets: an honest worker whose
    # lease lapsed and was dealt again sends exactly these.
    assert served.send(sock, {"op": "release", "token": TOKEN, "instance": "mallory",
                              "lease": lease["id"], "cut": lease["start"]}) == {"ok": True}
    beat = {"op": "heartbeat", "token": TOKEN, "instance": "mallory",
            "progress": {str(lease["id"]): [50, 50]}}
    assert served.send(sock, beat)["revoked"] == [lease["id"]]
    write_table(served.store.staging_url("m.parquet"), pa.table({"x": [0]}), "zstd")
    commit = {"op": "commit", "token": TOKEN, "instance": "mallory", "lease": lease["id"],
              "start": lease["start"], "end": lease["end"], "staging": "m.parquet"}
    assert served.send(sock, commit) == {"status": "stale"}
    missing = {**commit, "staging": "never-written.parquet"}
    assert "no staged shard" in served.send(sock, missing)["error"]
    served.assert_unharmed()
    assert not served.store.fs.exists(served.store.staging_url("m.parquet").split("://")[-1])


def test_truncated_and_oversized_frames_leave_the_others_alone(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(struct.pack(">I", 100) + b'{"op":')  # and hang up mid-frame
    with served.connect() as sock:
        sock.sendall(struct.pack(">I", 2**32 - 1))
        assert "exceeds" in recv_message(sock)["error"]
        assert sock.recv(1) == b""
    served.assert_unharmed()


def test_the_honest_worker_finishes_last(served: Served) -> None:
    """Runs after the hostile tests (file order): the honest unit is still committed once."""
    lease = served.lease
    write_table(served.store.staging_url("a.parquet"), pa.table({"x": [0]}), "zstd")
    reply = served.honest.call(
        "commit", instance="a", lease=lease["id"], start=lease["start"], end=lease["end"],
        staging="a.parquet",
    )
    assert reply == {"status": "accepted"}
    assert served.store.published_ranges() == [(lease["start"], lease["end"])]
    assert [(r.start, r.end, r.instance) for r in served.store.read_ledger()] == [
        (lease["start"], lease["end"], "a")
    ]
