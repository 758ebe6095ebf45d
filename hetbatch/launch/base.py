"""What every launcher shares: validate the job against its input and output, resume from the
ledger, and stand up the coordinator. A launcher subclass only decides where the coordinator and
the workers run (`launch`), and where the instances come from (`layout`).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from hetbatch.coordinator.bands import resume_state
from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.coordinator.server import Coordinator
from hetbatch.error_budget import BudgetConfig, ErrorBudget
from hetbatch.errors import UserError
from hetbatch.input_checks import check_input, id_statistics
from hetbatch.io.fs import filesystem
from hetbatch.io.parquet import InputDataset, dataset_to_dict, is_local, open_dataset
from hetbatch.io.paths import OutputPaths
from hetbatch.io.prefix_order import PrefixOrder, resolve_window
from hetbatch.io.sample import InputSample, read_sample
from hetbatch.layout import InstanceSpec, instance_layout, needs_plan
from hetbatch.prompts import input_columns
from hetbatch.report import summary_lines
from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import Scheduler, SchedulerConfig
from hetbatch.scheduler.ranges import RangeSet
from hetbatch.spec import JobSpec

if TYPE_CHECKING:
    from hetbatch.planner.types import ClusterPlan

# Fields of the job that change what the output holds: a resume must not mix two of them.
_OUTPUT_DEFINING = (
    "model", "input", "prompt_template", "chat", "sampling", "seed",
    "task", "structured_output", "row_overrides", "lora",
)


def _absolute(url: str) -> str:
    """Local paths become absolute, so that workers started elsewhere resolve them alike."""
    fs, _ = filesystem(url)
    if is_local(fs):
        return os.path.abspath(url.removeprefix("file://"))
    return url


def resolve_job(job: JobSpec) -> JobSpec:
    """The job with every local path made absolute and the model path checked."""
    model = job.model.path
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
    if looks_local:
        model = os.path.abspath(os.path.expanduser(model))
        if job.engine.kind == "vllm" and not os.path.isdir(model):
            raise UserError(f"model.path: {job.model.path}: no such model folder")
    return job.model_copy(
        update={
            "model": job.model.model_copy(update={"path": model}),
            "input": job.input.model_copy(update={"path": _absolute(job.input.path)}),
            "output": job.output.model_copy(update={"path": _absolute(job.output.path)}),
        }
    )


@dataclass
class PreparedRun:
    job: JobSpec
    dataset: InputDataset
    store: OutputStore
    instances: list[InstanceSpec]
    committed_rows: int
    already_complete: bool
    dry_run: bool = False  # prepared without writing anything: only to show what would run
    prefix_window_rows: int | None = None  # rows dealt in prefix order (windows this long)

    @property
    def total_rows(self) -> int:
        return self.dataset.num_rows


class Launcher(ABC):
    """Base of the local and Slurm launchers: `execute` is the step they share."""

    def __init__(
        self, job: JobSpec, overwrite: bool = False, calibration: str | None = None
    ) -> None:
        self.job = resolve_job(job)
        self.overwrite = overwrite
        self.calibration = calibration
        self.token = secrets.token_urlsafe(24)
        self.replanner: Any = None  # set by `_plan` when the job asks for re-planning
        self._sample: InputSample | None = None

    def execute(self, dry_run: bool = False) -> int:
        """Check and resume the job, then launch it; a complete job is only reported."""
        run = self.prepare(dry_run=dry_run)
        return self.on_complete(run) if run.already_complete else self.launch(run)

    @abstractmethod
    def launch(self, run: PreparedRun) -> int:
        """Run the coordinator and the workers of a prepared run, or hand them to a batch
        system; the exit code of the command."""

    def on_complete(self, run: PreparedRun) -> int:
        """Called instead of `launch` when the output is already complete."""
        print(f"already complete: {run.total_rows:,} rows in {run.job.output.path}")
        return 0

    def layout(self) -> tuple[list[InstanceSpec], ClusterPlan | None]:
        """The instances of every pool, planned where the job leaves it to the planner."""
        plan = self._plan()
        return instance_layout(self.job, plan), plan

    def prepare(self, dry_run: bool = False) -> PreparedRun:
        """Check everything a user can get wrong before anything is written.

        With `dry_run` the same checks run and nothing at all is written or removed.
        """
        job = self.job
        id_stats = id_statistics(job)
        dataset = open_dataset(
            job.input.path, input_columns(job), job.input.storage_options, inspect=id_stats,
            input_format=job.input.format,
        )
        check_input(job, dataset.schema, id_stats)
        store = OutputStore(job.output.path, job.output.storage_options)
        record = self._job_record(dataset)
        resuming = not self.overwrite and store.exists()
        if resuming:
            record["prefix_window_rows"] = self._recorded_prefix_order(store)
        else:
            record["prefix_window_rows"] = resolve_window(
                job, dataset, lambda: self._input_sample(dataset))
        window = record["prefix_window_rows"]
        if self.overwrite:
            if not dry_run:
                store.wipe()
        elif store.exists():
            self._check_same_job(store, record)
        elif store.has_foreign_content():
            raise UserError(
                f"{job.output.path}: output folder holds files hetbatch did not write; "
                "choose an empty or new folder"
            )
        instances, plan = self.layout()
        if dry_run:
            fresh = self.overwrite or not store.exists()
            complete = not fresh and store.is_complete()
            committed = 0 if fresh else _rows_of(store.read_ledger())
            return PreparedRun(job, dataset, store, instances, committed, complete, dry_run=True,
                               prefix_window_rows=window)
        complete = store.exists() and store.is_complete()
        committed = 0 if complete else _rows_of(store.recover())
        if complete:
            committed = dataset.num_rows
        else:
            store.write_json(OutputPaths.JOB, record)
            store.write_json(OutputPaths.LAYOUT, [i.__dict__ for i in instances])
            if plan is not None:
                store.write_json(OutputPaths.PLAN, plan.to_dict())
        return PreparedRun(job, dataset, store, instances, committed, complete,
                           prefix_window_rows=window)

    def _recorded_prefix_order(self, store: OutputStore) -> int | None:
        """A resumed job keeps the row order its output was started in: its ranges mean
        those rows. A job file that now asks for another order is refused."""
        recorded = store.read_json(OutputPaths.JOB).get("prefix_window_rows")
        setting = self.job.scheduler.prefix_groups
        if setting == "auto":
            return recorded
        wanted = self.job.scheduler.prefix_window_rows if setting else None
        if wanted != recorded:
            started = f"prefix_window_rows {recorded}" if recorded else "input order"
            raise UserError(
                f"{self.job.output.path}: holds output dealt in {started}, not as "
                "scheduler.prefix_groups/prefix_window_rows now ask; use --overwrite to start "
                "over, or another output path"
            )
        return recorded

    def _plan(self) -> ClusterPlan | None:
        """Size the pools that do not pin their layout; the plan's estimates seed capacity."""
        if not needs_plan(self.job):
            return None
        from hetbatch.planner.search import plan_cluster
        from hetbatch.planning import job_plan_inputs, load_calibration, replanner_for

        calibration = load_calibration(self.calibration) if self.calibration else None
        inputs = job_plan_inputs(self.job, calibration, sample=self._input_sample())
        plan = plan_cluster(inputs.model, inputs.pools, inputs.workload, catalog=inputs.catalog,
                            calibration=inputs.calibration, pool_workloads=inputs.pool_workloads)
        if self.job.replan.enabled:
            self.replanner = replanner_for(self.job, inputs, plan)
        return plan

    def _input_sample(self, dataset: InputDataset | None = None) -> InputSample:
        """The input's sample, read once for prefix detection and the planner alike."""
        if self._sample is None:
            self._sample = read_sample(self.job, dataset)
        return self._sample

    def _job_record(self, dataset: InputDataset) -> dict[str, Any]:
        spec = self.job.to_dict()
        defining = {k: spec[k] for k in _OUTPUT_DEFINING}
        defining["input"] = _without_storage(spec["input"])
        return {
            "spec": spec,
            "output_defining": defining,
            "input_files": dataset.fingerprint(),
            "rows": dataset.num_rows,
        }

    def _check_same_job(self, store: OutputStore, record: dict[str, Any]) -> None:
        old = store.read_json(OutputPaths.JOB)
        for key in _OUTPUT_DEFINING:
            recorded = _with_defaults(key, old["output_defining"].get(key, _default(key)))
            if recorded != record["output_defining"][key]:
                raise UserError(
                    f"{self.job.output.path}: holds the output of a job with a different "
                    f"`{key}`; use --overwrite to start over, or another output path"
                )
        formats = (old["spec"]["output"].get("format", "parquet"), self.job.output.format)
        if formats[0] != formats[1]:
            raise UserError(
                f"{self.job.output.path}: holds {formats[0]} output, not {formats[1]}; use "
                "--overwrite to start over, or another output path"
            )
        if old["input_files"] != record["input_files"]:
            raise UserError(
                f"{self.job.output.path}: the input files changed since this output was "
                "started; use --overwrite to start over"
            )

    def start_coordinator(self, run: PreparedRun) -> Coordinator:
        job = run.job
        cfg = job.scheduler
        committed, long_rows = resume_state(r.key for r in run.store.records)
        scheduler = Scheduler(
            run.dataset.num_rows,
            dataclasses.replace(
                SchedulerConfig.from_spec(cfg), follow_on=run.prefix_window_rows is not None
            ),
            committed=committed,
            boundaries=(
                run.dataset.row_group_boundaries() if run.prefix_window_rows is None
                else PrefixOrder(run.prefix_window_rows, run.total_rows).boundaries()
            ),
            bounds=self.row_bounds(run),
        )
        for span in long_rows:  # rows handed back before the job stopped
            scheduler.long_rows.add(span.start, span.end, span.above, span.below)
        coordinator = Coordinator(
            scheduler,
            run.store,
            self.worker_job(run),
            self.token,
            host=job.coordinator.host,
            port=job.coordinator.port,
            error_budget=ErrorBudget(
                BudgetConfig(max_error_rate=job.max_error_rate),
                rows_to_run=run.total_rows - run.committed_rows,
            ),
            replanner=self.replanner,
            replan_check_s=job.replan.check_s,
        )
        coordinator.start()
        if job.coordinator.metrics_port is not None:
            from hetbatch.prometheus import serve_metrics

            serve_metrics(coordinator, job.coordinator.metrics_port, job.coordinator.host)
        host, port = coordinator.address
        run.store.write_json(
            OutputPaths.COORDINATOR,
            {
                "host": advertised_host(host),
                "port": port,
                "pid": os.getpid(),
                # Tells workers that come back after an outage whether this is a new coordinator.
                "epoch": secrets.token_hex(8),
            },
        )
        return coordinator

    def row_bounds(self, run: PreparedRun) -> RowBounds | None:
        """What each row may cost, for dealing the heaviest early: from the job's per-row
        max_tokens column, streamed (only that column) from Parquet input in input order.
        None (input order) without that column, with `scheduler.longest_first: false`, or in
        prefix order (its positions are not input rows)."""
        job = run.job
        column = job.row_overrides.max_tokens
        if (column is None or not job.scheduler.longest_first or run.already_complete
                or run.prefix_window_rows is not None or job.input.format != "parquet"):
            return None
        from hetbatch.io.row_bounds import read_row_bounds

        default = int(job.sampling.get("max_tokens") or 16)
        try:
            return read_row_bounds(run.dataset, column, default, self._prompt_estimate(run))
        except ValueError as exc:
            print(f"row_overrides.max_tokens column {column!r}: {exc}; rows are dealt in "
                  "input order", file=sys.stderr)
            return None

    def _prompt_estimate(self, run: PreparedRun) -> int:
        """Mean prompt tokens of the input's sample (about four bytes a token): the part of
        each row's need its max_tokens column does not give."""
        column = run.job.input.prompt_column or run.job.input.messages_column
        if column is None:
            return 0
        import json

        from hetbatch.engines.simulated import approx_tokens

        rows = self._input_sample(run.dataset).rows
        texts = [v if isinstance(v := r.get(column), str) else json.dumps(v, default=str)
                 for r in rows]
        return round(sum(approx_tokens(t) for t in texts) / len(texts)) if texts else 0

    def print_summary(self, run: PreparedRun, coordinator: Coordinator, started: float) -> None:
        """What each instance did, once the coordinator has stopped."""
        wall_s = time.monotonic() - started
        try:  # the finished job's figures (its cost too), not stretched by the workers' stop
            metrics = run.store.read_json(OutputPaths.METRICS)
        except OSError:
            metrics = coordinator.metrics_dict()
        for line in summary_lines(run.store, metrics, wall_s):
            print(line)

    def worker_job(self, run: PreparedRun) -> dict[str, Any]:
        """What a worker receives on joining: the job, the input's metadata, the instances
        (each with where its engine core runs, chosen from its share of the rows left and
        whether its node keeps a core free of engines; CPU nodes are taken to be like this one)."""
        from hetbatch.engines.factory import engine_in_own_process

        rows_left = run.total_rows - run.committed_rows
        weights = sum(i.weight for i in run.instances) or 1.0
        cores = len(os.sched_getaffinity(0))
        engine_cores: dict[tuple[str, int], set[int]] = {}
        for i in run.instances:
            engine_cores.setdefault((i.pool, i.node), set()).update(i.devices)
        return {
            "spec": run.job.to_dict(),
            "dataset": dataset_to_dict(run.dataset),
            "prefix_window_rows": run.prefix_window_rows,
            "instances": {
                i.instance_id: {
                    "id": i.instance_id,
                    "pool": i.pool,
                    "accelerator": i.accelerator,
                    "devices": list(i.devices),
                    "node": i.node,
                    "weight": i.weight,
                    "engine_args": i.engine_args,
                    "own_process": engine_in_own_process(
                        run.job, rows_left * i.weight / weights,
                        spare_core=not i.is_cpu or len(engine_cores[(i.pool, i.node)]) < cores,
                    ),
                }
                for i in run.instances
            },
        }


def _rows_of(records: list[CommitRecord]) -> int:
    """Rows of the committed ranges, each once (rows dealt by the context they need may be
    in several records of one range)."""
    ranges = RangeSet()
    for r in records:
        ranges.add(r.start, r.end)
    return ranges.total


def _default(key: str) -> Any:
    """A job field's default as job.json records it (outputs written before the field existed
    ran with its default)."""
    return _as_json(JobSpec.model_fields[key].get_default(call_default_factory=True))


def _with_defaults(key: str, recorded: Any) -> Any:
    """A section of an older job.json with the fields added since filled with their defaults,
    so that a new optional field does not make an old output look like another job's."""
    model = JobSpec.model_fields[key].annotation
    is_section = isinstance(model, type) and issubclass(model, BaseModel)
    if not (is_section and isinstance(recorded, dict)):
        return recorded
    defaults = {
        name: _as_json(field.get_default(call_default_factory=True))
        for name, field in model.model_fields.items()
        if not field.is_required()
    }
    filled = {**defaults, **recorded}
    return _without_storage(filled) if key == "input" else filled


def _as_json(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _without_storage(section: dict[str, Any]) -> dict[str, Any]:
    """How the input is reached (endpoint, profile) does not change what the output holds."""
    return {k: v for k, v in section.items() if k != "storage_options"}


def read_layout(store: OutputStore) -> list[InstanceSpec]:
    """The instances `prepare` recorded in the output (`layout.json`)."""
    return [
        InstanceSpec(**{**i, "devices": tuple(i["devices"])})
        for i in store.read_json(OutputPaths.LAYOUT)
    ]


def advertised_host(bound: str) -> str:
    """A coordinator listening on every interface is reached through this host's name."""
    return socket.getfqdn() if bound in ("", "0.0.0.0", "::") else bound


def log_dir(run: PreparedRun) -> Path:
    """Worker logs sit beside the ledger on local outputs, in a temp folder otherwise."""
    path = run.store.paths.local_dir(OutputPaths.LOGS)
    if path is None:
        import tempfile

        path = Path(tempfile.gettempdir()) / "hetbatch-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
