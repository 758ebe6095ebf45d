"""The error budget: when so many rows fail that the job itself must be wrong, stop it.

Per-row errors are for bad rows. A job whose every row fails (a model that rejects every prompt,
a template that never applies) must not run to the end and report success: this decides, from
the committed units' error counts, when to stop it. Pure: counts and time are passed in.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

# Distinct error texts remembered; beyond that new texts are only counted as errors.
MAX_DISTINCT_ERRORS = 64


def error_shape(text: str) -> str:
    """Errors that differ only in numbers ("prompt is 612 tokens") are one kind of error."""
    return re.sub(r"\d+", "#", text)


def most_common_error(texts: Iterable[str]) -> tuple[int, str | None, int]:
    """(errors, an example of the most common kind, rows of that kind) among one unit's."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for text in texts:
        shape = error_shape(text)
        counts[shape] += 1
        examples.setdefault(shape, text)
    if not counts:
        return 0, None, 0
    shape, rows = counts.most_common(1)[0]
    return counts.total(), examples[shape], rows


@dataclass(frozen=True)
class BudgetConfig:
    """Stop when all of the first `first_rows` rows fail, or when more than `max_error_rate`
    of the rows in any window of at least `window_rows` consecutively committed rows fail.
    `max_error_rate` 1.0 never stops."""

    max_error_rate: float = 0.5
    first_rows: int = 100
    window_rows: int = 1000


@dataclass(frozen=True)
class BudgetExceeded:
    """Why the job stops: a one-line reason and the most common error."""

    reason: str
    top_error: str | None
    top_error_rows: int
    at: float

    def message(self) -> str:
        if self.top_error is None:
            return self.reason
        return f"{self.reason}; most common error ({self.top_error_rows:,} rows): {self.top_error}"


class ErrorBudget:
    """Fed one committed unit at a time (in commit order) with its row and error counts."""

    def __init__(self, config: BudgetConfig | None = None, rows_to_run: int | None = None) -> None:
        """`rows_to_run`: rows this run will commit; a job shorter than `first_rows` whose
        every row fails stops too, rather than finishing."""
        self.config = config or BudgetConfig()
        self.first_rows = min(self.config.first_rows, rows_to_run or self.config.first_rows)
        self.rows = 0
        self.errors = 0
        self._window: deque[tuple[int, int]] = deque()
        self._window_rows = 0
        self._window_errors = 0
        self._texts: Counter[str] = Counter()  # by the error's shape (numbers masked)
        self._examples: dict[str, str] = {}
        self.exceeded: BudgetExceeded | None = None

    def record(
        self, rows: int, errors: int, top_error: str | None, top_error_rows: int, now: float
    ) -> BudgetExceeded | None:
        """Count one committed unit; the verdict once the budget is spent (then it stays)."""
        if self.exceeded is not None:
            return self.exceeded
        self.rows += rows
        self.errors += errors
        if top_error:
            self._count_text(top_error, top_error_rows)
        self._slide(rows, errors)
        reason = self._reason()
        if reason is not None:
            shape, count = self._texts.most_common(1)[0] if self._texts else (None, 0)
            example = self._examples.get(shape) if shape else None
            self.exceeded = BudgetExceeded(reason, example, count, now)
        return self.exceeded

    def _count_text(self, text: str, rows: int) -> None:
        shape = error_shape(text)
        if shape in self._texts or len(self._texts) < MAX_DISTINCT_ERRORS:
            self._texts[shape] += rows
            self._examples.setdefault(shape, text)

    def _slide(self, rows: int, errors: int) -> None:
        """Keep the latest commits that hold at least `window_rows` rows, and no more."""
        self._window.append((rows, errors))
        self._window_rows += rows
        self._window_errors += errors
        while self._window_rows - self._window[0][0] >= self.config.window_rows:
            old_rows, old_errors = self._window.popleft()
            self._window_rows -= old_rows
            self._window_errors -= old_errors

    def _reason(self) -> str | None:
        cfg = self.config
        if cfg.max_error_rate >= 1.0:
            return None
        if self.rows >= max(self.first_rows, 1) and self.errors == self.rows:
            return f"all of the first {self.rows:,} rows failed"
        if self._window_rows >= cfg.window_rows:
            rate = self._window_errors / self._window_rows
            if rate > cfg.max_error_rate:
                return (
                    f"{self._window_errors:,} of {self._window_rows:,} consecutive rows failed "
                    f"({rate:.0%}, more than max_error_rate {cfg.max_error_rate:.0%})"
                )
        return None
