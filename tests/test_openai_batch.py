"""OpenAI batch files in and out: line-scanned JSONL input, JSONL shards in the Batch API's
output layout, with the same exactly-once and resume guarantees as Parquet."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from hetbatch.io import jsonl
from tests.jobutil import run_cli, start_run, write_job

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def request(i: int, url: str = CHAT, **body: Any) -> str:
    """A request line as OpenAI's batch guide writes them."""
    if url == CHAT:
        content = {"model": "gpt-3.5-turbo-0125", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Hello world! {i}"},
        ]}
    else:
        content = {"model": "gpt-3.5-turbo-instruct", "prompt": f"Say this is test {i}"}
    line = {"custom_id": f"request-{i}", "method": "POST", "url": url,
            "body": {**content, "max_tokens": 1000, **body}}
    return json.dumps(line)


def write_lines(path: Path, lines: list[str], trailing_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    return path


def sim_openai_job(tmp: Path, input_path: str, **extra: Any) -> dict[str, Any]:
    job = {
        "model": {"path": "simulated"},
        "input": {"path": input_path, "format": "openai-batch"},
        "output": {"path": str(tmp / "out"), "format": "openai-batch"},
        "sampling": {"max_tokens": 8},
        "engine": {"kind": "sim"},
        "scheduler": {"max_unit_rows": 200, "heartbeat_s": 0.3},
        "cluster": {"pools": [
            {"name": "a", "accelerator": "cpu", "devices_per_node": 1,
             "sim": {"tokens_per_s": 4000}},
            {"name": "b", "accelerator": "cpu", "devices_per_node": 1,
             "sim": {"tokens_per_s": 4000}},
        ]},
    }
    job.update(extra)
    return job


def output_lines(out: Path, pattern: str = "part-*.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(out.glob(pattern)) for line in f.open()]


# -- the input: units of lines ------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 3, 1024])
def test_any_line_range_reads_those_lines(tmp_path, monkeypatch, stride) -> None:
    """Every range of rows, across files, with and without a last newline and with CRLF,
    reads exactly those lines, from checkpoints of any stride."""
    monkeypatch.setattr(jsonl, "SCAN_STRIDE", stride)
    monkeypatch.setattr(jsonl, "SCAN_BLOCK_BYTES", 7)  # lines straddle every block
    a = [request(i) for i in range(10)]
    b = [request(i) for i in range(10, 17)]
    c = [request(17)]
    write_lines(tmp_path / "a.jsonl", a)
    write_lines(tmp_path / "b.jsonl", b, trailing_newline=False)
    (tmp_path / "c.jsonl").write_text(c[0] + "\r\n")
    (tmp_path / "_ignored.jsonl").write_text("not input\n")
    dataset = jsonl.open_jsonl(str(tmp_path))
    lines = a + b + c
    assert dataset.num_rows == len(lines) and [f.num_rows for f in dataset.files] == [10, 7, 1]
    for start in range(len(lines)):
        for end in range(start + 1, len(lines) + 1):
            table = jsonl.read_rows(jsonl.dataset_from_dict(jsonl.dataset_to_dict(dataset)),
                                    start, end)
            assert table.column("request").to_pylist() == lines[start:end]
    table = jsonl.read_rows(dataset, 9, 11)
    assert table.column("custom_id").to_pylist() == ["request-9", "request-10"]
    assert table.column("source").to_pylist() == [
        f"{tmp_path}/a.jsonl:10", f"{tmp_path}/b.jsonl:1"
    ]


def test_checkpoints_are_thinned_to_a_bound(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(jsonl, "SCAN_STRIDE", 2)
    monkeypatch.setattr(jsonl, "MAX_CHECKPOINTS", 5)
    lines = [request(i) for i in range(41)]
    dataset = jsonl.open_jsonl(str(write_lines(tmp_path / "in.jsonl", lines)))
    assert len(dataset.files[0].offsets) <= 5 and dataset.stride == 10
    assert jsonl.read_rows(dataset, 33, 41).column("request").to_pylist() == lines[33:]


# -- whole jobs, simulated engine ---------------------------------------------------------------


def test_every_request_once_bad_lines_named_and_errors_file(tmp_path) -> None:
    """Two files of chat and completions requests, some lines broken: every line has one output
    line; each broken one fails alone, naming its file and line, and is in the errors file."""
    lines = [request(i, CHAT if i % 3 else COMPLETIONS, max_tokens=1 + i % 7)
             for i in range(3000)]
    lines[5] = '{"custom_id": "request-5", "method": "POST"'  # cut off
    lines[17] = json.dumps({"custom_id": "request-17", "method": "POST",
                            "url": "/v1/embeddings", "body": {"input": "x"}})
    lines[2500] = ""  # a blank line is a row too
    write_lines(tmp_path / "a.jsonl", lines[:2000])
    write_lines(tmp_path / "b.jsonl", lines[2000:], trailing_newline=False)
    job = sim_openai_job(tmp_path, str(tmp_path / "*.jsonl"))
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    got = output_lines(out)
    assert len(got) == 3000
    assert sorted(g["custom_id"] for g in got if g["custom_id"]) == sorted(
        f"request-{i}" for i in range(3000) if i not in (5, 2500)
    )
    by_id = {g["custom_id"]: g for g in got}
    ok = by_id["request-4"]
    assert ok["error"] is None and ok["response"]["status_code"] == 200
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "simulated"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 5  # the body's max_tokens, not the job's 8
    assert by_id["request-3"]["response"]["body"]["object"] == "text_completion"
    assert "text" in by_id["request-3"]["response"]["body"]["choices"][0]
    errors = output_lines(out, "errors/part-*.jsonl")
    messages = sorted(e["error"]["message"] for e in errors)
    assert len(errors) == 3 and all(e["response"]["status_code"] == 400 for e in errors)
    assert messages[0].startswith(f"{tmp_path}/a.jsonl:18: url '/v1/embeddings' is not")
    assert messages[1].startswith(f"{tmp_path}/a.jsonl:6: not valid JSON")
    assert messages[2].startswith(f"{tmp_path}/b.jsonl:501: not valid JSON")
    assert by_id["request-17"]["error"]["message"] == messages[0]
    # Every errors file belongs to a published shard of the same range.
    shards = {p.name for p in out.glob("part-*.jsonl")}
    assert {p.name for p in (out / "errors").iterdir()} <= shards


def test_resume_after_sigkill_keeps_shards_and_errors(tmp_path) -> None:
    lines = [request(i, max_tokens=6) for i in range(12_000)]
    for i in range(0, 12_000, 997):
        lines[i] = "{oops"
    write_lines(tmp_path / "in.jsonl", lines)
    job = sim_openai_job(tmp_path, str(tmp_path / "in.jsonl"))
    job["cluster"]["pools"][1]["sim"]["tokens_per_s"] = 8000
    job_file = write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    proc = start_run(job_file, out, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    kept = {p.name: p.stat().st_ino for p in out.glob("part-*.jsonl")}
    result = run_cli("run", str(job_file))
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    for name, inode in kept.items():
        assert (out / name).stat().st_ino == inode
    got = output_lines(out)
    assert len(got) == 12_000
    ids = [g["custom_id"] for g in got if g["custom_id"] is not None]
    assert len(ids) == len(set(ids)) == 12_000 - 13
    errors = output_lines(out, "errors/part-*.jsonl")
    assert sorted(int(e["error"]["message"].split(":")[1]) for e in errors) == [
        i + 1 for i in range(0, 12_000, 997)
    ]
    again = run_cli("run", str(job_file))
    assert again.returncode == 0 and "already complete" in again.stdout
    parquet = {**job, "output": {**job["output"], "format": "parquet"}}
    refused = run_cli("run", str(write_job(tmp_path / "parquet.yaml", parquet)))
    assert refused.returncode == 2
    assert "holds openai-batch output, not parquet" in refused.stderr


def test_job_mistakes_are_one_line(tmp_path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [request(0)])
    cases = [
        ({"input": {"path": str(src), "format": "openai-batch", "prompt_column": "p"}},
         "openai-batch requests carry their own prompts"),
        ({"prompt_template": "Q: {x}"}, "prompt_template does not apply to openai-batch"),
        ({"task": "embed", "sampling": {}}, "task embed does not apply to openai-batch"),
    ]
    for change, expected in cases:
        job = {**sim_openai_job(tmp_path, str(src)), **change}
        result = run_cli("run", str(write_job(tmp_path / "bad.yaml", job)))
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no requests here\n")
    empty = sim_openai_job(tmp_path, str(tmp_path / "notes"))
    result = run_cli("run", str(write_job(tmp_path / "bad.yaml", empty)))
    assert result.returncode == 2 and "no .jsonl files found" in result.stderr


# -- real vLLM on the CPU -----------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def _vllm_requests() -> list[str]:
    """Chat requests as OpenAI's guide writes them (greedy, short), a few with n samples
    (seeded: vLLM allows n > 1 only when sampling), logprobs or a JSON schema, and plain
    completions, which vLLM's run-batch does not take."""
    lines = []
    for i in range(48):
        extra: dict[str, Any] = {"temperature": 0, "max_tokens": 6 + i % 11}
        if i % 8 == 1:
            extra.update(n=2, temperature=0.9, seed=100 + i, logprobs=True, top_logprobs=2)
        if i % 8 == 2:
            extra.update(max_tokens=40, response_format={
                "type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}})
        lines.append(request(i, COMPLETIONS if i % 6 == 5 else CHAT, **extra))
    return lines


def _by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


@pytest.mark.vllm
def test_same_completions_as_vllm_run_batch(tmp_path, tiny_model) -> None:
    import os
    import subprocess
    import sys

    import polars as pl

    from tests.jobutil import TINY_ENGINE_ARGS

    lines = _vllm_requests()
    src = write_lines(tmp_path / "requests.jsonl", lines)
    chat_only = write_lines(tmp_path / "chat.jsonl", [x for x in lines if CHAT in x])
    job = {
        "model": {"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(src), "format": "openai-batch"},
        "output": {"path": str(tmp_path / "out"), "format": "openai-batch"},
        "sampling": {"max_tokens": 16},
        "scheduler": {"max_unit_rows": 8, "min_unit_rows": 4, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2}]},
    }
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    ours = _by_id(output_lines(tmp_path / "out"))
    assert len(ours) == 48 and all(x["error"] is None for x in ours.values())
    from openai.types import Completion  # the OpenAI SDK's own models read every body
    from openai.types.chat import ChatCompletion

    for line in ours.values():
        body = line["response"]["body"]
        kind = ChatCompletion if body["object"] == "chat.completion" else Completion
        parsed = kind.model_validate(body)
        assert parsed.usage is not None and parsed.usage.total_tokens > parsed.usage.prompt_tokens

    reference = tmp_path / "vllm.jsonl"
    args = TINY_ENGINE_ARGS
    subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(chat_only),
         "-o", str(reference), "--model", str(tiny_model),
         "--served-model-name", "gpt-3.5-turbo-0125", "--dtype", args["dtype"],
         "--enforce-eager", "--max-model-len", str(args["max_model_len"]),
         "--kv-cache-memory-bytes", str(args["kv_cache_memory_bytes"])],
        check=True, capture_output=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    theirs = _by_id(json.loads(x) for x in reference.read_text().splitlines())
    assert len(theirs) == 40
    texts = []
    for cid, line in theirs.items():
        body, mine = line["response"]["body"], ours[cid]["response"]["body"]
        assert mine["object"] == body["object"] == "chat.completion"
        for usage in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert mine["usage"][usage] == body["usage"][usage], (cid, usage)
        assert len(mine["choices"]) == len(body["choices"])
        for a, b in zip(mine["choices"], body["choices"], strict=True):
            assert a["message"]["content"] == b["message"]["content"], cid
            assert a["finish_reason"] == b["finish_reason"], cid
            texts.append(a["message"]["content"])
            if b["logprobs"] is not None:
                want = [(t["token"], round(t["logprob"], 3)) for t in b["logprobs"]["content"]]
                got = [(t["token"], round(t["logprob"], 3)) for t in a["logprobs"]["content"]]
                assert got == want, cid
                assert all(len(t["top_logprobs"]) == 2 for t in a["logprobs"]["content"])
    assert sum(bool(t) for t in texts) > len(texts) / 2  # not a match of empty strings
    constrained = [ours[f"request-{i}"] for i in range(2, 48, 8)]
    for line in constrained:
        choice = line["response"]["body"]["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"])["n"], int)
    completion = ours["request-5"]["response"]["body"]
    assert completion["object"] == "text_completion" and "text" in completion["choices"][0]

    # The same requests into Parquet: the same texts; a row whose n the columns cannot hold
    # is that row's error.
    job["output"] = {"path": str(tmp_path / "parquet")}
    result = run_cli("run", str(write_job(tmp_path / "parquet.yaml", job)))
    assert result.returncode == 0, result.stderr
    df = pl.read_parquet(str(tmp_path / "parquet" / "*.parquet"))
    assert df.height == 48 and df["custom_id"].n_unique() == 48
    for row in df.iter_rows(named=True):
        mine = ours[row["custom_id"]]["response"]["body"]["choices"][0]
        if row["error"] is None:
            assert row["generated_text"] == mine.get("message", mine).get("content",
                                                                          mine.get("text"))
        else:
            assert "body.n 2 differs from the job's sampling.n 1" in row["error"]
    assert df["error"].null_count() == 48 - 6


def test_on_s3_errors_published_with_their_shards(tmp_path, s3_env) -> None:
    """Requests in and results out on an S3 server on loopback: shards and errors files are
    uncompleted uploads until the coordinator completes them; nothing is left pending."""
    bucket = s3_env.new_bucket()
    fs = s3_env.filesystem()
    lines = [request(i, max_tokens=4) for i in range(2000)]
    for i in (3, 1500):
        lines[i] = "[1, 2]"
    fs.pipe_file(f"{bucket}/in/a.jsonl", "\n".join(lines[:1000]).encode() + b"\n")
    fs.pipe_file(f"{bucket}/in/b.jsonl", "\n".join(lines[1000:]).encode() + b"\n")
    job = sim_openai_job(tmp_path, f"s3://{bucket}/in/")
    job["output"]["path"] = f"s3://{bucket}/out"
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    fs.invalidate_cache()
    shards = fs.glob(f"{bucket}/out/part-*.jsonl")
    got = [json.loads(x) for p in shards for x in fs.cat_file(p).decode().splitlines()]
    assert len(got) == 2000
    assert len({g["custom_id"] for g in got if g["custom_id"]}) == 1998
    errors = [json.loads(x) for p in fs.glob(f"{bucket}/out/errors/part-*.jsonl")
              for x in fs.cat_file(p).decode().splitlines()]
    assert sorted(e["error"]["message"] for e in errors) == [
        f"s3://{bucket}/in/a.jsonl:4: a request line must be a JSON object",
        f"s3://{bucket}/in/b.jsonl:501: a request line must be a JSON object",
    ]
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert pending == []
