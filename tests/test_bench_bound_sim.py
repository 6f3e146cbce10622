"""The bound's model (omni_ctl/bench/bound.py) against the real simulator:
requests sent one at a time with the bench client over real HTTP, the
simulator started as `omni-ctl sim` (SimCluster); the model's TTFT of every
request within 5% of the measured one."""

import pytest

from omni_ctl.bench import bound, core

sim_cluster = pytest.importorskip("omni_ctl.sim.cluster",
                                  reason="the simulator is not in this build")


def _one_at_a_time(url, stats_url, tmp_path, input_len):
    """Five independent token prompts of input_len +- 40%, four output tokens,
    one request in flight at a time (closed loop, concurrency 1)."""
    spec = core.WorkloadSpec(workload="random", num_requests=5, prompt_mode="tokens",
                             random_input_len=input_len, random_output_len=4,
                             random_range_ratio=0.4, seed=3)
    cfg = core.bench_config(url, spec, {"concurrency": 1, "max_duration": 150.0,
                                        "request_timeout": 60.0},
                            progress=False, sim_stats_url=stats_url, run_id="boundcheck")
    summary, result = core.run_bench(cfg, spec, {}, out_dir=str(tmp_path), plots=False)
    assert summary["completed"] == 5, summary["error_kinds"]
    assert (tmp_path / "sim_requests.json").exists()
    return cfg, result


def _check(cfg, result, mode):
    cluster = bound.cluster_for(result.sim_requests)
    assert cluster.mode == mode
    b = bound.compute(result.records, result.sim_requests, cfg.run_id, cluster)
    assert b["requests"] == 5 and b["notes"] == []      # every request has its record
    assert b["cached_tokens"] == 0                       # distinct random prompts
    fcfs = b["policies"]["fcfs"]["requests"]
    for rec in result.records:
        model = fcfs[str(rec.index)]
        # nothing overlaps: every policy schedules each request alone
        assert b["policies"]["sjf"]["requests"][str(rec.index)] == model
        assert b["policies"]["srpt"]["requests"][str(rec.index)] == model
        assert abs(model - rec.ttft_ms) <= 0.05 * rec.ttft_ms, \
            (rec.index, rec.prompt_len, model, rec.ttft_ms)
    return b


def test_model_matches_one_aggregated_instance(tmp_path):
    # 5k-11k-token prompts on the H100 preset at half its speed: 0.3-0.8 s
    # prefills in steps of 8192 tokens; the CPU time of the HTTP hops and of
    # hashing the prompt, which the model leaves out, stays well under 5%
    with sim_cluster.SimCluster(prefill=0, decode=0, both=1,
                                args=["--preset", "llama3-8b-h100",
                                      "--speedup", "0.5"]) as sim:
        cfg, result = _one_at_a_time(sim.urls[0], sim.urls[0], tmp_path, 8000)
    _check(cfg, result, "aggregated")


def test_model_matches_sequential_pd_through_the_oracle_router(tmp_path):
    # one prefill and one decode instance behind the simulator's own router:
    # the model's prefill, KV transfer and first decode step against the
    # measured TTFT. 10k-22k tokens at half the preset's speed (0.8-2 s):
    # each of the three hops parses and hashes the prompt (a few ms per 10k
    # tokens on a busy machine), which the model leaves out
    from omni_ctl.bench import procs
    port = procs.free_ports(1)[0]
    with sim_cluster.SimCluster(prefill=1, decode=1,
                                args=["--preset", "llama3-8b-h100", "--speedup", "0.5",
                                      "--oracle-port", str(port)]) as sim:
        cfg, result = _one_at_a_time(sim.oracle_url, sim.urls[0], tmp_path, 16000)
    b = _check(cfg, result, "sequential")
    # the decode leg is in the model: a prompt's TTFT exceeds its prefill alone
    job = bound.Job(0.0, 16000, 0, 4)
    cluster = bound.cluster_for(result.sim_requests)
    prefill_only = bound.Cluster(cluster.preset, 1, 0, "aggregated", cluster.speedup)
    assert bound.alone_ttft(job, cluster) > bound.alone_ttft(job, prefill_only)
    assert b["mode"] == "sequential"


def test_bench_with_a_trace_prints_the_bounds(tmp_path):
    # `omni-ctl bench` on a trace against one simulated instance: the bound
    # rows, the multiples and bound.json; the shared first block of requests
    # 1-3 is a cache hit the bound takes from the simulator's records
    import json
    import subprocess
    import sys
    trace = tmp_path / "trace.jsonl"
    rows = [(0, 2000, [1, 2, 3, 4]), (100, 1500, [1, 5, 6]), (120, 1500, [1, 7, 8]),
            (130, 1500, [1, 9, 10]), (400, 700, [11, 12])]
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": n,
                                         "output_length": 3, "hash_ids": h}) + "\n"
                             for t, n, h in rows))
    with sim_cluster.SimCluster(prefill=0, decode=0, both=1,
                                args=["--preset", "tiny", "--max-num-batched-tokens",
                                      "1024"]) as sim:
        out = subprocess.run(
            [sys.executable, "-m", "omni_ctl.cli", "bench", "--target", sim.urls[0],
             "--sim-stats", sim.urls[0], "--sim-args", "--max-num-batched-tokens 1024",
             "-w", f"trace:{trace}", "--out", str(tmp_path / "out"), "--no-plots", "-q",
             "--max-duration", "60"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| bound: SRPT (preemptive, lower bound) | 5/0 |" in out.stdout
    assert "mean / FCFS" in out.stdout
    b = json.load(open(tmp_path / "out" / "bound.json"))
    assert b["requests"] == 5 and b["notes"] == []
    assert b["cluster"].startswith("1 instances, aggregated, preset tiny")
    assert "budget 1024 tokens" in b["cluster"]
    assert b["cached_tokens"] >= 3 * 496      # block 1 (512 tokens) in full 16-token blocks
