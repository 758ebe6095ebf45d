"""Rows dealt by the context they need: rows too long for one pool's engines go to a pool whose
engines hold them.

A worker checks each row of its unit (prompt tokens plus max_tokens) against its engine's
`max_model_len`, runs the rows that fit and commits the unit saying it handed the others back.
The scheduler keeps no row of them: it keeps the unit's span under the context that could not
hold its long rows ("rows of [start, end) needing more than 4,096 tokens"), a few ranges per
context, and deals those spans only to instances of a larger context. A worker given such a
span runs only the rows above the span's context, so the rows of a span are found again from
the rows themselves. Rows that no live instance can hold are dealt last, marked final: their
worker writes them as row errors.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from hetbatch.scheduler.ranges import RangeSet

UNLIMITED = 1 << 62  # the context of an instance that did not say its own


@dataclass(frozen=True)
class Span:
    """Rows of [start, end) needing more than `above` tokens of context."""

    start: int
    end: int
    above: int


class LongRows:
    """Spans of handed-back rows, by the context that handed them back."""

    def __init__(self) -> None:
        self._by_above: dict[int, RangeSet] = {}
        self._keys: list[int] = []  # sorted contexts with spans waiting

    def __bool__(self) -> bool:
        return bool(self._keys)

    def add(self, start: int, end: int, above: int) -> None:
        spans = self._by_above.get(above)
        if spans is None:
            spans = self._by_above[above] = RangeSet()
            bisect.insort(self._keys, above)
        spans.add(start, end)

    def contains(self, start: int, end: int, above: int) -> bool:
        spans = self._by_above.get(above)
        return spans is not None and spans.contains(start, end)

    def remove(self, start: int, end: int, above: int) -> None:
        spans = self._by_above.get(above)
        if spans is None:
            return
        spans.remove(start, end)
        if not spans:
            del self._by_above[above]
            self._keys.remove(above)

    def largest_below(self, context: int) -> int | None:
        """The largest context with spans waiting that is smaller than `context`: the longest
        rows an instance of `context` may hold."""
        i = bisect.bisect_left(self._keys, context)
        return self._keys[i - 1] if i else None

    def largest(self) -> int | None:
        return self._keys[-1] if self._keys else None

    def cut(self, above: int, max_rows: int) -> Span:
        """The first span waiting under `above`, at most `max_rows` rows, taken out."""
        start, end = self._by_above[above].first()
        end = min(end, start + max_rows)
        self.remove(start, end, above)
        return Span(start, end, above)

    def items(self) -> list[Span]:
        return [Span(a, b, k) for k in self._keys for a, b in self._by_above[k]]
