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

    def __init__(
        self,
        input_lens: np.ndarray,
        output_lens: np.ndarray,
        prefill_cost: float = 0.05,
        needs: np.ndarray | None = None,
    ):
        if len(input_lens) != len(output_lens):
            raise ValueError("input and output lengths differ in count")
        self.output_lens = np.asarray(output_lens, dtype=np.int32)
        # Context each row needs (prompt plus max_tokens), for jobs whose pools differ in it.
        self.needs = None if needs is None else np.asarray(needs, dtype=np.int64)
        cost = self.output_lens + prefill_cost * np.asarray(input_lens, dtype=np.float64)
        self._prefix = np.concatenate([[0.0], np.cumsum(cost)])
        self._period = len(self.output_lens)
        self._rows = self._period

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

    @classmethod
    def tiled(cls, rows: int, block: RowWork) -> RowWork:
        """`rows` rows whose lengths repeat those of `block`, block after block: a job of a
        billion rows in the memory of a sample of a few million (units are far smaller than a
        block, so no scheduling decision can tell the difference)."""
        work = cls.__new__(cls)
        work.output_lens, work._prefix, work.needs = block.output_lens, block._prefix, None
        work._period, work._rows = block._period, rows
        return work

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def total(self) -> float:
        return self._cumulative(self._rows)

    def _cumulative(self, row: int) -> float:
        """Work of rows [0, row)."""
        blocks, offset = divmod(row, self._period)
        return float(blocks * self._prefix[-1] + self._prefix[offset])

    def cost(self, start: int, end: int) -> float:
        if end <= self._period:
            return float(self._prefix[end] - self._prefix[start])
        return self._cumulative(end) - self._cumulative(start)

    def drain_s(self, start: int, end: int, speed: float, step_s: float) -> float:
        """Seconds from a unit's first request to its last completion on a full engine.

        Row j enters once the rows before it have gone through (`cost / speed`) and then
        decodes one token a step for its own output: the unit ends with the latest of these,
        not with its last submission, so a long request late in a big unit counts as it does
        in a real engine.
        """
        if end <= start:
            return 0.0
        if end <= self._period:
            entry = (self._prefix[start:end] - self._prefix[start]) / speed
            return float(np.max(entry + self.output_lens[start:end] * step_s))
        rows = np.arange(start, end)
        blocks, offset = np.divmod(rows, self._period)
        done_before = blocks * self._prefix[-1] + self._prefix[offset] - self._cumulative(start)
        return float(np.max(done_before / speed + self.output_lens[offset] * step_s))

    def rows_run(
        self, start: int, end: int, above: int, below: int, context: int, final: bool
    ) -> np.ndarray:
        """Which rows of [start, end) an instance of `context` runs when dealt them as rows
        needing more than `above` and at most `below` (a mask; rows it cannot hold are handed
        back, or written as errors at no cost when the unit is `final`)."""
        needs = self.needs[start:end]
        return (needs > above) & (needs <= below) & (final | (needs <= context))

    def hands_back(self, start: int, end: int, below: int, context: int) -> bool:
        """Whether rows of [start, end) up to `below` need more than `context`."""
        needs = self.needs[start:end]
        return bool(np.any((needs > context) & (needs <= below)))

    def masked(self, start: int, end: int, mask: np.ndarray, speed: float, step_s: float):
        """(pipeline seconds, drain seconds) of the rows of [start, end) under `mask`."""
        cost = np.diff(self._prefix[start : end + 1]) * mask
        entry = (np.cumsum(cost) - cost) / speed
        drain = float(np.max(entry + self.output_lens[start:end] * step_s * mask, initial=0.0))
        return float(cost.sum()) / speed, drain
