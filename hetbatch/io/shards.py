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
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hetbatch.io.fs import filesystem, is_s3
from hetbatch.io.parquet import parquet_compression, shard_name, write_table
from hetbatch.io.paths import OutputPaths

UPLOAD_PREFIX = "upload-"
PART_BYTES = 16 << 20  # S3 wants parts of at least 5 MiB, bar the last


@dataclass(frozen=True)
class PendingUpload:
    """An S3 multipart upload of a shard to its final key, not yet completed."""

    key: str
    upload_id: str
    etags: tuple[str, ...]

    def to_handle(self) -> str:
        fields = {"k": self.key, "u": self.upload_id, "e": list(self.etags)}
        raw = json.dumps(fields, separators=(",", ":"))
        return UPLOAD_PREFIX + base64.urlsafe_b64encode(raw.encode()).decode()

    @classmethod
    def from_handle(cls, handle: str) -> PendingUpload | None:
        name = handle.rsplit("/", 1)[-1]
        if not name.startswith(UPLOAD_PREFIX):
            return None
        data = json.loads(base64.urlsafe_b64decode(name[len(UPLOAD_PREFIX) :]))
        return cls(str(data["k"]), str(data["u"]), tuple(str(e) for e in data["e"]))

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
) -> str:
    """Stage one unit's output; returns the handle the coordinator publishes or discards."""
    fs, root = filesystem(output_url.rstrip("/"), storage_options)
    if not is_s3(fs):
        write_table(
            OutputPaths(output_url, storage_options).url_of(OutputPaths.staging(name)),
            table,
            compression,
            storage_options,
        )
        return name
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=parquet_compression(compression))
    return upload_unfinished(fs, f"{root}/{shard_name(start, end)}", buffer.getvalue())


def upload_unfinished(fs: Any, path: str, data: bytes) -> str:
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
    return PendingUpload(key, upload_id, tuple(etags)).to_handle()
