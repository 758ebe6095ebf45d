"""The scheduler's per-row bounds (`RowBounds`) from the input, before the job runs.

A job that names a per-row max_tokens column (`row_overrides.max_tokens`) says up front which
rows may decode longest. That column alone is streamed, one row group at a time (Parquet,
column-projected, local or object storage alike), keeping one figure per block of
`block_rows` rows: the block's largest need. Memory is O(blocks), whatever the input's size.

A row's need is its max_tokens (the job's `sampling.max_tokens` where the cell is null) plus
the mean prompt tokens of the input's sample: prompts are not read here (reading them is most
of the input), so a row is heavy by its max_tokens. The bounds only decide which rows are dealt
early and where a range is split; each half of a split range keeps its own rows by the need the
worker measures, so a wrong guess costs time, never a row.

The input and the job decide the bounds alone: a resumed job builds the same ones.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetbatch.errors import UserError
from hetbatch.io.fs import filesystem_of
from hetbatch.io.parquet import InputDataset, is_local
from hetbatch.scheduler.bounds import BLOCK_ROWS, HEAVY_RATIO, RowBounds

# Seconds of reading after which progress is shown on stderr.
PROGRESS_AFTER_S = 5.0


class BoundsBuilder:
    """Per-row needs fed in row order, in chunks; `bounds()` is what `RowBounds.from_rows`
    gives for all of them, with one figure per block kept."""

    def __init__(self, total_rows: int, block_rows: int = BLOCK_ROWS) -> None:
        self.total_rows, self.block_rows = total_rows, block_rows
        self.block_max = np.zeros(-(-total_rows // block_rows), np.int64)
        self.rows, self.sum = 0, 0

    def add(self, needs: np.ndarray) -> None:
        needs = np.asarray(needs, np.int64)
        if not len(needs):
            return
        blocks = (self.rows + np.arange(len(needs))) // self.block_rows
        np.maximum.at(self.block_max, blocks, needs)
        self.sum += int(needs.sum())
        self.rows += len(needs)

    def bounds(self) -> RowBounds:
        if self.rows != self.total_rows:
            raise RuntimeError(f"read {self.rows} row bounds for {self.total_rows} rows")
        if not self.rows:
            return RowBounds(1.0, 1, ())
        mean = max(self.sum / self.rows, 1.0)
        flags = self.block_max > int(HEAVY_RATIO * mean)
        edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        ranges = tuple(
            (int(a) * self.block_rows, min(int(b) * self.block_rows, self.rows))
            for a, b in zip(starts, ends, strict=True)
        )
        return RowBounds(mean, int(self.block_max.max()), ranges)


def needs_of(column: pa.ChunkedArray | pa.Array, default: int, prompt_tokens: int) -> np.ndarray:
    """A chunk's needs: its max_tokens cells (null: `default`) plus the prompt estimate.
    Raises ValueError for cells that are not whole numbers (those rows' errors are the
    worker's to write; the bounds are then not known)."""
    try:
        values = pc.fill_null(pc.cast(column, pa.int64()), default)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"not whole numbers: {exc}") from None
    return np.maximum(values.to_numpy(), 1) + prompt_tokens


def read_row_bounds(
    dataset: Any, column: str, default_max_tokens: int, prompt_tokens: int = 0,
    block_rows: int = BLOCK_ROWS,
) -> RowBounds:
    """Stream `column` of a Parquet dataset, one row group at a time, into `RowBounds`."""
    builder = BoundsBuilder(dataset.num_rows, block_rows)
    started, shown = time.monotonic(), -1.0
    for chunk in _column_chunks(dataset, column):
        builder.add(needs_of(chunk, default_max_tokens, prompt_tokens))
        elapsed = time.monotonic() - started
        if elapsed > PROGRESS_AFTER_S and elapsed - shown >= 1.0:
            shown = elapsed
            done = builder.rows / max(dataset.num_rows, 1)
            print(f"\rreading per-row max_tokens: {done:6.1%}", end="", file=sys.stderr)
    if shown >= 0:
        print(file=sys.stderr)
    return builder.bounds()


def read_max_tokens(dataset: Any, column: str, default_max_tokens: int) -> np.ndarray:
    """Every row's max_tokens (null: the job's), for the simulator: one figure per row."""
    parts = [needs_of(c, default_max_tokens, 0) for c in _column_chunks(dataset, column)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _column_chunks(dataset: Any, column: str) -> Iterator[pa.ChunkedArray]:
    """One column of a Parquet dataset, a row group at a time, in row order."""
    if not isinstance(dataset, InputDataset):
        raise UserError("per-row max_tokens are read from Parquet input only")
    fs = filesystem_of(dataset.protocol, dataset.storage_options)
    for f in dataset.files:
        sized = {} if is_local(fs) else {"size": f.size}
        with fs.open(f.path, "rb", **sized) as fh:
            pf = pq.ParquetFile(fh)
            for g in range(pf.num_row_groups):
                yield pf.read_row_group(g, columns=[column]).column(0)
