"""The output directory: published shards, the durable ledger, and the job's records.

The layout of an output directory is named in `hetbatch.io.paths`.

Workers write to staging; only the coordinator publishes (renames) a shard, after the scheduler
accepted its commit, and appends the ledger line afterwards. A crash between the two leaves a
published shard with no ledger line: recovery adopts it, since a published shard is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

from hetbatch.io.parquet import parse_shard_name
from hetbatch.io.paths import OutputPaths

META_DIR = OutputPaths.META_DIR
SUCCESS = OutputPaths.SUCCESS


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

    def to_json(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"))


class OutputStore:
    """Everything the coordinator reads and writes under the job's output path."""

    def __init__(self, url: str) -> None:
        self.paths = OutputPaths(url)
        self.url, self.fs, self.root = self.paths.url, self.paths.fs, self.paths.root
        self.local = self.paths.local
        self._records: list[CommitRecord] = []

    # -- paths --------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return self.paths.path(*parts)

    def url_of(self, *parts: str) -> str:
        return self.paths.url_of(*parts)

    def staging_url(self, name: str) -> str:
        return self.url_of(OutputPaths.staging(name))

    # -- state --------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.fs.exists(self.path(OutputPaths.JOB))

    def has_foreign_content(self) -> bool:
        """Files that hetbatch did not write: refuse to mix a job into someone else's folder."""
        if not self.fs.exists(self.root):
            return False
        return any(
            not (n.startswith(("part-", "_", ".")))
            for n in (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        )

    def is_complete(self) -> bool:
        return self.fs.exists(self.path(SUCCESS))

    def read_json(self, name: str) -> Any:
        """Read one of the job's records by its `OutputPaths` name."""
        with self.fs.open(self.path(name), "r") as fh:
            return json.load(fh)

    def write_json(self, name: str, data: Any) -> None:
        """Write a small metadata file by rename, so a reader never sees half of it."""
        target = self.path(name)
        tmp = target + ".tmp"
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        self.fs.mv(tmp, target)

    def wipe(self) -> None:
        """Remove what an earlier run wrote (for --overwrite)."""
        if not self.fs.exists(self.root):
            return
        for p in self.fs.ls(self.root, detail=False):
            name = p.rsplit("/", 1)[-1]
            if name.startswith("part-") or name in (META_DIR, SUCCESS):
                self.fs.rm(p, recursive=True)

    # -- ledger -------------------------------------------------------------------------------

    def recover(self) -> list[CommitRecord]:
        """Load the ledger, adopt published shards it lacks, and drop unpublished staging."""
        self._records = self.read_ledger()
        known = {(r.start, r.end) for r in self._records}
        for start, end in self.published_ranges():
            if (start, end) not in known:
                self.append(CommitRecord(start, end, instance="recovered"))
        staging = self.path(OutputPaths.STAGING)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        return list(self._records)

    def published_ranges(self) -> list[tuple[int, int]]:
        if not self.fs.exists(self.root):
            return []
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return sorted(r for r in map(parse_shard_name, names) if r is not None)

    def read_ledger(self) -> list[CommitRecord]:
        path = self.path(OutputPaths.LEDGER)
        if not self.fs.exists(path):
            return []
        records = []
        with self.fs.open(path, "r") as fh:
            for line in fh:
                try:
                    records.append(CommitRecord(**json.loads(line)))
                except (ValueError, TypeError):
                    break  # a torn last line from a crash mid-append
        return records

    def append(self, record: CommitRecord) -> None:
        """Durably record one committed unit (fsync on local disks)."""
        self._records.append(record)
        path = self.path(OutputPaths.LEDGER)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as fh:
                fh.write(record.to_json() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        else:  # object stores cannot append: rewrite the whole (small) ledger
            with self.fs.open(path, "w") as fh:
                fh.write("".join(r.to_json() + "\n" for r in self._records))

    @property
    def records(self) -> list[CommitRecord]:
        return list(self._records)

    # -- shards -------------------------------------------------------------------------------

    def publish(self, staging_url: str, start: int, end: int) -> str:
        """Move a staged shard to its final name; on local disks this is an atomic rename."""
        _, src = url_to_fs(staging_url)
        dst = self.path(OutputPaths.shard(start, end))
        self.fs.mv(src, dst)
        return dst

    def discard(self, staging_url: str) -> None:
        _, src = url_to_fs(staging_url)
        if self.fs.exists(src):
            self.fs.rm(src)

    def mark_success(self) -> None:
        with self.fs.open(self.path(SUCCESS), "w") as fh:
            fh.write("")
