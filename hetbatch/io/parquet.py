"""Parquet over fsspec: the input dataset as metadata, row ranges read on demand, shards written.

The coordinator only ever reads footers (files, row groups, row counts); workers read the row
groups that overlap their unit. Nothing reads the whole dataset into one process.
"""

from __future__ import annotations

import base64
import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from hetbatch.errors import UserError


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
class InputDataset:
    """The input as metadata only: files in a fixed order with global row offsets."""

    protocol: str
    files: tuple[InputFile, ...]
    schema: pa.Schema

    @property
    def num_rows(self) -> int:
        return self.files[-1].first_row + self.files[-1].num_rows if self.files else 0

    def fingerprint(self) -> list[dict]:
        """What identifies this input, so that a resume can refuse a changed dataset."""
        return [{"path": f.path, "rows": f.num_rows, "size": f.size} for f in self.files]

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


def _full_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _list_files(fs: fsspec.AbstractFileSystem, path: str, original: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        files = sorted(
            p
            for p in fs.find(path)
            if p.endswith((".parquet", ".parq", ".pq"))
            and not any(part.startswith(("_", ".")) for part in p[len(path) :].split("/"))
        )
    elif fs.exists(path):
        files = [path]
    else:
        raise UserError(f"{original}: input path does not exist")
    if not files:
        raise UserError(f"{original}: no Parquet files found")
    return files


def open_dataset(
    url: str,
    needed_columns: Sequence[str],
    inspect: Callable[[str, pq.FileMetaData], None] | None = None,
) -> InputDataset:
    """Read the footers of every input file and check the schema once, up front.

    `inspect` sees each file's footer (shown path, metadata), e.g. for column statistics."""
    fs, path = url_to_fs(url)
    files: list[InputFile] = []
    schema: pa.Schema | None = None
    first_row = 0
    for file_path in _list_files(fs, path, url):
        shown = _full_path(fs, file_path)
        try:
            with fs.open(file_path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{shown}: not a readable Parquet file ({exc})") from None
        if schema is None:
            schema = file_schema
            _check_columns(shown, schema, needed_columns)
        elif not file_schema.equals(schema):
            raise UserError(
                f"{shown}: schema differs from the first input file: {_diff(schema, file_schema)}"
            )
        if inspect is not None:
            inspect(shown, meta)
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        files.append(InputFile(file_path, first_row, rows, fs.size(file_path) or 0))
        first_row += sum(rows)
    assert schema is not None
    if first_row == 0:
        raise UserError(f"{url}: the input dataset has no rows")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return InputDataset(protocol, tuple(files), schema)


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


def read_rows(dataset: InputDataset, start: int, end: int, columns: Sequence[str]) -> pa.Table:
    """Read global rows [start, end), touching only the row groups that overlap them."""
    fs = fsspec.filesystem(dataset.protocol)
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
    with fs.open(f.path, "rb") as fh:
        table = pq.ParquetFile(fh).read_row_groups(groups, columns=list(columns))
    return table.slice(lo - (offset or 0), hi - lo)


def shard_name(start: int, end: int) -> str:
    """Output shards are named after their input row range, so they sort in input order."""
    return f"part-{start:012d}-{end:012d}.parquet"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    stem = name.rsplit("/", 1)[-1]
    if not (stem.startswith("part-") and stem.endswith(".parquet")):
        return None
    try:
        a, b = stem[len("part-") : -len(".parquet")].split("-")
        return int(a), int(b)
    except ValueError:
        return None


def write_table(url: str, table: pa.Table, compression: str) -> None:
    """Write one Parquet file in a single pass (callers publish it by renaming)."""
    fs, path = url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh, compression=None if compression == "none" else compression)


def dataset_to_dict(dataset: InputDataset) -> dict:
    """Serialisable form, sent to workers so that they need not list the input again."""
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
    }


def dataset_from_dict(data: dict) -> InputDataset:
    files = tuple(
        InputFile(f["path"], f["first_row"], tuple(f["row_groups"]), f["size"])
        for f in data["files"]
    )
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["schema"])))
    return InputDataset(data["protocol"], files, schema)
