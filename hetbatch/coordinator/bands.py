"""Resuming a job whose rows were dealt by the context they need.

A committed unit usually holds every row of its range. A unit that handed rows back holds only
its rows needing at most `top` tokens of context, and a unit of long rows only those needing
more than `above` and at most `top`: the ledger records that band beside the range. On resume,
a range is done when the bands of its records cover every need; what they leave uncovered is
dealt again as spans of long rows, exactly as the scheduler keeps rows handed back while the
job runs, so no row runs twice and none is lost.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from hetbatch.scheduler.ranges import RangeSet
from hetbatch.scheduler.routing import UNLIMITED, Span

Band = tuple[int, int | None]  # rows needing more than above and at most top (None: no bound)


def resume_state(
    records: Iterable[tuple[int, int, int, int | None]],
) -> tuple[list[tuple[int, int]], list[Span]]:
    """From committed (start, end, above, top): the ranges that count as committed (some of
    their rows are done) and the spans of rows still to run (needs none of the records of a
    range covered)."""
    whole, banded = RangeSet(), []
    for start, end, above, top in records:
        if (above, top) == (0, None):
            whole.add(start, end)
        else:
            banded.append((start, end, above, UNLIMITED if top is None else top))
    committed = RangeSet(list(whole))
    for start, end, _, _ in banded:
        committed.add(start, end)
    cuts = sorted({x for start, end, _, _ in banded for x in (start, end)})
    spans: list[Span] = []
    for lo, hi in itertools.pairwise(cuts):
        bands = [(a, t) for start, end, a, t in banded if start <= lo and hi <= end]
        if not bands or whole.contains(lo, hi):
            continue
        for above, below in _gaps(bands):
            spans.append(Span(lo, hi, above, below))
    return list(committed), spans


def _gaps(bands: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The needs in (0, UNLIMITED] that no band (above, top] covers, as (above, below)."""
    gaps, reached = [], 0
    for above, top in sorted(bands):
        if above > reached:
            gaps.append((reached, above))
        reached = max(reached, top)
    if reached < UNLIMITED:
        gaps.append((reached, UNLIMITED))
    return gaps
