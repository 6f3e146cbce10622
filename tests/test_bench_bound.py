"""The clairvoyant bound's model (omni_ctl/bench/bound.py) on cases small
enough to check by hand, its invariants as properties, and how compare finds
a run's cluster and requests. The model against the real simulator:
tests/test_bench_bound_sim.py."""

import dataclasses
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_ctl.bench import bound, report
from omni_ctl.bench.errors import BenchError
from omni_ctl.bench.metrics import RequestRecord
from omni_ctl.sim.presets import get_preset, step_time

H100 = get_preset("llama3-8b-h100")


def linear(a=0.01, b=0.001, seats=1000, budget=100000):
    """A preset whose step costs a + b per prompt token: sums by hand."""
    return dataclasses.replace(get_preset("tiny"), a=a, b=b, c=0.0, e=0.0, f=0.0,
                               max_num_seqs=seats, max_num_batched_tokens=budget,
                               kv_transfer_base=0.0, kv_transfer_per_token=0.0)


def one(preset):
    return bound.Cluster(preset, prefill=1, decode=0, mode="aggregated")


def ttft(jobs, cluster, policy):
    return [round(t, 9) for t in bound.simulate(jobs, cluster, policy)]


def test_sjf_and_fcfs_order_one_request_per_step():
    # one seat: the instance runs one prompt at a time. A (100 tokens, 0.11 s)
    # runs first; B (50, 0.06 s) and C (10, 0.02 s) wait for it.
    jobs = [bound.Job(0.0, 100), bound.Job(0.05, 50), bound.Job(0.06, 10)]
    c = one(linear(seats=1))
    assert ttft(jobs, c, "fcfs") == [0.11, 0.12, 0.13]      # B at 0.17, C at 0.19
    assert ttft(jobs, c, "sjf") == [0.11, 0.14, 0.07]       # C at 0.13, B at 0.19


def test_waiting_prompts_share_a_step():
    # the same three with seats: B and C wait for A's step, then share one
    # (0.01 + 0.06 s), whatever the order
    jobs = [bound.Job(0.0, 100), bound.Job(0.05, 50), bound.Job(0.06, 10)]
    for pol in bound.POLICIES:
        assert ttft(jobs, one(linear()), pol) == [0.11, 0.13, 0.12]


def test_srpt_preempts_between_chunks_sjf_does_not():
    # 20-token steps (a = 0): A (100 tokens) takes 5 steps of 0.02 s; B (10)
    # arrives at 0.03, during A's second step
    jobs = [bound.Job(0.0, 100), bound.Job(0.03, 10)]
    c = one(linear(a=0.0, budget=20))
    assert ttft(jobs, c, "sjf") == [0.1, 0.08]      # B after A
    assert ttft(jobs, c, "srpt") == [0.11, 0.02]    # B's step at 0.04, A's rest after


def test_a_longer_prompt_joins_a_step_only_if_it_ends_in_it():
    # budget 100: S (10 tokens) first; L (200) would only get a 90-token chunk
    # that lengthens S's step, so it waits for the next one
    jobs = [bound.Job(0.0, 10), bound.Job(0.0, 200)]
    c = one(linear(a=0.01, budget=100))
    for pol in ("sjf", "srpt"):
        assert ttft(jobs, c, pol) == [0.02, 0.24]   # 0.01+0.01; then two of 0.11
    # a cache hit is work not done, and the chunk's context is the hit
    assert bound.alone_ttft(bound.Job(0, 200, 150), one(linear())) == pytest.approx(0.06)


def test_the_instance_that_frees_first_takes_the_queue_head():
    # two instances busy with 100-token (0.11 s) and 50-token (0.06 s)
    # prompts; the next arrival goes where the 50 ends, at 0.06
    c = bound.Cluster(linear(), prefill=2, decode=0, mode="aggregated")
    jobs = [bound.Job(0.0, 100), bound.Job(0.0, 50), bound.Job(0.01, 10)]
    assert ttft(jobs, c, "fcfs") == [0.11, 0.06, 0.07]


def test_decode_leg_and_kv_transfer_on_an_idle_cluster():
    L, spd = 12000, 2.0
    job = bound.Job(0.0, L, 2000, 8)
    pre = sum(step_time(H100, n, n * (ctx + n / 2.0), 0, 0)
              for n, ctx in ((8192, 2000), (L - 2000 - 8192, 10192))) / spd
    kv = (H100.kv_transfer_base + H100.kv_transfer_per_token * L) / spd
    first = step_time(H100, 1, L - 1 + 0.5, 0, 0) / spd
    seq = bound.Cluster(H100, 1, 1, "sequential", spd)
    par = bound.Cluster(H100, 1, 1, "parallel", spd)
    agg = bound.Cluster(H100, 1, 0, "aggregated", spd)
    assert bound.alone_ttft(job, agg) == pytest.approx(pre)
    assert bound.alone_ttft(job, par) == pytest.approx(pre + kv)
    assert bound.alone_ttft(job, seq) == pytest.approx(pre + kv + first)


def test_running_decodes_slow_the_next_first_token():
    # aggregated: A decodes 200 tokens; B's prefill shares A's decode steps
    c = one(H100)
    alone = bound.alone_ttft(bound.Job(0, 3000), c)
    t = bound.simulate([bound.Job(0.0, 3000, 0, 200), bound.Job(0.5, 3000)], c, "fcfs")
    assert t[0] == pytest.approx(alone) and t[1] > alone


def test_bad_input_is_refused():
    with pytest.raises(BenchError, match="cached < prompt"):
        bound.simulate([bound.Job(0, 10, 10)], one(H100), "sjf")
    with pytest.raises(BenchError, match="unknown bound policy"):
        bound.simulate([bound.Job(0, 10)], one(H100), "lifo")
    with pytest.raises(BenchError, match="every tier"):
        bound.simulate([bound.Job(0, 10)], bound.Cluster(H100, 1, 0, "sequential"), "sjf")


# --- properties ----------------------------------------------------------------------

TICK = 2.0 ** -10      # one token's time: sums of ticks are exact in floats


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 40)), min_size=1, max_size=9))
def test_srpt_is_optimal_on_a_unit_step_server(spec):
    # one instance, one seat, one token per step, no fixed cost: a single
    # server preemptible at every token, arrivals on step boundaries. SRPT
    # minimises the total (Schrage 1968), so the mean is at most SJF's and
    # FCFS's on every instance
    c = one(linear(a=0.0, b=TICK, seats=1, budget=1))
    jobs = [bound.Job(t * TICK, n) for t, n in spec]
    m = {p: sum(bound.simulate(jobs, c, p)) for p in bound.POLICIES}
    assert m["srpt"] <= m["sjf"] and m["srpt"] <= m["fcfs"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=12),
       st.sampled_from(["tiny", "llama3-8b-h100"]))
def test_sjf_is_optimal_when_everything_waits_from_the_start(sizes, preset):
    # all present at 0 on one instance taking one prompt per step: shortest
    # first minimises the sum of completion times (Smith's rule)
    c = one(dataclasses.replace(get_preset(preset), max_num_seqs=1,
                                max_num_batched_tokens=8192))
    jobs = [bound.Job(0.0, n) for n in sizes]
    m = {p: sum(bound.simulate(jobs, c, p)) for p in bound.POLICIES}
    assert m["sjf"] <= m["fcfs"] * (1 + 1e-12)
    assert m["srpt"] <= m["sjf"] * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.integers(1, 30000), st.integers(1, 30),
                          st.floats(0, 0.9)), min_size=1, max_size=15),
       st.sampled_from(bound.MODES), st.integers(1, 3))
def test_every_request_gets_a_first_token_no_earlier_than_alone(spec, mode, n):
    # whatever the load, a request is never faster than on an idle cluster,
    # and every one of them is served
    c = bound.Cluster(H100, n, n, mode)
    jobs = [bound.Job(t, L, int(L * h) if L > 1 else 0, out) for t, L, out, h in spec]
    for pol in bound.POLICIES:
        got = bound.simulate(jobs, c, pol)
        for j, t in zip(jobs, got):
            assert t is not None and t >= bound.alone_ttft(j, c) * (1 - 1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_on_a_loaded_cluster_srpt_below_sjf_below_fcfs(seed):
    # 150 requests at about 6/s, log-normal prompts (median 5k tokens), 2P+2D
    # SGLang-style: a queue builds up. With batching and several instances the
    # order is not guaranteed request by request (module docstring), but at
    # this load each policy beats the next by a wide margin
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(150):
        t += rng.expovariate(6.0)
        L = min(int(rng.lognormvariate(8.5, 1.2)), 100000) + 1
        jobs.append(bound.Job(t, L, rng.randint(0, L - 1) if rng.random() < 0.2 else 0,
                              rng.randint(1, 300)))
    c = bound.Cluster(H100, 2, 2, "parallel")
    m = {p: statistics.mean(bound.simulate(jobs, c, p)) for p in bound.POLICIES}
    assert m["srpt"] < 0.97 * m["sjf"] and m["sjf"] < 0.9 * m["fcfs"]


# --- a run's requests and cluster ---------------------------------------------------

def _sim(roles=("prefill", "decode"), engine="vllm", preset="tiny", speedup=4.0,
         records=()):
    insts = [{"name": f"{r}-{i}", "role": r, "engine": engine, "preset": preset,
              "speedup": speedup, "requests": []} for i, r in enumerate(roles)]
    insts[0]["requests"] = list(records)
    return {"instances": insts}


def test_cluster_from_the_simulators_report_and_its_options():
    c = bound.cluster_for(_sim(("prefill", "prefill", "decode")))
    assert (c.prefill, c.decode, c.mode, c.speedup, c.preset.name) == \
        (2, 1, "sequential", 4.0, "tiny")
    assert bound.cluster_for(_sim(engine="sglang")).mode == "parallel"
    agg = bound.cluster_for(_sim(("both", "both")))
    assert (agg.mode, agg.prefill) == ("aggregated", 2)
    c = bound.cluster_for(_sim(), ["--max-num-batched-tokens", "2048", "--preset", "tiny"])
    assert c.preset.max_num_batched_tokens == 2048
    with pytest.raises(BenchError, match="--sim-args"):
        bound.cluster_for(_sim(), ["--max-num-batched-tokens", "many"])
    with pytest.raises(BenchError, match="unknown preset"):
        bound.cluster_for(_sim(preset="gpu-9000"))


def test_jobs_take_prompt_and_hit_from_the_simulator_and_say_what_lacked_one():
    recs = [RequestRecord(index=i, session=i, turn=0, start_s=0.5 * i, ok=True,
                          prompt_len=900, output_tokens=3, ttft_ms=100.0 + i)
            for i in range(3)]
    recs.append(RequestRecord(index=3, session=3, turn=0, start_s=2.0, ok=False))
    sim = _sim(records=[
        {"x_request_id": "run-0", "kind": "kv_producer", "prompt_tokens": 1000,
         "cached_tokens": 512},
        {"x_request_id": "run-1", "kind": "kv_producer", "prompt_tokens": 800,
         "cached_tokens": 0},
        {"x_request_id": "run-1", "kind": "kv_consumer", "prompt_tokens": 800,
         "cached_tokens": 0},
        {"x_request_id": "other-2", "kind": "kv_producer", "prompt_tokens": 5,
         "cached_tokens": 4}])
    jobs, idx, missing = bound.jobs_for(recs, sim, "run")
    assert idx == [0, 1, 2] and missing == 1
    assert jobs[0] == bound.Job(0.0, 1000, 512, 3)
    assert jobs[1] == bound.Job(0.5, 800, 0, 3)
    assert jobs[2] == bound.Job(1.0, 900, 0, 3)        # the client's numbers
    b = bound.compute(recs, sim, "run", bound.cluster_for(sim), source="omni")
    assert b["requests"] == 3 and "1 of 3 requests had no simulator record" in b["notes"][0]
    assert set(b["policies"]["sjf"]["requests"]) == {"0", "1", "2"}

    summary = {"label": "omni", "completed": 3, "errors": 1, "request_throughput": 1.0,
               "output_token_throughput": 3.0, "goodput": 1.0,
               "ttft_ms": {"mean": 4 * b["policies"]["sjf"]["ttft_ms"]["mean"],
                           "p99": 2 * b["policies"]["fcfs"]["ttft_ms"]["p99"]},
               "tpot_ms": {"mean": 1.0, "p99": 1.0}, "e2e_ms": {"p99": 1.0}}
    m = bound.multiples(summary, b)
    assert m["mean/sjf"] == pytest.approx(4.0) and m["p99/fcfs"] == pytest.approx(2.0)
    table = report.markdown_compare([summary], b)
    assert "| bound: SJF (clairvoyant, non-preemptive) | 3/0 |" in table
    assert "| omni | " in table and "4.00" in table and "mean / SRPT" in table
    assert "Note: 1 of 3 requests" in table


def test_compare_picks_the_omni_row_and_survives_a_run_without_completions():
    from omni_ctl.bench import compare
    sim = _sim(records=[{"x_request_id": "compare-omni-0", "kind": "kv_producer",
                         "prompt_tokens": 100, "cached_tokens": 0}])
    rows = [{"label": "vllm-router"}, {"label": "omni-round-robin"}, {"label": "omni"}]
    have = {"vllm-router": ("vllm-router", sim), "omni-round-robin": ("omni-round-robin", sim),
            "omni": ("omni", sim)}
    assert compare.bound_source(rows, have) == "omni"
    assert compare.bound_source(rows[:2], have) == "omni-round-robin"
    assert compare.bound_source(rows[:1], have) == "vllm-router"
    assert compare.bound_source(rows, {}) is None
    logged = []
    failed = [RequestRecord(index=0, session=0, turn=0, start_s=0.0, ok=False)]
    assert compare.compare_bounds(rows, {"omni": failed}, {"omni": ("omni", sim)}, [],
                                  logged.append) is None
    assert "no completed request" in logged[0]
    ok = [RequestRecord(index=0, session=0, turn=0, start_s=0.0, ok=True, output_tokens=2)]
    b = compare.compare_bounds(rows, {"omni": ok}, {"omni": ("omni", sim)}, [], logged.append)
    assert b["source"] == "omni" and b["requests"] == 1 and b["notes"] == []
