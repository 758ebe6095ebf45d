"""Per-row work of a simulated job, kept as prefix sums so that any unit's cost is O(1).

A row costs its output tokens plus a fraction of its prompt tokens (prefill is compute-bound and
far cheaper per token than decode). Speeds are output tokens/s at a full batch, as the planner's
capacity weights are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: lognormal around `median`, with a `tail_frac` of rows `tail_mult` x longer."""

    median: float
    sigma: float = 0.5
    tail_frac: float = 0.0
    tail_mult: float = 20.0
    minimum: int = 1
    maximum: int | None = None  # a job's max_tokens caps what the engine generates

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.lognormal(np.log(self.median), self.sigma, n)
        if self.tail_frac > 0:
            x = np.where(rng.random(n) < self.tail_frac, self.median * self.tail_mult, x)
        x = np.maximum(np.rint(x), self.minimum)
        if self.maximum is not None:
            x = np.minimum(x, self.maximum)
        return x.astype(np.int32)


class RowWork:
    """Work per row: prefix sums of cost, and output lengths for the longest-request bound."""

    def __init__(self, input_lens: np.ndarray, output_lens: np.ndarray, prefill_cost: float = 0.05):
        if len(input_lens) != len(output_lens):
            raise ValueError("input and output lengths differ in count")
        self.output_lens = np.asarray(output_lens, dtype=np.int32)
        cost = self.output_lens + prefill_cost * np.asarray(input_lens, dtype=np.float64)
        self._prefix = np.concatenate([[0.0], np.cumsum(cost)])

    @classmethod
    def sample(
        cls,
        rows: int,
        rng: np.random.Generator,
        inputs: LengthDist,
        outputs: LengthDist,
        prefill_cost: float = 0.05,
    ) -> RowWork:
        return cls(inputs.sample(rng, rows), outputs.sample(rng, rows), prefill_cost)

    @classmethod
    def resample(
        cls,
        rows: int,
        rng: np.random.Generator,
        input_sample: np.ndarray,
        outputs: LengthDist,
        prefill_cost: float = 0.05,
    ) -> RowWork:
        """Prompt lengths drawn from an observed sample (e.g. the job's own input)."""
        inputs = rng.choice(np.asarray(input_sample), size=rows, replace=True)
        return cls(inputs, outputs.sample(rng, rows), prefill_cost)

    @property
    def rows(self) -> int:
        return len(self.output_lens)

    @property
    def total(self) -> float:
        return float(self._prefix[-1])

    def cost(self, start: int, end: int) -> float:
        return float(self._prefix[end] - self._prefix[start])

    def drain_s(self, start: int, end: int, speed: float, step_s: float) -> float:
        """Seconds from a unit's first request to its last completion on a full engine.

        Row j enters once the rows before it have gone through (`cost / speed`) and then
        decodes one token a step for its own output: the unit ends with the latest of these,
        not with its last submission, so a long request late in a big unit counts as it does
        in a real engine.
        """
        if end <= start:
            return 0.0
        entry = (self._prefix[start:end] - self._prefix[start]) / speed
        return float(np.max(entry + self.output_lens[start:end] * step_s))
