"""The pure scheduler: dealing, shrinking, stealing, leases and commits, with time as an input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hetbatch.scheduler.core import CommitStatus, Lease, Scheduler, SchedulerConfig, Wait
from hetbatch.scheduler.ranges import RangeSet


def _sched(rows: int = 10_000, **cfg) -> Scheduler:
    return Scheduler(rows, SchedulerConfig(**{"max_unit_rows": 100_000, **cfg}))


def test_rangeset_merges_and_splits() -> None:
    s = RangeSet([(0, 10), (20, 30)])
    s.add(10, 20)
    assert list(s) == [(0, 30)]
    s.remove(5, 25)
    assert list(s) == [(0, 5), (25, 30)]
    assert s.contains(25, 30) and not s.contains(4, 26)
    assert s.total == 10


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 60)), max_size=40))
@settings(max_examples=200, deadline=None)
def test_rangeset_matches_a_plain_set(ops) -> None:
    s, ref = RangeSet(), set()
    for add, a, b in ops:
        a, b = min(a, b), max(a, b)
        (s.add if add else s.remove)(a, b)
        (ref.update if add else ref.difference_update)(range(a, b))
    assert {i for a, b in s for i in range(a, b)} == ref
    for a in range(0, 60, 7):
        assert s.overlaps(a, a + 5) == bool(ref & set(range(a, a + 5)))
        assert {i for p, q in s.pieces(a, a + 9) for i in range(p, q)} == ref & set(range(a, a + 9))
        after = [r for r, _ in s if r > a]
        assert s.next_start(a) == (after[0] if after else None)
    if s:
        assert s.last()[1] == max(ref) + 1
    assert s.total == len(ref)
    starts = [a for a, _ in s]
    ends = [b for _, b in s]
    assert all(e < s2 for e, s2 in zip(ends, starts[1:], strict=False))  # disjoint, not touching


def test_units_are_proportional_to_weight_and_shrink() -> None:
    s = _sched()
    s.join("fast", 3.0, 0)
    s.join("slow", 1.0, 0)
    fast, slow = s.request("fast", 0), s.request("slow", 0)
    assert isinstance(fast, Lease) and isinstance(slow, Lease)
    assert abs(fast.rows / slow.rows - 3 * 10_000 / (10_000 - fast.rows)) < 0.05
    sizes = []
    while True:
        lease = s.request("fast", 1)
        if not isinstance(lease, Lease):
            break
        sizes.append(lease.rows)
        s.commit("fast", lease.lease_id, lease.start, lease.end, 2)
    # Shrinking toward the end; the very last unit may absorb a sliver below the minimum.
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)
    assert min(sizes) >= s.config.min_unit_rows and sizes[-1] < 2 * s.config.min_unit_rows


def test_every_row_dealt_once_and_done_after_all_commits() -> None:
    s = _sched(rows=1000, max_unit_rows=64)
    s.join("a", 1.0, 0)
    s.join("b", 2.0, 0)
    seen = []
    t = 0.0
    while not s.done:
        for inst in ("a", "b"):
            lease = s.request(inst, t)
            if isinstance(lease, Lease):
                seen.append((lease.start, lease.end))
                assert s.commit(inst, lease.lease_id, lease.start, lease.end, t + 1) is (
                    CommitStatus.ACCEPTED
                )
        t += 1
    rows = sorted(i for a, b in seen for i in range(a, b))
    assert rows == list(range(1000))
    assert s.request("a", t) is Wait.DONE


def test_lapsed_lease_goes_back_and_a_stale_commit_is_refused() -> None:
    s = _sched(rows=100, lease_timeout_s=10)
    s.join("a", 1.0, 0)
    s.join("b", 1.0, 0)
    a = s.request("a", 0)
    assert isinstance(a, Lease)
    s.heartbeat("a", {a.lease_id: (a.start, 0)}, 5)
    assert s.expire(14) == []  # renewed at t=5
    lapsed = s.expire(16)
    assert [x.lease_id for x in lapsed] == [a.lease_id]
    # b now takes those rows; a's late commit must not count twice.
    b = s.request("b", 16)
    assert isinstance(b, Lease) and b.start == a.start
    assert s.commit("a", a.lease_id, a.start, a.end, 17) is CommitStatus.STALE
    assert s.commit("b", b.lease_id, b.start, b.end, 18) is CommitStatus.ACCEPTED
    assert s.commit("b", b.lease_id, b.start, b.end, 19) is CommitStatus.DUPLICATE
    assert s.heartbeat("a", {a.lease_id: (a.end, 0)}, 20).revoked == [a.lease_id]


def test_late_commit_of_untaken_rows_is_kept() -> None:
    s = _sched(rows=100, lease_timeout_s=10)
    s.join("a", 1.0, 0)
    a = s.request("a", 0)
    s.expire(11)
    assert s.commit("a", a.lease_id, a.start, a.end, 12) is CommitStatus.ACCEPTED
    assert s.committed.contains(a.start, a.end)
    assert all(end <= a.start or start >= a.end for start, end in s.pending)


def test_leaving_instance_returns_its_leases() -> None:
    s = _sched(rows=100)
    s.join("a", 1.0, 0)
    a = s.request("a", 0)
    assert s.leave("a", 1)[0].lease_id == a.lease_id
    assert s.pending.total == 100


def test_idle_instance_steals_the_tail_of_the_slowest() -> None:
    s = _sched(rows=1000, max_unit_rows=1000, factor=1.0)
    s.join("slow", 1.0, 0)
    big = s.request("slow", 0)
    assert isinstance(big, Lease) and big.rows == 1000
    s.heartbeat("slow", {big.lease_id: (100, 50)}, 1)
    s.join("fast", 3.0, 1)
    assert s.request("fast", 1) == Wait(SchedulerConfig().retry_s)
    reply = s.heartbeat("slow", {big.lease_id: (120, 60)}, 2)
    assert len(reply.releases) == 1
    release = reply.releases[0]
    assert release.cut >= 120  # never rows the owner already handed to its engine
    # Both finish together: the fast one (3x) takes about 3/4 of what is left.
    assert abs((1000 - release.cut) / (1000 - 60) - 0.75) < 0.05
    s.release("slow", big.lease_id, release.cut, 2)
    stolen = s.request("fast", 2)
    assert isinstance(stolen, Lease) and (stolen.start, stolen.end) == (release.cut, 1000)
    assert s.leases[big.lease_id].end == release.cut


def test_measured_rates_correct_planned_weights() -> None:
    s = _sched(rows=100_000, max_unit_rows=100)
    speed = {"a": 400.0, "b": 100.0}  # planned equal, but a really does 4x the rows/s of b
    for name in speed:
        s.join(name, 1.0, 0)
    busy_until = dict.fromkeys(speed, 0.0)
    for _ in range(40):  # each instance asks again the moment it finishes its unit
        name = min(busy_until, key=busy_until.get)
        t = busy_until[name]
        lease = s.request(name, t)
        busy_until[name] = t + lease.rows / speed[name]
        s.commit(name, lease.lease_id, lease.start, lease.end, busy_until[name])
    assert abs(s.rate("a") / s.rate("b") - 4) < 0.4
    s.config = SchedulerConfig(max_unit_rows=10**9)  # uncapped, to see the raw shares
    assert abs(s.unit_size("a") / s.unit_size("b") - 4) < 0.4


def test_decisions_are_deterministic() -> None:
    def trace() -> list:
        s = _sched(rows=5000, max_unit_rows=300)
        for name, w in (("x", 1.0), ("y", 2.5), ("z", 0.5)):
            s.join(name, w, 0)
        out, t = [], 0.0
        while not s.done:
            for name in ("x", "y", "z"):
                lease = s.request(name, t)
                if isinstance(lease, Lease):
                    out.append((name, lease.start, lease.end))
                    s.commit(name, lease.lease_id, lease.start, lease.end, t + 0.5)
            t += 1
        return out

    assert trace() == trace()


def test_resume_skips_committed_ranges() -> None:
    s = Scheduler(1000, SchedulerConfig(max_unit_rows=10_000), committed=[(0, 400), (600, 700)])
    assert list(s.pending) == [(0 + 400, 600), (700, 1000)]


def test_end_game_keeps_the_last_rows_off_slow_turnaround_instances() -> None:
    """Near the end, an instance whose engine takes long to turn a row around gets no new rows
    while one that turns rows around fast is asking."""
    s = _sched(rows=2_000, max_unit_rows=200)
    s.join("deep", 1.0, 0, concurrency=512)  # 10 rows/s through a 512-deep batch: 51 s a row
    s.join("quick", 1.0, 0, concurrency=32)  # 10 rows/s through a 32-deep batch: 3.2 s a row
    t = 0.0
    for name in ("deep", "quick"):  # measure both at 10 rows/s
        lease = s.request(name, t)
        s.commit(name, lease.lease_id, lease.start, lease.end, t + lease.rows / 10)
    while s.pending.total > 100:
        t += 1
        lease = s.request("quick", t)
        s.commit("quick", lease.lease_id, lease.start, lease.end, t + lease.rows / 10)
        t += lease.rows / 10
    assert s.request("deep", t) == Wait(SchedulerConfig().retry_s)
    assert isinstance(s.request("quick", t), Lease)
    s.config = SchedulerConfig(max_unit_rows=200, tail_latency_factor=0)  # the rule off
    assert isinstance(s.request("deep", t), Lease)


@given(
    st.lists(
        st.tuples(st.sampled_from("rhcxel"), st.integers(0, 3), st.integers(0, 400)), max_size=120
    )
)
@settings(max_examples=150, deadline=None)
def test_running_sums_match_a_recount(ops) -> None:
    """The O(1) bookkeeping (capacity of the alive cluster, unfinished leased rows) always
    equals what a full recount gives, whatever the order of events."""
    s = _sched(rows=5_000, max_unit_rows=300, lease_timeout_s=5)
    names = ["a", "b", "c", "d"]
    t = 0.0
    for op, k, x in ops:
        t += 1.0
        name = names[k]
        if op == "e" or name not in s.instances:
            s.join(name, 1.0 + k, t, concurrency=8 * (k + 1))
        elif op == "r":
            s.request(name, t)
        elif op == "h":
            progress = {
                lid: (s.leases[lid].start + x % 50, x % 40) for lid in s.instances[name].leases
            }
            for rel in s.heartbeat(name, progress, t).releases:
                s.release(name, rel.lease_id, rel.cut, t)
        elif op == "c" and s.instances[name].leases:
            lease = s.leases[s.instances[name].leases[0]]
            s.commit(name, lease.lease_id, lease.start, lease.end, t)
        elif op == "x":
            s.expire(t + x / 40)
        elif op == "l":
            s.leave(name, t)
        alive = [i for i, st_ in s.instances.items() if st_.alive]
        assert abs(s._total_rate() - (sum(s.rate(i) for i in alive) or 1.0)) < 1e-6
        assert s._leased_unfinished == sum(ls.unfinished_rows for ls in s.leases.values())
        for st_ in s.instances.values():
            assert st_.queued == sum(s.leases[lid].unfinished_rows for lid in st_.leases)


def test_waiting_instances_together_ask_a_bounded_number_of_times_a_second() -> None:
    """Given nothing, an instance is told to wait longer the more instances already wait (up
    to a cap); one that gets rows again stops counting."""
    s = _sched(rows=100, max_unit_rows=100, factor=1.0, waiting_asks_per_s=4.0, max_retry_s=2.0)
    s.join("a", 1.0, 0)
    lease = s.request("a", 0)
    assert isinstance(lease, Lease) and lease.rows == 100
    for name in "bcdefghij":
        s.join(name, 1000.0 if name == "b" else 1.0, 0)
    waits = [s.request(name, 0).seconds for name in "bcdefghij"]
    assert waits[0] == SchedulerConfig().retry_s  # few waiting: the usual short wait
    assert waits == sorted(waits) and waits[-1] == 2.0  # more waiting: longer, up to the cap
    assert waits[3] == 4 / 4.0  # four waiting instances asking four times a second together
    s.leave("a", 1)
    s.leave("j", 1)
    assert isinstance(s.request("b", 1), Lease)
    assert s.request("c", 1).seconds == 7 / 4.0  # neither b, which got rows, nor j, lost, wait
