"""Prefix order: rows that share a prompt prefix dealt next to each other, in bounded windows.

vLLM's prefix cache only saves a shared prefix's prefill when the rows that share it reach the
same engine close together in time. With prefix order on, the scheduler's row ranges are not
ranges of input rows but of a *dealing order*: the input is cut into windows of `window_rows`
consecutive rows, and within a window rows are ordered by their prompt text (so rows with a
common prefix sit together, longest shared prefixes closest), ties kept in input order. The
order is a pure function of the window's rows, so every worker, every run and every resume
computes the same one; position `p` of the dealing order is one input row, and exactly-once
by range still holds. Nothing is sorted globally: a worker reads the window(s) its unit
overlaps, and the coordinator knows nothing of the order (its memory stays O(units)).

Output rows carry their input row index (`row_id`) or id, never their position.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from hetbatch.io.parquet import read_rows
from hetbatch.io.sample import InputSample, prompt_columns, read_sample
from hetbatch.prompts import RowError, row_prompt
from hetbatch.spec import JobSpec, template_fields

# Characters of a prompt that order it: enough to see any shared prefix worth caching, few
# enough that ordering a window costs little.
KEY_CHARS = 4096
# Rows share a "long" prefix when their first this many characters agree.
LONG_PREFIX_CHARS = 256
CACHED_WINDOWS = 2  # a worker's units usually follow on within one window


def prefix_key(job: JobSpec, row: dict[str, Any], fields: list[str]) -> str:
    """The text a row is ordered by: its prompt before the chat template (the template adds
    the same text to every row), or its messages as JSON; "" for a row that will fail."""
    try:
        if job.input.format == "openai-batch":
            from hetbatch.openai_batch import RequestError, parse_request

            try:
                prompt: Any = parse_request(row["request"])[2]
            except RequestError:
                return ""
        else:
            prompt = row_prompt(job, row, fields)
    except RowError:
        return ""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return text[:KEY_CHARS]


def window_order(keys: Sequence[str]) -> list[int]:
    """Offsets of a window's rows in dealing order: by key, ties in input order."""
    return sorted(range(len(keys)), key=keys.__getitem__)


def key_columns(job: JobSpec) -> list[str]:
    """The input columns a row's ordering key is made from."""
    return prompt_columns(job)


@dataclass(frozen=True)
class PrefixOrder:
    """Windows of `window_rows` input rows (the last one shorter), each in dealing order."""

    window_rows: int
    total_rows: int

    def windows(self, start: int, end: int) -> list[tuple[int, int]]:
        """Bounds of the windows that positions [start, end) overlap."""
        w = self.window_rows
        first, last = start // w, (end - 1) // w
        return [(k * w, min((k + 1) * w, self.total_rows)) for k in range(first, last + 1)]

    def boundaries(self) -> list[int]:
        """Window starts: where units are best cut, so that a unit reads one window."""
        return list(range(0, self.total_rows, self.window_rows))


class OrderedReader:
    """Reads units of the dealing order for one worker, keeping the last windows it read."""

    def __init__(
        self, job: JobSpec, dataset: Any, order: PrefixOrder, columns: Sequence[str]
    ) -> None:
        self.job = job
        self.dataset = dataset
        self.order = order
        self.columns = list(columns)
        self._fields = template_fields(job.prompt_template or "")
        self._windows: OrderedDict[int, tuple[pa.Table, list[int]]] = OrderedDict()

    def read(self, start: int, end: int) -> tuple[pa.Table, list[int]]:
        """Rows at positions [start, end) of the dealing order, and their input row indices."""
        tables, rows = [], []
        for lo, hi in self.order.windows(start, end):
            table, offsets = self._window(lo, hi)
            picked = offsets[max(start, lo) - lo : min(end, hi) - lo]
            tables.append(table.take(pa.array(picked, pa.int64())))
            rows.extend(lo + i for i in picked)
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table, rows

    def _window(self, lo: int, hi: int) -> tuple[pa.Table, list[int]]:
        cached = self._windows.get(lo)
        if cached is not None:
            self._windows.move_to_end(lo)
            return cached
        table = read_rows(self.dataset, lo, hi, self.columns)
        source = table.select(key_columns(self.job)).to_pylist()
        offsets = window_order([prefix_key(self.job, row, self._fields) for row in source])
        self._windows[lo] = (table, offsets)
        while len(self._windows) > CACHED_WINDOWS:
            self._windows.popitem(last=False)
        return table, offsets


def shares_long_prefixes(keys: Sequence[Sequence[str]]) -> bool:
    """Whether a sample of prompts (in chunks of consecutive rows) would gain from prefix
    order: at least half the rows share their first LONG_PREFIX_CHARS characters with another
    sampled row, and the input does not already keep such rows together (neighbours within a
    chunk share them less than half as often)."""
    leads = [[k[:LONG_PREFIX_CHARS] for k in chunk if len(k) >= LONG_PREFIX_CHARS]
             for chunk in keys]
    total = sum(len(k) for k in keys)
    if not total:
        return False
    counts = Counter(lead for chunk in leads for lead in chunk)
    shared = sum(n for n in counts.values() if n > 1) / total
    pairs = sum(max(len(chunk) - 1, 0) for chunk in keys)
    together = sum(
        a == b for chunk in leads for a, b in itertools.pairwise(chunk)
    ) / max(pairs, 1)
    return shared >= 0.5 and together < shared / 2


def sampled_keys(job: JobSpec, sample: InputSample) -> list[list[str]]:
    """Ordering keys of the sample's chunks of consecutive input rows."""
    fields = template_fields(job.prompt_template or "")
    return [[prefix_key(job, row, fields) for row in chunk] for chunk in sample.chunks]


def resolve_window(
    job: JobSpec, dataset: Any, sample: InputSample | Callable[[], InputSample] | None = None
) -> int | None:
    """The job's prefix order for a fresh run: its window, or None when rows are dealt in
    input order (`prefix_groups: false`, or `auto` and the sample shows no gain). `sample`:
    the input's sample as the planner reads it (or what reads it once); else read here."""
    setting = job.scheduler.prefix_groups
    if setting == "auto":
        if callable(sample):
            sample = sample()
        setting = shares_long_prefixes(sampled_keys(job, sample or read_sample(job, dataset)))
    return job.scheduler.prefix_window_rows if setting else None
