"""The coordinator's Prometheus endpoint, scraped while a job runs."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.jobutil import make_input, sim_job, sim_pool, start_run, write_job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _by_instance(samples: list) -> dict[str, float]:
    return {s.labels["instance"]: s.value for s in samples if "instance" in s.labels}


def test_metrics_endpoint_during_a_run(tmp_path) -> None:
    rows, port = 12_000, _free_port()
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", rows),
                  [sim_pool("fast", 8_000), sim_pool("slow", 3_000)],
                  coordinator={"metrics_port": port})
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 4)
    try:
        m = _scrape(port)
    finally:
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    done = m["hetbatch_rows_done"][0].value
    assert m["hetbatch_rows_total_job"][0].value == rows
    assert 0 < done < rows
    per_rows = _by_instance(m["hetbatch_rows"])
    assert set(per_rows) == {"fast-0-0", "slow-0-0"} and sum(per_rows.values()) == done
    pools = {s.labels["instance"]: s.labels["pool"] for s in m["hetbatch_rows"]}
    assert pools == {"fast-0-0": "fast", "slow-0-0": "slow"}
    assert _by_instance(m["hetbatch_instance_connected"]) == {"fast-0-0": 1, "slow-0-0": 1}
    assert sum(_by_instance(m["hetbatch_completion_tokens"]).values()) == 8 * done
    assert m["hetbatch_queue_rows"][0].value + m["hetbatch_leased_rows"][0].value <= rows - done
    assert m["hetbatch_eta_seconds"][0].value > 0
    assert "hetbatch_steals" in m and m["hetbatch_lease_expiries"][0].value == 0  # steals vary
    # The engines' own figures, passed on by the workers with their heartbeats.
    running = _by_instance(m["hetbatch_engine_running_requests"])
    waiting = _by_instance(m["hetbatch_engine_waiting_requests"])
    kv_use = _by_instance(m["hetbatch_engine_kv_cache_usage"])
    assert set(running) == set(waiting) == set(kv_use) == {"fast-0-0", "slow-0-0"}
    assert any(v > 0 for v in running.values())
    assert all(0 <= v <= 1 for v in kv_use.values())
    assert all(v <= 64 for v in running.values())  # the sim pools' max_num_seqs
