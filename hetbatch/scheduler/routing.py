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
    """Rows of [start, end) needing more than `above` and at most `below` tokens of context."""

    start: int
    end: int
    above: int
    below: int = UNLIMITED


class LongRows:
    """Spans of handed-back rows, by the (above, below) bounds of the context they need."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int, int], RangeSet] = {}
        self._keys: list[tuple[int, int]] = []  # sorted bounds with spans waiting

    def __bool__(self) -> bool:
        return bool(self._keys)

    def add(self, start: int, end: int, above: int, below: int = UNLIMITED) -> None:
        key = (above, below)
        spans = self._by_key.get(key)
        if spans is None:
            spans = self._by_key[key] = RangeSet()
            bisect.insort(self._keys, key)
        spans.add(start, end)

    def remove(self, start: int, end: int, key: tuple[int, int]) -> None:
        spans = self._by_key.get(key)
        if spans is None:
            return
        spans.remove(start, end)
        if not spans:
            del self._by_key[key]
            self._keys.remove(key)

    def largest_below(self, context: int) -> tuple[int, int] | None:
        """The bounds of the longest rows waiting that an instance of `context` may hold some
        of (their lower bound under its context)."""
        i = bisect.bisect_left(self._keys, (context, -1))
        return self._keys[i - 1] if i else None

    def largest(self) -> tuple[int, int] | None:
        return self._keys[-1] if self._keys else None

    def cut(self, key: tuple[int, int], max_rows: int) -> Span:
        """The first span waiting under `key`, at most `max_rows` rows, taken out."""
        start, end = self._by_key[key].first()
        end = min(end, start + max_rows)
        self.remove(start, end, key)
        return Span(start, end, *key)

    def items(self) -> list[Span]:
        return [Span(a, b, *k) for k in self._keys for a, b in self._by_key[k]]
