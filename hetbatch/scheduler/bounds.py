"""What each block of rows may cost at most, known before the job runs (per-row max_tokens).

The end game uses it to deal the heaviest rows first: a request that may decode for minutes must
start while there is still other work to run beside it, not in the job's last minutes. Memory is
one integer per block of rows (at most `MAX_BLOCKS` blocks), never per row, so a job of 10^9
rows keeps a summary of a few MiB.
"""

from __future__ import annotations

import math

import numpy as np

from hetbatch.scheduler.ranges import RangeSet

MIN_BLOCK_ROWS = 64
MAX_BLOCKS = 1 << 22
# A block is heavy when one of its rows may need this many times the mean row's bound.
HEAVY_RATIO = 2.0


def block_rows_for(total_rows: int) -> int:
    """Rows per block: small enough that blocks without a long row exist even when long rows
    are scattered (1 in 200 rows leaves 72% of 64-row blocks light), few enough blocks to keep
    the summary small."""
    return max(MIN_BLOCK_ROWS, math.ceil(total_rows / MAX_BLOCKS))


class RowBounds:
    """Per block of `block_rows` rows: the largest bound of one of its rows (in tokens)."""

    def __init__(self, block_max: np.ndarray, block_rows: int, mean_bound: float) -> None:
        self.block_max = np.asarray(block_max, dtype=np.int32)
        self.block_rows = block_rows
        self.mean_bound = max(float(mean_bound), 1.0)
        self.heavy_bound = HEAVY_RATIO * self.mean_bound
        heavy = self.block_max > self.heavy_bound
        # Light rows from block k on: counted in O(1) for any range of blocks.
        self._light_before = np.concatenate([[0], np.cumsum(~heavy, dtype=np.int64)])
        self._heavy = heavy
        self.max_bound = int(self.block_max.max(initial=0))

    @classmethod
    def from_rows(cls, bounds: np.ndarray, block_rows: int | None = None) -> RowBounds:
        """The summary of per-row bounds (e.g. each row's max_tokens), one pass."""
        bounds = np.asarray(bounds)
        rows = len(bounds)
        size = block_rows or block_rows_for(rows)
        blocks = -(-rows // size)
        padded = np.zeros(blocks * size, dtype=np.int32)
        padded[:rows] = bounds
        mean = float(bounds.mean()) if rows else 1.0
        return cls(padded.reshape(blocks, size).max(axis=1), size, mean)

    @property
    def any_heavy(self) -> bool:
        return bool(self._heavy.any())

    def light_rows(self, ranges: RangeSet) -> int:
        """Rows of `ranges` in blocks without a heavy row (partial blocks counted whole)."""
        total = 0
        for start, end in ranges:
            a, b = start // self.block_rows, -(-end // self.block_rows)
            total += int(self._light_before[b] - self._light_before[a]) * self.block_rows
        return total

    def heavy_ranges(self, ranges: RangeSet) -> RangeSet:
        """The parts of `ranges` that lie in heavy blocks, as merged row ranges."""
        out = RangeSet()
        size = self.block_rows
        for start, end in ranges:
            a, b = start // size, -(-end // size)
            heavy = self._heavy[a:b]
            if not heavy.any():
                continue
            padded = np.concatenate([[False], heavy, [False]]).astype(np.int8)
            edges = np.flatnonzero(np.diff(padded))
            for first, last in zip(edges[::2], edges[1::2], strict=True):
                out.add(max(start, (a + int(first)) * size), min(end, (a + int(last)) * size))
        return out
