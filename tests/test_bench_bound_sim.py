"""The bound's model (omni_ctl/bench/bound.py) against the real simulator:
requests sent one at a time with the bench client over real HTTP, the
simulator started as `omni-ctl sim` (SimCluster); the model's TTFT of every
request within 5% of the measured one."""

import pytest

from omni_ctl.bench import bound, core

sim_cluster = pytest.importorskip("omni_ctl.sim.cluster",
                                  reason="the simulator is not in this build")


def _warm(url):
    """One small request before the measured ones, through the same path: the
    first request of a fresh simulator (and of its router) pays one-time costs
    (connections, first allocations) that no model of steady service has; on
    a busy 2-core machine that alone put a first request 7% over the model.
    Its X-Request-Id shares no prefix with a measured run's."""
    import http.client
    import json
    from urllib.parse import urlsplit
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"prompt": "warm up", "max_tokens": 2}),
                     headers={"Content-Type": "application/json",
                              "X-Request-Id": "warmup"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    finally:
        conn.close()


def _one_at_a_time(url, stats_url, tmp_path, input_len, mode, prompt_mode="tokens"):
    """Five independent prompts of input_len +- 40% tokens, four output tokens,
    one request in flight at a time (closed loop, concurrency 1); the model's
    TTFT of each against the measured one. A timing miss is measured again,
    up to three times, with new prompts (no cache hits) and a new run id: a
    stall of the shared 2-core machine (a first request 33% late once in a
    sanitizer CI run) misses once, a model error misses every time.
    Everything that is not timing is checked on every attempt."""
    tries = []
    for attempt in range(3):
        spec = core.WorkloadSpec(workload="random", num_requests=5,
                                 prompt_mode=prompt_mode, random_input_len=input_len,
                                 random_output_len=4, random_range_ratio=0.4,
                                 seed=3 + attempt)
        _warm(url)
        out = tmp_path / f"try{attempt}"
        cfg = core.bench_config(url, spec, {"concurrency": 1, "max_duration": 150.0,
                                            "request_timeout": 60.0},
                                progress=False, sim_stats_url=stats_url,
                                run_id=f"boundcheck{attempt}")
        summary, result = core.run_bench(cfg, spec, {}, out_dir=str(out), plots=False)
        assert summary["completed"] == 5, summary["error_kinds"]
        assert (out / "sim_requests.json").exists()
        b, misses = _check(cfg, result, mode)
        tries.append(misses)
        if not misses:
            break
    assert not tries[-1], tries
    return cfg, result, b


def _check(cfg, result, mode):
    """The bound of a one-at-a-time run, and the requests whose modelled TTFT
    is more than 5% off the measured one."""
    cluster = bound.cluster_for(result.sim_requests)
    assert cluster.mode == mode
    b = bound.compute(result.records, result.sim_requests, cfg.run_id, cluster)
    assert b["requests"] == 5 and b["notes"] == []      # every request has its record
    assert b["cached_tokens"] == 0                       # distinct random prompts
    fcfs = b["policies"]["fcfs"]["requests"]
    misses = []
    for rec in result.records:
        model = fcfs[str(rec.index)]
        # nothing overlaps: every policy schedules each request alone
        assert b["policies"]["sjf"]["requests"][str(rec.index)] == model
        assert b["policies"]["srpt"]["requests"][str(rec.index)] == model
        if abs(model - rec.ttft_ms) > 0.05 * rec.ttft_ms:
            misses.append((rec.index, rec.prompt_len, model, rec.ttft_ms))
    return b, misses


def test_model_matches_one_aggregated_instance(tmp_path):
    # 5k-11k-token prompts on the H100 preset at half its speed: 0.3-0.8 s
    # prefills in steps of 8192 tokens; the CPU time of the HTTP hops and of
    # hashing the prompt, which the model leaves out, stays well under 5%
    with sim_cluster.SimCluster(prefill=0, decode=0, both=1,
                                args=["--preset", "llama3-8b-h100",
                                      "--speedup", "0.5"]) as sim:
        _one_at_a_time(sim.urls[0], sim.urls[0], tmp_path, 8000, "aggregated")


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
        cfg, result, b = _one_at_a_time(sim.oracle_url, sim.urls[0], tmp_path, 16000,
                                        "sequential")
    # the decode leg is in the model: a prompt's TTFT exceeds its prefill alone
    job = bound.Job(0.0, 16000, 0, 4)
    cluster = bound.cluster_for(result.sim_requests)
    prefill_only = bound.Cluster(cluster.preset, 1, 0, "aggregated", cluster.speedup)
    assert bound.alone_ttft(job, cluster) > bound.alone_ttft(job, prefill_only)
    assert b["mode"] == "sequential"


def test_model_counts_the_engines_tokenizing_text_prompts(tmp_path):
    # the same P/D pair, prompts sent as text: each engine's front end
    # tokenizes the prompt (made slow here: 40 us a token at half speed,
    # 0.5-1.8 s on each leg, as long as the prefill) before it is scheduled,
    # on the prefill leg and again on the decode leg. The model adds both
    # from the simulator's records; without them it would be 40-60% short
    from omni_ctl.bench import procs
    port = procs.free_ports(1)[0]
    with sim_cluster.SimCluster(prefill=1, decode=1,
                                args=["--preset", "llama3-8b-h100", "--speedup", "0.5",
                                      "--tokenize-per-token", "2e-5",
                                      "--oracle-port", str(port)]) as sim:
        cfg, result, b = _one_at_a_time(sim.oracle_url, sim.urls[0], tmp_path, 16000,
                                        "sequential", prompt_mode="text")
    jobs, _, missing = bound.jobs_for(result.records, result.sim_requests, cfg.run_id)
    assert missing == 0
    for j in jobs:
        assert j.tokenize == pytest.approx(2 * 2e-5 * j.prompt, rel=0.01)
        assert j.tokenize_decode == pytest.approx(j.tokenize, rel=0.01)
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


def test_step_model_matches_the_engine_under_overlap(tmp_path):
    # eight prompts 60 ms apart to one instance whose steps take 0.1-0.6 s:
    # they queue, share steps in chunks of the 8192-token budget and decode
    # alongside the later ones' prefills. Fed the engine's own arrival
    # instants and filling its steps as the engine does (FCFS), the model's
    # time from arrival to first token is the engine's, request by request
    # (engine-side times: no HTTP). The 60 ms keep each arrival apart from
    # the next: two at once to an idle engine race its parsing of the first
    import json
    sizes = [4684, 9183, 8127, 1348, 2353, 8184, 6737, 2169]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({
        "timestamp": 60 * i, "input_length": n, "output_length": 20 + 7 * i,
        "hash_ids": list(range(100 * i, 100 * i + n // 512 + 1))}) + "\n"
        for i, n in enumerate(sizes)))
    spec = core.WorkloadSpec(workload=f"trace:{trace}")
    with sim_cluster.SimCluster(prefill=0, decode=0, both=1,
                                args=["--preset", "llama3-8b-h100",
                                      "--speedup", "0.5"]) as sim:
        _warm(sim.urls[0])
        cfg = core.bench_config(sim.urls[0], spec, {"max_duration": 150.0},
                                progress=False, sim_stats_url=sim.urls[0], run_id="overlap")
        summary, result = core.run_bench(cfg, spec, {}, out_dir=str(tmp_path / "out"),
                                         plots=False)
    assert summary["completed"] == 8, summary["error_kinds"]
    recs = sorted((r for i in result.sim_requests["instances"] for r in i["requests"]
                   if str(r["x_request_id"]).startswith("overlap-")),
                  key=lambda r: r["arrival_unix"])
    assert len(recs) == 8
    t0 = recs[0]["arrival_unix"]
    out = {r["x_request_id"]: r["output_tokens"] for r in recs}
    jobs = [bound.Job(r["arrival_unix"] - t0, r["prompt_tokens"], r["cached_tokens"],
                      out[r["x_request_id"]]) for r in recs]
    cluster = bound.cluster_for(result.sim_requests)
    model = bound.simulate(jobs, cluster, "fcfs", engine_admission=True)
    engine = [r["ttft_s"] for r in recs]
    assert max(engine) > 2 * min(engine)        # they did wait for each other
    for m, e, r in zip(model, engine, recs):
        assert abs(m - e) <= 0.05 * e, (r["x_request_id"], r["prompt_tokens"], m, e)


def test_step_model_matches_prefill_and_decode_engines_under_overlap(tmp_path):
    # the same through one prefill and one decode instance behind the
    # simulator's router (one of each: no placement to model): the model's
    # first token against the decode engine's, from the prefill engine's
    # arrival; prefill queueing, KV pulls at the decode engine's step
    # boundaries and first tokens among running decodes. Only the hop from
    # the prefill's answer to the decode engine (a few ms) is not modelled
    import json
    from omni_ctl.bench import procs
    sizes = [4684, 9183, 8127, 1348, 2353, 8184, 6737, 2169]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({
        "timestamp": 60 * i, "input_length": n, "output_length": 60 + 9 * i,
        "hash_ids": list(range(100 * i, 100 * i + n // 512 + 1))}) + "\n"
        for i, n in enumerate(sizes)))
    spec = core.WorkloadSpec(workload=f"trace:{trace}")
    port = procs.free_ports(1)[0]
    with sim_cluster.SimCluster(prefill=1, decode=1,
                                args=["--preset", "llama3-8b-h100", "--speedup", "0.5",
                                      "--oracle-port", str(port)]) as sim:
        _warm(sim.oracle_url)
        cfg = core.bench_config(sim.oracle_url, spec, {"max_duration": 150.0},
                                progress=False, sim_stats_url=sim.urls[0], run_id="pd")
        summary, result = core.run_bench(cfg, spec, {}, out_dir=str(tmp_path / "out"),
                                         plots=False)
    assert summary["completed"] == 8, summary["error_kinds"]
    pre = sorted((r for r in bound.prefill_records(result.sim_requests).values()
                  if r["x_request_id"].startswith("pd-")),
                 key=lambda r: r["arrival_unix"])
    assert len(pre) == 8
    dec = bound.decode_records(result.sim_requests)
    t0 = pre[0]["arrival_unix"]
    jobs = [bound.Job(r["arrival_unix"] - t0, r["prompt_tokens"], r["cached_tokens"],
                      dec[r["x_request_id"]]["output_tokens"]) for r in pre]
    model = bound.simulate(jobs, bound.cluster_for(result.sim_requests), "fcfs",
                           engine_admission=True)
    for m, r in zip(model, pre):
        d = dec[r["x_request_id"]]
        measured = d["arrival_unix"] + d["ttft_s"] - r["arrival_unix"]
        assert abs(m - measured) <= 0.05 * measured, (r["x_request_id"], m, measured)
