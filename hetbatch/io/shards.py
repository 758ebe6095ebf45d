"""Staging output shards so that only the coordinator can make them visible.

A worker stages a finished unit; the coordinator publishes it once it has accepted the commit,
or discards it. What "staged" means depends on the store:

- local disks and stores with a server-side copy (gs://, memory://): a file under
  `_hetbatch/staging/`, published by a rename (local) or a server-side copy and delete;
- S3: a multipart upload to the shard's final name, left uncompleted. An uncompleted upload is
  invisible to readers; the coordinator publishes it with one CompleteMultipartUpload request
  (no byte is copied) or aborts it. A lost worker's upload is never completed, so its late
  shard never appears.

The staging handle a worker sends with its commit is a plain string: the staged file's name, or
`upload-` followed by the upload's id and part tags, encoded.

A JSONL shard in OpenAI's batch layout may bring a companion, the unit's failed rows again
(`errors/part-<start>-<end>.jsonl`): staged beside it as `<name>.errors.jsonl` (or as a second
uncompleted upload named in the same handle) and published just before it, so a published
shard always has its errors file; one left alone by a crash is removed on resume.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hetbatch.io.fs import is_s3
from hetbatch.io.parquet import parquet_compression
from hetbatch.io.paths import OutputPaths

UPLOAD_PREFIX = "upload-"
PART_BYTES = 16 << 20  # S3 wants parts of at least 5 MiB, bar the last


@dataclass(frozen=True)
class PendingUpload:
    """An S3 multipart upload of a shard to its final key, not yet completed."""

    key: str
    upload_id: str
    etags: tuple[str, ...]
    companion: PendingUpload | None = None  # the errors file, completed first

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"k": self.key, "u": self.upload_id, "e": list(self.etags)}
        if self.companion is not None:
            fields["c"] = self.companion._fields()
        return fields

    def to_handle(self) -> str:
        raw = json.dumps(self._fields(), separators=(",", ":"))
        return UPLOAD_PREFIX + base64.urlsafe_b64encode(raw.encode()).decode()

    @classmethod
    def _of(cls, data: dict[str, Any]) -> PendingUpload:
        companion = cls._of(data["c"]) if data.get("c") else None
        etags = tuple(str(e) for e in data["e"])
        return cls(str(data["k"]), str(data["u"]), etags, companion)

    @classmethod
    def from_handle(cls, handle: str) -> PendingUpload | None:
        name = handle.rsplit("/", 1)[-1]
        if not name.startswith(UPLOAD_PREFIX):
            return None
        return cls._of(json.loads(base64.urlsafe_b64decode(name[len(UPLOAD_PREFIX) :])))

    def parts(self) -> list[dict[str, Any]]:
        return [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(self.etags)]


def stage_shard(
    output_url: str,
    storage_options: dict[str, Any],
    name: str,
    start: int,
    end: int,
    table: pa.Table,
    compression: str,
    band: tuple[int, int | None] = (0, None),
) -> str:
    """Stage one unit's output; returns the handle the coordinator publishes or discards.
    `band`: the unit holds only its rows needing context in (above, top]."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=parquet_compression(compression))
    paths = OutputPaths(output_url, storage_options)
    return _stage(paths, name, OutputPaths.shard(start, end, band=band), buffer.getvalue())


def stage_jsonl(
    output_url: str,
    storage_options: dict[str, Any],
    name: str,
    start: int,
    end: int,
    data: bytes,
    errors: bytes,
    band: tuple[int, int | None] = (0, None),
) -> str:
    """Stage one unit's JSONL shard and, when some rows failed, its errors file."""
    paths = OutputPaths(output_url, storage_options)
    shard = OutputPaths.shard(start, end, ".jsonl", band)
    errors_shard = OutputPaths.errors_shard(start, end, band)
    return _stage(paths, name, shard, data, (errors_shard, errors) if errors else None)


def _stage(
    paths: OutputPaths, name: str, shard: str, data: bytes, errors: tuple[str, bytes] | None = None
) -> str:
    """Stage `data` as `name` (and `errors` beside it, written first): files in the staging
    folder, or on S3 uncompleted uploads to the shard's final name and its errors file's."""
    fs = paths.fs
    if is_s3(fs):
        upload = upload_unfinished(fs, paths.path(shard), data)
        if errors is not None:
            errors_shard, errors_data = errors
            companion = upload_unfinished(fs, paths.path(errors_shard), errors_data)
            upload = replace(upload, companion=companion)
        return upload.to_handle()
    staged = [(name, data)] if errors is None else [(errors_name(name), errors[1]), (name, data)]
    for file_name, content in staged:
        path = paths.path(OutputPaths.staging(file_name))
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, content)
    return name


def errors_name(staged: str) -> str:
    """The staged errors file beside a staged JSONL shard."""
    return staged.removesuffix(".jsonl") + ".errors.jsonl"


def upload_unfinished(fs: Any, path: str, data: bytes) -> PendingUpload:
    """Upload `data` to `path` as a multipart upload and leave it uncompleted (invisible)."""
    bucket, key, _ = fs.split_path(path)
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    etags = []
    for number, offset in enumerate(range(0, max(len(data), 1), PART_BYTES), start=1):
        reply = fs.call_s3(
            "upload_part",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data[offset : offset + PART_BYTES],
        )
        etags.append(reply["ETag"])
    return PendingUpload(key, upload_id, tuple(etags))
