"""Parquet over fsspec: the input dataset as metadata, row ranges read on demand, shards written.

The coordinator only ever reads footers (files, row groups, row counts); workers read the row
groups that overlap their unit. Nothing reads the whole dataset into one process.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from hetbatch.errors import UserError
from hetbatch.io import jsonl
from hetbatch.io.fs import (
    FileSequence,
    filesystem,
    filesystem_of,
    list_input_files,
    one_line,
    protocol_of,
    shown_path,
)

# Bytes read from the end of each input file in the first pass: the footer of a typical file
# fits, so one ranged read per file is the whole cost; a larger footer costs one more.
FOOTER_GUESS_BYTES = 64 << 10


@dataclass(frozen=True)
class InputFile:
    """One input file: where its rows sit in the global row numbering, and its row groups."""

    path: str
    first_row: int
    row_group_rows: tuple[int, ...]
    size: int

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class InputDataset(FileSequence):
    """The input as metadata only: files in a fixed order with global row offsets."""

    protocol: str
    files: tuple[InputFile, ...]
    schema: pa.Schema
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def row_group_boundaries(self) -> list[int]:
        """Global row indices where a row group starts: preferred cut points for units."""
        cuts = []
        for f in self.files:
            start = f.first_row
            for n in f.row_group_rows:
                cuts.append(start)
                start += n
        return cuts


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether a filesystem is this machine's disk (fsspec names it "file" or "local")."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


_OPENED: dict[tuple[str, str, str], tuple[Any, list[tuple[str, pq.FileMetaData]]]] = {}
FooterInspector = Callable[[str, pq.FileMetaData], None]


def open_dataset(
    url: str,
    needed_columns: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    inspect: FooterInspector | None = None,
    input_format: str = "parquet",
) -> Any:
    """Read the footers of every input file (in parallel) and check the schema once, up front.

    The dataset is listed once and each footer read once per process (JSONL requests scanned
    once): planning and preparing a run share the result. `inspect` sees each file's footer
    (shown path, metadata), e.g. for column statistics.
    """
    options = storage_options or {}
    key = (input_format, url, json.dumps(options, sort_keys=True))
    if key not in _OPENED:
        if input_format == jsonl.FORMAT:
            _OPENED[key] = (jsonl.open_jsonl(url, options), [])
        else:
            _OPENED[key] = _open_dataset(url, options)
    dataset, footers = _OPENED[key]
    if isinstance(dataset, jsonl.JsonlDataset):
        return dataset
    shown = shown_path(dataset.protocol, dataset.files[0].path)
    _check_columns(shown, dataset.schema, needed_columns)
    if inspect is not None:
        for shown, meta in footers:
            inspect(shown, meta)
    return dataset


def _open_dataset(
    url: str, storage_options: dict[str, Any]
) -> tuple[InputDataset, list[tuple[str, pq.FileMetaData]]]:
    fs, path = filesystem(url, storage_options)
    sizes = list_input_files(fs, path, url, (".parquet", ".parq", ".pq"), "Parquet")
    protocol = protocol_of(fs)
    footers = read_footers(fs, sizes)
    kept: list[tuple[str, pq.FileMetaData]] = []
    files: list[InputFile] = []
    schema: pa.Schema | None = None
    first_row = 0
    for file_path, size in sizes.items():
        shown = shown_path(protocol, file_path)
        try:
            meta = footers[file_path]
            if isinstance(meta, Exception):
                raise meta
            file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{shown}: not a readable Parquet file ({one_line(exc)})") from None
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise UserError(
                f"{shown}: schema differs from the first input file: {_diff(schema, file_schema)}"
            )
        kept.append((shown, meta))
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        files.append(InputFile(file_path, first_row, rows, size))
        first_row += sum(rows)
    assert schema is not None
    if first_row == 0:
        raise UserError(f"{url}: the input dataset has no rows")
    return InputDataset(protocol, tuple(files), schema, dict(storage_options)), kept


def read_footers(
    fs: fsspec.AbstractFileSystem, sizes: dict[str, int]
) -> dict[str, pq.FileMetaData | Exception]:
    """Parquet footers of many files, read as ranged reads of their tails in parallel.

    Object-store drivers run the reads of one `cat_ranges` call concurrently; a footer larger
    than the first guess costs its file one more read. A file that is not Parquet maps to its
    error, reported by the caller with the file's name.
    """
    paths = list(sizes)
    tails = _cat_tails(fs, paths, [min(sizes[p], FOOTER_GUESS_BYTES) for p in paths], sizes)
    short = {}
    for p, tail in tails.items():
        if isinstance(tail, bytes) and len(tail) >= 8 and tail[-4:] == b"PAR1":
            need = int.from_bytes(tail[-8:-4], "little") + 8
            if need > len(tail) and need <= sizes[p]:
                short[p] = need
    if short:
        tails.update(_cat_tails(fs, list(short), list(short.values()), sizes))
    return {p: _parse_footer(tail) for p, tail in tails.items()}


def _cat_tails(
    fs: fsspec.AbstractFileSystem, paths: list[str], lengths: list[int], sizes: dict[str, int]
) -> dict[str, bytes | Exception]:
    if not paths:
        return {}
    ends = [sizes[p] for p in paths]
    starts = [end - n for end, n in zip(ends, lengths, strict=True)]
    try:
        data = fs.cat_ranges(paths, starts, ends, on_error="return")
    except Exception as exc:
        data = [exc] * len(paths)
    return dict(zip(paths, data, strict=True))


def _parse_footer(tail: bytes | Exception) -> pq.FileMetaData | Exception:
    if isinstance(tail, Exception):
        return OSError(one_line(tail))
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        return pa.ArrowInvalid("no Parquet magic bytes at the end of the file")
    try:
        return pq.read_metadata(pa.BufferReader(tail))
    except (pa.ArrowInvalid, OSError) as exc:
        return exc


def _check_columns(path: str, schema: pa.Schema, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise UserError(
            f"{path}: column {missing[0]!r} not found (columns: {', '.join(schema.names)})"
        )


def _diff(a: pa.Schema, b: pa.Schema) -> str:
    for field in a:
        if field.name not in b.names:
            return f"column {field.name!r} missing"
        if not b.field(field.name).type.equals(field.type):
            return f"column {field.name!r} is {b.field(field.name).type}, expected {field.type}"
    extra = [n for n in b.names if n not in a.names]
    return f"extra column {extra[0]!r}" if extra else "column order differs"


def read_rows(dataset: Any, start: int, end: int, columns: Sequence[str]) -> pa.Table:
    """Read global rows [start, end), touching only the row groups that overlap them."""
    if isinstance(dataset, jsonl.JsonlDataset):
        return jsonl.read_rows(dataset, start, end)
    fs = filesystem_of(dataset.protocol, dataset.storage_options)
    starts = [f.first_row for f in dataset.files]
    pieces = []
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(dataset.files) and dataset.files[i].first_row < end:
        pieces.append(_read_file_slice(fs, dataset.files[i], start, end, columns))
        i += 1
    table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    if table.num_rows != end - start:
        raise RuntimeError(f"read {table.num_rows} rows for range [{start}, {end})")
    return table


def _read_file_slice(
    fs: fsspec.AbstractFileSystem, f: InputFile, start: int, end: int, columns: Sequence[str]
) -> pa.Table:
    lo, hi = max(start, f.first_row) - f.first_row, min(end, f.first_row + f.num_rows) - f.first_row
    groups, group_start, offset = [], 0, None
    for g, n in enumerate(f.row_group_rows):
        if group_start < hi and group_start + n > lo:
            groups.append(g)
            offset = group_start if offset is None else offset
        group_start += n
    sized = {} if is_local(fs) else {"size": f.size}  # the size is known: no request for it
    with fs.open(f.path, "rb", **sized) as fh:
        table = pq.ParquetFile(fh).read_row_groups(groups, columns=list(columns))
    return table.slice(lo - (offset or 0), hi - lo)


SHARD_SUFFIXES = (".parquet", ".jsonl")


def shard_name(
    start: int, end: int, suffix: str = ".parquet", above: int = 0, top: int | None = None
) -> str:
    """Output shards are named after their input row range, so they sort in input order. A
    shard holding only the rows of its range whose context need (prompt plus max_tokens) is
    in (above, top] says so: `part-S-E.need-ABOVE-TOP` (TOP `max`: no upper bound)."""
    band = "" if (above, top) == (0, None) else f".need-{above}-{'max' if top is None else top}"
    return f"part-{start:012d}-{end:012d}{band}{suffix}"


def parse_shard(name: str) -> tuple[int, int, int, int | None] | None:
    """(start, end, above, top) of a shard's name; None for a name that is not a shard's."""
    stem = name.rsplit("/", 1)[-1]
    suffix = next((s for s in SHARD_SUFFIXES if stem.endswith(s)), None)
    if not (stem.startswith("part-") and suffix):
        return None
    stem = stem[len("part-") : -len(suffix)]
    rows, _, band = stem.partition(".need-")
    try:
        a, b = rows.split("-")
        above, top = (0, None) if not band else band.split("-")
        return int(a), int(b), int(above), None if top in (None, "max") else int(top)
    except ValueError:
        return None


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """The row range of a shard's name (whatever rows of it the shard holds)."""
    found = parse_shard(name)
    return None if found is None else found[:2]


def write_table(
    url: str, table: pa.Table, compression: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Write one Parquet file in a single pass (callers publish it by renaming)."""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh, compression=parquet_compression(compression))


def parquet_compression(compression: str) -> str | None:
    return None if compression == "none" else compression


def dataset_to_dict(dataset: Any) -> dict:
    """Serialisable form, sent to workers so that they need not list the input again."""
    if isinstance(dataset, jsonl.JsonlDataset):
        return jsonl.dataset_to_dict(dataset)
    return {
        "protocol": dataset.protocol,
        "files": [
            {
                "path": f.path,
                "first_row": f.first_row,
                "row_groups": list(f.row_group_rows),
                "size": f.size,
            }
            for f in dataset.files
        ],
        "schema": base64.b64encode(dataset.schema.serialize().to_pybytes()).decode(),
        "storage_options": dataset.storage_options,
    }


def dataset_from_dict(data: dict) -> Any:
    if data.get("format") == jsonl.FORMAT:
        return jsonl.dataset_from_dict(data)
    files = tuple(
        InputFile(f["path"], f["first_row"], tuple(f["row_groups"]), f["size"])
        for f in data["files"]
    )
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["schema"])))
    return InputDataset(data["protocol"], files, schema, data.get("storage_options") or {})
