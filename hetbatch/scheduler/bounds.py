"""What rows may cost at most, known before the job runs: each row's context need (prompt tokens
plus its max_tokens).

The scheduler gets a summary, not a figure per row: the mean and the largest need of the job,
and where its heavy rows are (rows needing more than `HEAVY_RATIO` times the mean), as the
blocks of `block_rows` rows that hold one, merged into ranges. A heavy row may decode for
minutes, and one that starts near the end sets the job's makespan; knowing where they are, the
scheduler deals them early (see `Scheduler`, "heavy rows apart").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A row is heavy when it may need this many times the mean row's need.
HEAVY_RATIO = 2.0
# Heavy rows are located to blocks of this many rows (one flag per block).
BLOCK_ROWS = 4096


@dataclass(frozen=True)
class RowBounds:
    mean_bound: float
    max_bound: int
    # Row ranges (whole blocks) holding every heavy row; None: unknown, any row may be heavy.
    heavy_ranges: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def from_rows(cls, needs: np.ndarray, block_rows: int = BLOCK_ROWS) -> RowBounds:
        """The summary of per-row needs, one pass over them (a column's mean, maximum, and which
        blocks of `block_rows` rows hold a heavy row)."""
        needs = np.asarray(needs)
        if not len(needs):
            return cls(1.0, 1, ())
        mean = max(float(needs.mean()), 1.0)
        heavy = needs > int(HEAVY_RATIO * mean)
        pad = -len(heavy) % block_rows
        flags = np.concatenate([heavy, np.zeros(pad, bool)]).reshape(-1, block_rows).any(axis=1)
        # Runs of flagged blocks, as [start, end) row ranges.
        edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        ranges = tuple(
            (int(a) * block_rows, min(int(b) * block_rows, len(needs)))
            for a, b in zip(starts, ends, strict=True)
        )
        return cls(mean, int(needs.max()), ranges)

    @property
    def heavy_bound(self) -> int:
        """Rows needing more than this are heavy."""
        return int(HEAVY_RATIO * self.mean_bound)

    @property
    def any_heavy(self) -> bool:
        return self.max_bound > self.heavy_bound and self.heavy_ranges != ()

    @property
    def heavy_over_mean(self) -> float:
        """How many mean rows' latency a heavy row may take, at most."""
        return self.max_bound / self.mean_bound
