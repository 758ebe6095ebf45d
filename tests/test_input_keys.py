"""The id column is a key, or the job says why not; the prompt column is text, or the job casts.
Real Parquet files through the CLI."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobutil import read_output, run_cli, sim_job, sim_pool, write_job


def _run(tmp_path, table: pa.Table, statistics: bool = True, **input_options):
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=100,
                   write_statistics=statistics)
    job = sim_job(tmp_path, tmp_path / "in.parquet", [sim_pool("a", 20000)],
                  scheduler={"max_unit_rows": 64})
    job["input"]["keep_columns"] = []
    job["input"].update(input_options)
    return run_cli("run", "--no-progress", str(write_job(tmp_path / "job.yaml", job)))


def _refused(tmp_path, result, expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def _table(ids: list, prompts: list | None = None) -> pa.Table:
    return pa.table({"id": ids, "prompt": prompts or [f"p {i}" for i in range(len(ids))]})


def test_null_id_is_refused_naming_file_and_row(tmp_path) -> None:
    ids = [f"r{i}" for i in range(500)]
    ids[237] = ids[480] = None
    result = _run(tmp_path, _table(ids))
    _refused(tmp_path, result,
             "in.parquet: row 237: id column 'id' is null (2 null ids in all); ids must be a key")


def test_ids_that_are_not_a_key_by_the_jobs_word(tmp_path) -> None:
    ids = [f"r{i % 50}" if i % 7 else None for i in range(300)]
    result = _run(tmp_path, _table(ids), id_is_key=False)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stdout and read_output(tmp_path / "out").height == 300


def test_repeated_ids_are_reported_with_counts(tmp_path) -> None:
    result = _run(tmp_path, _table([f"r{i // 2}" for i in range(640)]))
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "the id column is not a key: " in warning[0]
    repeated = int(warning[0].split(": ")[2].split()[0].replace(",", ""))
    assert 300 <= repeated <= 320  # pairs split by a unit boundary are not seen
    assert read_output(tmp_path / "out").height == 640


def test_null_ids_in_files_without_statistics_are_counted(tmp_path) -> None:
    result = _run(tmp_path, _table([None if i % 10 == 0 else f"r{i}" for i in range(200)]),
                  statistics=False)
    assert result.returncode == 0, result.stderr
    assert "the id column is not a key: 20 null ids" in result.stdout


@pytest.mark.parametrize("kind", [pa.int64(), pa.float32(), pa.list_(pa.string())])
def test_non_text_prompt_column_is_refused(tmp_path, kind) -> None:
    values = [[f"w{i}"] for i in range(50)] if pa.types.is_list(kind) else list(range(50))
    table = pa.table({"id": [f"r{i}" for i in range(50)], "prompt": pa.array(values, kind)})
    shown = "list<element: string>" if pa.types.is_list(kind) else str(kind)  # as Parquet reads
    _refused(tmp_path, _run(tmp_path, table),
             f"in.parquet: prompt column 'prompt' is {shown}, not text; set input.cast_prompt")


def test_cast_prompt_converts_values_to_text(tmp_path) -> None:
    table = pa.table({"id": [f"r{i}" for i in range(50)], "prompt": pa.array(range(50))})
    result = _run(tmp_path, table, cast_prompt=True)
    assert result.returncode == 0, result.stderr
    out = read_output(tmp_path / "out")
    assert out.height == 50 and out["error"].null_count() == 50


def test_id_column_of_lists_is_refused(tmp_path) -> None:
    table = pa.table({"id": [[i] for i in range(20)], "prompt": [f"p{i}" for i in range(20)]})
    _refused(tmp_path, _run(tmp_path, table),
             "id column 'id' is list<element: int64>; ids must be text or integers")
