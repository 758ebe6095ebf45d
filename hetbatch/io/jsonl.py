"""JSONL input over fsspec: one row per line, units of lines read without reading a file whole.

Units are row ranges like Parquet's, so the scheduler, the progress counts, the error budget,
stealing and the shard names all keep speaking rows. Opening the input scans each file once
(in parallel across files, in fixed-size blocks: bounded memory whatever the file's size),
counting lines and noting the byte offset of every `stride`-th line. A worker reading lines
[a, b) seeks to the checkpoint at or before a and skips fewer than `stride` lines. The scan
reads each byte once at storage speed, far less than the inference the lines ask for; units of
raw byte ranges would need no scan but would make every count a count of bytes.
"""

from __future__ import annotations

import bisect
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from hetbatch.errors import UserError
from hetbatch.io.fs import (
    FileSequence,
    filesystem,
    filesystem_of,
    list_input_files,
    one_line,
    protocol_of,
    shown_path,
)

FORMAT = "openai-batch"
SCAN_BLOCK_BYTES = 8 << 20
SCAN_STRIDE = 1024  # lines between checkpoints while scanning
MAX_CHECKPOINTS = 200_000  # over the whole input: keeps the job message small
SCHEMA = pa.schema([("custom_id", pa.string()), ("request", pa.string()), ("source", pa.string())])


@dataclass(frozen=True)
class JsonlFile:
    """One input file: its first global row, its line count, and checkpoint byte offsets
    (`offsets[j]` is where line `j * stride` starts)."""

    path: str
    first_row: int
    num_rows: int
    size: int
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class JsonlDataset(FileSequence):
    """The input as line counts and checkpoints: files in a fixed order with global row offsets."""

    protocol: str
    files: tuple[JsonlFile, ...]
    stride: int
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)
    schema: pa.Schema = field(default=SCHEMA, compare=False)

    def row_group_boundaries(self) -> list[int]:
        """File starts and checkpoints: units cut there start reading without skipping."""
        cuts = []
        for f in self.files:
            cuts.extend(f.first_row + j * self.stride for j in range(len(f.offsets)))
        return cuts

    def shown(self, f: JsonlFile) -> str:
        return shown_path(self.protocol, f.path)


def open_jsonl(url: str, storage_options: dict[str, Any] | None = None) -> JsonlDataset:
    """List the input's JSONL files and scan each once for its lines (files in parallel)."""
    fs, path = filesystem(url, storage_options)
    sizes = list_input_files(fs, path, url, (".jsonl", ".json"), ".jsonl")
    with ThreadPoolExecutor(min(8, len(sizes))) as pool:
        scans = list(pool.map(lambda p: _scan(fs, p, url), sizes))
    total_checkpoints = sum(len(offsets) for _, offsets in scans)
    thin = max(1, -(-total_checkpoints // MAX_CHECKPOINTS))
    files, first_row = [], 0
    for (file_path, size), (rows, offsets) in zip(sizes.items(), scans, strict=True):
        files.append(JsonlFile(file_path, first_row, rows, size, tuple(offsets[::thin])))
        first_row += rows
    if first_row == 0:
        raise UserError(f"{url}: the input holds no lines")
    options = dict(storage_options or {})
    return JsonlDataset(protocol_of(fs), tuple(files), SCAN_STRIDE * thin, options)


def _scan(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[int, list[int]]:
    """(lines, checkpoint offsets) of one file, read in blocks: a last line without a newline
    counts, an empty file has none."""
    offsets = [0]
    lines = 0
    position = 0
    last = b"\n"
    try:
        with fs.open(path, "rb", block_size=SCAN_BLOCK_BYTES) as fh:
            while block := fh.read(SCAN_BLOCK_BYTES):
                count = block.count(b"\n")
                next_mark = len(offsets) * SCAN_STRIDE  # line whose start is the next checkpoint
                if lines + count >= next_mark:
                    at, seen = -1, lines
                    while seen < lines + count:
                        at = block.index(b"\n", at + 1)
                        seen += 1
                        if seen == next_mark:
                            offsets.append(position + at + 1)
                            next_mark += SCAN_STRIDE
                lines += count
                position += len(block)
                last = block[-1:]
    except OSError as exc:
        raise UserError(f"{url}: cannot read {path}: {one_line(exc)}") from None
    if last != b"\n":
        lines += 1
    if offsets and offsets[-1] >= position and len(offsets) > 1:
        offsets.pop()  # a checkpoint at the very end starts no line
    return lines, offsets


def read_rows(dataset: JsonlDataset, start: int, end: int) -> pa.Table:
    """Global lines [start, end) as rows: custom_id (null when the line does not give one),
    the raw line, and where it is (`file:line`, for error messages)."""
    fs = filesystem_of(dataset.protocol, dataset.storage_options)
    starts = [f.first_row for f in dataset.files]
    ids: list[str | None] = []
    raw: list[str] = []
    sources: list[str] = []
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(dataset.files) and dataset.files[i].first_row < end:
        f = dataset.files[i]
        lo = max(start, f.first_row) - f.first_row
        hi = min(end, f.first_row + f.num_rows) - f.first_row
        shown = dataset.shown(f)
        for number, line in _lines(fs, f, dataset.stride, lo, hi):
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            raw.append(text)
            ids.append(custom_id(text))
            sources.append(f"{shown}:{number + 1}")
        i += 1
    if len(raw) != end - start:
        raise RuntimeError(f"read {len(raw)} lines for range [{start}, {end})")
    return pa.table([ids, raw, sources], schema=SCHEMA)


def _lines(fs: Any, f: JsonlFile, stride: int, lo: int, hi: int) -> Any:
    """(line number in the file, bytes) for lines [lo, hi) of one file."""
    checkpoint = min(lo // stride, len(f.offsets) - 1)
    number = checkpoint * stride
    with fs.open(f.path, "rb") as fh:
        fh.seek(f.offsets[checkpoint])
        for line in fh:
            if number >= hi:
                return
            if number >= lo:
                yield number, line
            number += 1
    while number < hi:  # never for a file as scanned; keeps the count honest if it shrank
        yield number, b""
        number += 1


def custom_id(line: str) -> str | None:
    """A request line's custom_id, or None when the line is not such a request."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) else None


def dataset_to_dict(dataset: JsonlDataset) -> dict:
    return {
        "format": FORMAT,
        "protocol": dataset.protocol,
        "stride": dataset.stride,
        "files": [
            {
                "path": f.path,
                "first_row": f.first_row,
                "rows": f.num_rows,
                "size": f.size,
                "offsets": list(f.offsets),
            }
            for f in dataset.files
        ],
        "storage_options": dataset.storage_options,
    }


def dataset_from_dict(data: dict) -> JsonlDataset:
    files = tuple(
        JsonlFile(f["path"], f["first_row"], f["rows"], f["size"], tuple(f["offsets"]))
        for f in data["files"]
    )
    return JsonlDataset(data["protocol"], files, data["stride"], data.get("storage_options") or {})
