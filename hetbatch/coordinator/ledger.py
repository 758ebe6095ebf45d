"""The output directory: published shards, the durable ledger, and the job's records.

The layout of an output directory is named in `hetbatch.io.paths`.

Workers stage their shards (see `hetbatch.io.shards`); only the coordinator publishes one, after
the scheduler accepted its commit, and records it in the ledger afterwards. A crash between the
two leaves a published shard with no ledger line: recovery adopts it, since a published shard is
complete.

A commit costs O(1) store operations whatever the number of committed units: on a local disk a
line appended and fsynced, on an object store (which cannot append) a new small segment object.
The coordinator hands over each batch of commits at once (`append_many`): one write, one fsync
or one segment for the batch. Resuming reads the base ledger and the segments once, and
compacts them into the base.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from hetbatch.errors import UserError
from hetbatch.io.fs import is_s3, one_line
from hetbatch.io.parquet import parse_shard
from hetbatch.io.paths import OutputPaths
from hetbatch.io.shards import PendingUpload, errors_name

log = logging.getLogger("hetbatch.ledger")


@dataclass(frozen=True)
class CommitRecord:
    start: int
    end: int
    instance: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    at: float = 0.0  # wall time of the commit
    leased_at: float = 0.0  # wall time the unit was leased (0: not known)
    pool: str = ""
    stolen: bool = False  # rows taken from another instance's lease by a steal
    redealt: bool = False  # rows dealt before, returned when a lease lapsed or its holder left
    # Rows dealt by the context they need: the unit holds only its rows needing more than
    # `above` and at most `top` tokens (None: no upper bound); the others are in other units.
    above: int = 0
    top: int | None = None
    rows: int | None = None  # the rows it holds, when only some of its range's

    @property
    def row_count(self) -> int:
        """Output rows of the unit: its range's, or those of its band."""
        return self.end - self.start if self.rows is None else self.rows

    @property
    def band(self) -> tuple[int, int | None]:
        return self.above, self.top

    @property
    def key(self) -> tuple[int, int, int, int | None]:
        """What the unit's shard holds: the same rows are never in two records."""
        return self.start, self.end, self.above, self.top

    def to_json(self) -> str:
        data = dict(self.__dict__)
        if self.band == (0, None):  # every row of the range: as a ledger without bands reads
            del data["above"], data["top"], data["rows"]
        return json.dumps(data, separators=(",", ":"))


class PublishFailed(RuntimeError):
    """An accepted unit could not be published or recorded: the job must not be marked done."""


class OutputStore:
    """Everything the coordinator reads and writes under the job's output path.

    The coordinator's committer thread publishes accepted shards, records them and, last,
    marks the job a success; `_SUCCESS` is refused once a unit failed to publish or record.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.paths = OutputPaths(url, self.storage_options)
        self.url, self.fs, self.root = self.paths.url, self.paths.fs, self.paths.root
        self.local = self.paths.local
        self.s3 = is_s3(self.fs)
        self._records: list[CommitRecord] = []
        self._lock = threading.Lock()  # records, read from other threads while commits arrive
        self._io_lock = threading.Lock()  # one ledger write at a time
        self._run_id = secrets.token_hex(4)
        self._segments = 0
        self._failures: list[str] = []

    # -- paths --------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return self.paths.path(*parts)

    def url_of(self, *parts: str) -> str:
        return self.paths.url_of(*parts)

    def staging_url(self, name: str) -> str:
        return self.url_of(OutputPaths.staging(name))

    # -- state --------------------------------------------------------------------------------

    def _fresh(self, path: str | None = None) -> None:
        """Forget cached listings: other processes write here too."""
        if not self.local:
            self.fs.invalidate_cache(path)

    def exists(self) -> bool:
        """Whether a job has written here; the first access, so an unreachable store (no
        credentials, no network, no bucket) is reported here in one line."""
        self._fresh(self.path(OutputPaths.META_DIR))
        try:
            if self.fs.exists(self.path(OutputPaths.JOB)):
                return True
            bucket = "" if self.local else self.root.split("/", 1)[0]
            if bucket and bucket != self.root and not self.fs.exists(bucket):
                raise UserError(f"{self.url}: the bucket {bucket!r} does not exist")
            return False
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{self.url}: cannot reach the output: {one_line(exc)}") from None

    def has_foreign_content(self) -> bool:
        """Files that hetbatch did not write: refuse to mix a job into someone else's folder."""
        if not self.fs.exists(self.root):
            return False
        return any(
            not (n.startswith(("part-", "_", ".")) or n == OutputPaths.ERRORS)
            for n in (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        )

    def is_complete(self) -> bool:
        self._fresh(self.root)
        return self.fs.exists(self.path(OutputPaths.SUCCESS))

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.path(name), "r") as fh:
            return json.load(fh)

    def write_json(self, name: str, data: Any) -> None:
        """Write a small metadata file whole: a reader never sees half of it.

        Local disks: a temporary file renamed. Object stores: one PUT, atomic by itself.
        """
        target = self.path(name)
        text = json.dumps(data, indent=2, sort_keys=True)
        if not self.local:
            self.fs.pipe_file(target, text.encode())
            return
        tmp = target + ".tmp"
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(tmp, "w") as fh:
            fh.write(text)
        self.fs.mv(tmp, target)

    def wipe(self) -> None:
        """Remove what an earlier run wrote (for --overwrite)."""
        self._fresh(self.root)
        if not self.fs.exists(self.root):
            return
        for p in self.fs.ls(self.root, detail=False):
            name = p.rsplit("/", 1)[-1]
            kept_by_hetbatch = (OutputPaths.META_DIR, OutputPaths.SUCCESS, OutputPaths.ERRORS)
            if name.startswith("part-") or name in kept_by_hetbatch:
                self.fs.rm(p, recursive=True)
        self._abort_uploads()

    # -- ledger -------------------------------------------------------------------------------

    def recover(self) -> list[CommitRecord]:
        """Load the ledger, adopt published shards it lacks, drop unpublished staging, and
        compact an object store's ledger segments into one base object."""
        records, segments = self._read_all()
        known = {r.key for r in records}
        published = self.published_shards()
        adopted = [
            CommitRecord(start, end, instance="recovered", above=above, top=top)
            for start, end, above, top in published
            if (start, end, above, top) not in known
        ]
        self._drop_orphan_errors(published)
        if self.local:
            self._records = records
            if adopted:
                self.append_many(adopted)
        else:
            self._records = records + adopted
            if segments or adopted:
                self._compact(segments)
            self._abort_uploads()
        staging = self.path(OutputPaths.STAGING)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        return list(self._records)

    def published_ranges(self) -> list[tuple[int, int]]:
        """Row ranges of the published shards (a range twice when rows of it were dealt by
        the context they need, in shards of their own)."""
        return [shard[:2] for shard in self.published_shards()]

    def published_shards(self) -> list[tuple[int, int, int, int | None]]:
        """(start, end, above, top) of every published shard."""
        self._fresh(self.root)
        if not self.fs.exists(self.root):
            return []
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        found = [r for r in map(parse_shard, names) if r is not None]
        return sorted(found, key=lambda r: (r[0], r[1], r[2], -1 if r[3] is None else r[3]))

    def read_ledger(self) -> list[CommitRecord]:
        """Every committed unit on record (base ledger and segments), each once."""
        return self._read_all()[0]

    def _read_all(self) -> tuple[list[CommitRecord], list[str]]:
        base = self.path(OutputPaths.LEDGER)
        self._fresh(self.path(OutputPaths.META_DIR))
        texts = []
        if self.fs.exists(base):
            texts.append(self.fs.cat_file(base).decode())
        segments: list[str] = []
        if not self.local:
            folder = self.path(OutputPaths.LEDGER_SEGMENTS)
            self._fresh(folder)
            with contextlib.suppress(FileNotFoundError):
                segments = sorted(self.fs.ls(folder, detail=False))
            if segments:
                texts.extend(b.decode() for b in self.fs.cat(segments).values())
        records, seen = [], set()
        for text in texts:
            for record in _parse_lines(text):
                if record.key not in seen:
                    seen.add(record.key)
                    records.append(record)
        return records, segments

    def _compact(self, segments: list[str]) -> None:
        """Fold the segments into the base ledger: write the base whole, then drop them.

        A crash in between leaves records in both; reading takes each unit once."""
        text = "".join(r.to_json() + "\n" for r in self._records)
        self.fs.pipe_file(self.path(OutputPaths.LEDGER), text.encode())
        if segments:
            self.fs.rm(segments)

    def append(self, record: CommitRecord) -> None:
        """Durably record one committed unit; returns once it is on disk or in the store."""
        self.append_many([record])

    def append_many(self, records: list[CommitRecord]) -> None:
        """Durably record a batch of committed units in one write."""
        with self._io_lock:
            self._write(records)
        with self._lock:
            self._records.extend(records)

    def _write(self, batch: list[CommitRecord]) -> None:
        text = "".join(r.to_json() + "\n" for r in batch)
        if self.local:
            path = self.path(OutputPaths.LEDGER)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            return
        # Object stores cannot append: each write is a new small segment object.
        self._segments += 1
        name = f"{self._run_id}-{self._segments:09d}.jsonl"
        self.fs.pipe_file(self.path(OutputPaths.LEDGER_SEGMENTS, name), text.encode())

    @property
    def records(self) -> list[CommitRecord]:
        with self._lock:
            return list(self._records)

    # -- commits ------------------------------------------------------------------------------

    def note_failed(self, start: int, end: int, exc: BaseException) -> None:
        """An accepted unit that could not be published or recorded: `_SUCCESS` is refused."""
        with self._lock:
            self._failures.append(f"[{start}, {end}): {exc}")

    # -- shards -------------------------------------------------------------------------------

    def publish(
        self, handle: str, start: int, end: int, band: tuple[int, int | None] = (0, None)
    ) -> str:
        """Make a staged shard visible under its final name (a JSONL shard's errors file
        first, so that a published shard always has it). `band`: the shard holds only the
        rows of [start, end) needing context in (above, top].

        S3: complete the worker's multipart upload (one request, no bytes copied). Local disks:
        an atomic rename. Other stores: a server-side copy and delete.
        """
        upload = PendingUpload.from_handle(handle)
        if upload is not None:
            if not self._uploads_rows(upload, start, end, band):
                raise PublishFailed(f"upload for {upload.key!r} committed as [{start}, {end})")
            bucket, _, _ = self.fs.split_path(self.root)
            if upload.companion is not None:
                self._complete(bucket, upload.companion)
            self._complete(bucket, upload)
            return self.path(OutputPaths.shard(start, end, _suffix(upload.key), band))
        dst = self.path(OutputPaths.shard(start, end, _suffix(handle), band))
        src = self.path(OutputPaths.staging(handle))
        errors = errors_name(src)
        if src.endswith(".jsonl") and self.fs.exists(errors):
            target = self.path(OutputPaths.errors_shard(start, end, band))
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(errors, target)
        self.fs.mv(src, dst)
        return dst

    def _complete(self, bucket: str, upload: PendingUpload) -> None:
        self.fs.call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
            MultipartUpload={"Parts": upload.parts()},
        )

    def is_staged(
        self, handle: str, start: int, end: int, band: tuple[int, int | None] = (0, None)
    ) -> bool:
        """Whether a worker's staging handle names a shard that can be published as rows
        [start, end): an upload to that shard's key, or a file in the staging folder."""
        try:
            upload = PendingUpload.from_handle(handle)
        except (ValueError, KeyError, TypeError):
            return False  # not an upload handle hetbatch wrote
        if upload is not None:
            return self.s3 and self._uploads_rows(upload, start, end, band)
        try:
            return bool(self.fs.exists(self.path(OutputPaths.staging(handle))))
        except (OSError, ValueError):
            return False

    def _uploads_rows(
        self, upload: PendingUpload, start: int, end: int, band: tuple[int, int | None]
    ) -> bool:
        """Whether an upload (and its errors file's) goes to rows [start, end)'s final keys."""
        names = [(upload, OutputPaths.shard(start, end, _suffix(upload.key), band))]
        if upload.companion is not None:
            names.append((upload.companion, OutputPaths.errors_shard(start, end, band)))
        return all(part.key == self.fs.split_path(self.path(name))[1] for part, name in names)

    def discard(self, handle: str) -> None:
        """Drop a staged shard the scheduler refused (and its errors file)."""
        upload = PendingUpload.from_handle(handle)
        if upload is None:
            src = self.path(OutputPaths.staging(handle))
            for path in (src, errors_name(src)) if src.endswith(".jsonl") else (src,):
                if self.fs.exists(path):
                    self.fs.rm(path)
            return
        bucket, _, _ = self.fs.split_path(self.root)
        for part in (upload, upload.companion):
            if part is None:
                continue
            with contextlib.suppress(OSError):
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=part.key, UploadId=part.upload_id
                )

    def _drop_orphan_errors(self, published: list[tuple[int, int, int, int | None]]) -> None:
        """Remove errors files whose shard was never published (a crash between the two)."""
        folder = self.path(OutputPaths.ERRORS)
        self._fresh(folder)
        if not self.fs.exists(folder):
            return
        kept = set(published)
        for path in self.fs.ls(folder, detail=False):
            found = parse_shard(path)
            if found is not None and found not in kept:
                self.fs.rm(path)

    def _abort_uploads(self) -> None:
        """Abort shard uploads nobody will complete (a lost worker's, a discarded unit's)."""
        if not self.s3:
            return
        for start in ("part-", f"{OutputPaths.ERRORS}/part-"):
            self._abort_uploads_under(start)

    def _abort_uploads_under(self, start: str) -> None:
        bucket, prefix, _ = self.fs.split_path(self.path(start))
        marker: dict[str, str] = {}
        while True:
            reply = self.fs.call_s3(
                "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker
            )
            for u in reply.get("Uploads", []):
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]
                )
            if not reply.get("IsTruncated"):
                return
            marker = {
                "KeyMarker": reply["NextKeyMarker"],
                "UploadIdMarker": reply["NextUploadIdMarker"],
            }

    def mark_success(self) -> None:
        """Write `_SUCCESS`; the caller has published and recorded every accepted commit."""
        with self._lock:
            failures = list(self._failures)
        if failures:
            raise PublishFailed(
                f"{len(failures)} committed units failed to publish (first: {failures[0]}); "
                "run the job again to redo them"
            )
        self.fs.pipe_file(self.path(OutputPaths.SUCCESS), b"")
        if self.s3:
            with contextlib.suppress(OSError):
                self._abort_uploads()


def _suffix(name: str) -> str:
    """A staged shard's format, from its name or its upload's key."""
    return ".jsonl" if name.endswith(".jsonl") else ".parquet"


def _parse_lines(text: str) -> list[CommitRecord]:
    records = []
    for line in text.splitlines():
        try:
            records.append(CommitRecord(**json.loads(line)))
        except (ValueError, TypeError):
            break  # a torn last line from a crash mid-append
    return records
