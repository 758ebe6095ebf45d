"""What rows may cost at most, known before the job runs: each row's context need (prompt tokens
plus its max_tokens).

Two figures of the whole job, not a figure per row: the mean and the largest need. Near the end
an instance that could not finish a row of the largest need before the job's expected end gets
its units with a limit: its worker hands back the rows above it (as it hands back rows too long
for its context), and those go to the instances that finish them soonest. A request that may
decode for minutes then starts while there is still other work to run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A row is heavy when it may need this many times the mean row's need.
HEAVY_RATIO = 2.0


@dataclass(frozen=True)
class RowBounds:
    mean_bound: float
    max_bound: int

    @classmethod
    def from_rows(cls, needs: np.ndarray) -> RowBounds:
        """The summary of per-row needs, one pass (a column's mean and maximum)."""
        needs = np.asarray(needs)
        if not len(needs):
            return cls(1.0, 1)
        return cls(max(float(needs.mean()), 1.0), int(needs.max()))

    @property
    def heavy_bound(self) -> int:
        """Rows needing more than this are heavy."""
        return int(HEAVY_RATIO * self.mean_bound)

    @property
    def any_heavy(self) -> bool:
        return self.max_bound > self.heavy_bound
