"""A set of disjoint half-open row ranges, kept merged and sorted.

The scheduler's memory is O(number of ranges), not O(rows): the pending work and the committed
work of a billion-row job are each a handful of intervals plus the fragments that stealing and
expired leases leave behind.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class RangeSet:
    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._total = 0  # kept as ranges come and go: read on every scheduling decision
        for a, b in ranges:
            self.add(a, b)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=False))

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)})"

    @property
    def total(self) -> int:
        return self._total

    def first(self) -> tuple[int, int]:
        return self._starts[0], self._ends[0]

    def add(self, start: int, end: int) -> None:
        """Add [start, end), merging with neighbours it touches or overlaps."""
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._total += (end - start) - sum(
            e - s for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True)
        )
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        """Remove [start, end); parts not in the set are ignored."""
        if start >= end:
            return
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        if i >= j:
            return
        keep_s, keep_e = [], []
        if self._starts[i] < start:
            keep_s.append(self._starts[i])
            keep_e.append(start)
        if self._ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(self._ends[j - 1])
        self._total += sum(e - s for s, e in zip(keep_s, keep_e, strict=True)) - sum(
            e - s for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True)
        )
        self._starts[i:j] = keep_s
        self._ends[i:j] = keep_e

    def end_of(self, position: int) -> int:
        """The end of the range that holds `position` (which must be in the set)."""
        i = bisect.bisect_right(self._starts, position) - 1
        assert i >= 0 and position < self._ends[i], f"{position} is not in the set"
        return self._ends[i]

    def contains(self, start: int, end: int) -> bool:
        """Whether all of [start, end) is in the set."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any of [start, end) is in the set."""
        i = bisect.bisect_right(self._ends, start)
        return i < len(self._starts) and self._starts[i] < end

    def last(self) -> tuple[int, int]:
        return self._starts[-1], self._ends[-1]

    def next_start(self, position: int) -> int | None:
        """The start of the first range after `position`, if any."""
        i = bisect.bisect_right(self._starts, position)
        return self._starts[i] if i < len(self._starts) else None

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) in the set, in order."""
        i = bisect.bisect_right(self._ends, start)
        out = []
        while i < len(self._starts) and self._starts[i] < end:
            out.append((max(self._starts[i], start), min(self._ends[i], end)))
            i += 1
        return out
