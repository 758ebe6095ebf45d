"""Every path of a job's output folder, named in one place.

    part-000000000000-000000000250.parquet   one shard per committed unit, named by row range
                                             (.jsonl in OpenAI's batch output layout)
    part-...-....need-4096-max.parquet       a unit's rows needing more than 4,096 tokens of
                                             context (rows dealt by the context they need)
    errors/part-...-....jsonl                OpenAI batch layout: the failed rows again
    _SUCCESS                                 written last, when every row is committed
    _hetbatch/job.json                       the resolved job and the input's fingerprint
    _hetbatch/layout.json                    the instances: pool, node, devices, engine args
    _hetbatch/plan.json                      the planner's sizing, when it sized a pool
    _hetbatch/ledger.jsonl                   one line per committed unit, appended and fsynced
    _hetbatch/ledger/RUN-SEQ.jsonl           object stores: ledger segments not yet compacted
    _hetbatch/metrics.json                   per-instance rows, tokens, busy time, tokens/s
    _hetbatch/coordinator.json               where the running coordinator listens, its epoch
    _hetbatch/token                          the job's secret (owner-only) for Slurm workers
    _hetbatch/staging/                       shards written by workers, not yet published
    _hetbatch/slurm.json                     the Slurm jobs submitted for this output
    _hetbatch/slurm/                         the sbatch scripts as submitted
    _hetbatch/logs/                          worker and Slurm job logs (local outputs only)

Names are relative to the output folder, so the same name serves a local disk and an object
store; `OutputPaths` turns them into paths and URLs on the output's fsspec filesystem.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.dirfs import DirFileSystem

from hetbatch.io.fs import filesystem
from hetbatch.io.parquet import is_local, shard_name


class OutputPaths:
    """The names of everything hetbatch keeps in an output folder, and where they live."""

    META_DIR = "_hetbatch"
    SUCCESS = "_SUCCESS"
    JOB = f"{META_DIR}/job.json"
    LAYOUT = f"{META_DIR}/layout.json"
    PLAN = f"{META_DIR}/plan.json"
    LEDGER = f"{META_DIR}/ledger.jsonl"
    LEDGER_SEGMENTS = f"{META_DIR}/ledger"  # object stores: segments not yet compacted
    METRICS = f"{META_DIR}/metrics.json"
    COORDINATOR = f"{META_DIR}/coordinator.json"
    TOKEN = f"{META_DIR}/token"
    STAGING = f"{META_DIR}/staging"
    SLURM_RECORD = f"{META_DIR}/slurm.json"
    SLURM_SCRIPTS = f"{META_DIR}/slurm"
    LOGS = f"{META_DIR}/logs"
    ERRORS = "errors"  # OpenAI batch layout: each shard's failed rows again

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})

    @classmethod
    def of(cls, url: str, name: str) -> OutputPaths:
        """The output folder that holds `name` at `url` (e.g. from a coordinator.json URL)."""
        return cls(url.rstrip("/").rsplit("/", name.count("/") + 1)[0])

    @staticmethod
    def staging(file_name: str) -> str:
        return f"{OutputPaths.STAGING}/{file_name}"

    @staticmethod
    def shard(
        start: int, end: int, suffix: str = ".parquet", band: tuple[int, int | None] = (0, None)
    ) -> str:
        """`band`: the shard holds only its rows needing context in (above, top]."""
        return shard_name(start, end, suffix, *band)

    @staticmethod
    def errors_shard(start: int, end: int, band: tuple[int, int | None] = (0, None)) -> str:
        return f"{OutputPaths.ERRORS}/{shard_name(start, end, '.jsonl', *band)}"

    # The filesystem is opened on first use: naming a path needs no connection.
    @cached_property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(self.url, self.storage_options)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        """The output folder as a path on `fs`."""
        return self._fs_root[1]

    @cached_property
    def files(self) -> DirFileSystem:
        """The output folder as a filesystem of its own: open, exists, rm take the names above."""
        return DirFileSystem(path=self.root, fs=self.fs)

    @cached_property
    def local(self) -> bool:
        return is_local(self.fs)

    def path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def url_of(self, *names: str) -> str:
        return "/".join([self.url, *names])

    def local_dir(self, name: str) -> Path | None:
        """A folder of the output as a local Path, for processes that write plain files (logs,
        scripts); None when the output is not on this machine's disk."""
        return Path(self.path(name)) if self.local else None
