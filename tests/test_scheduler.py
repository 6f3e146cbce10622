"""The scheduler (omni_schedule_policy omni) with the simulator: requests are
held in the proxy and released in policy order when an instance can take
them; prefix affinity gives way to load; decode work is placed longest
first; parallel mode binds a pair that can both take the request.

The simulator runs the tiny preset slowed down (--speedup < 1) so that
prefills take tens to hundreds of milliseconds and the order of events is
decided by the scheduler, not by chance.  Timing enters only as generous
bounds.
"""

import concurrent.futures
import contextlib
import json
import threading
import time

import pytest

from omni_ctl.scoring import lib
from omni_ctl.sim.cluster import SimCluster

import schedlog
from conftest import random_tokens as _tokens, wait_until
from test_ingest_proxy import _agent, _stop

pytestmark = pytest.mark.timeout(180)




def _post(nginx, body, rid, timeout=60):
    resp = nginx.post("/v1/completions", json=body, headers={"X-Request-Id": rid},
                      timeout=timeout)
    assert resp.status == 200, (rid, resp.status, resp.text)
    return resp


_access = schedlog.access
_prefill_starts = schedlog.prefill_starts
_prefill_records = schedlog.prefill_records


def _wait_busy(nginx, role, timeout=10):
    deadline = time.monotonic() + timeout
    while not any(i["role"] == role and i["inflight_requests"]
                  for i in nginx.status()["instances"]):
        assert time.monotonic() < deadline, f"nothing in flight on {role}"
        time.sleep(0.01)


def _idle(nginx, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        st = nginx.status()
        if (st["totals"]["inflight_requests"] == 0
                and all(i["inflight_requests"] == 0 and i["inflight_tokens"] == 0
                        for i in st["instances"])
                and st["queues"]["prefill_waiting"] == 0
                and st["queues"]["decode_waiting"] == 0):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_by_one():
    # one prefill, one decode; steps 20x slower than the tiny preset
    with SimCluster(prefill=1, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.05"]) as sim:
        yield sim


@pytest.mark.parametrize("order", ["sjf", "fcfs"])
def test_burst_is_held_and_released_in_policy_order(omni_nginx, one_by_one, tmp_path,
                                                    order):
    sim = one_by_one
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", prefill_queue_order=order,
                       prefill_max_num_seqs=1, max_batch_num_token=1,
                       prefill_starvation_timeout="60s",
                       access_log_file=str(tmp_path / "access.log"))
    sim_before = sim.stats()["cluster"]

    def body(n, seed):
        return {"prompt": _tokens(n, f"{order}-{seed}"), "max_tokens": 2,
                "ignore_eos": True}

    pool = concurrent.futures.ThreadPoolExecutor(8)
    tag = f"{order}-{time.monotonic_ns()}"
    futures = [pool.submit(_post, nginx, body(12000, 1), f"block-{tag}")]
    _wait_busy(nginx, "prefill")
    # long ones first, then short ones, all while the blocker runs
    names = [f"long{i}-{tag}" for i in range(2)] + [f"short{i}-{tag}" for i in range(2)]
    peak = 0
    for k, name in enumerate(names):
        futures.append(pool.submit(_post, nginx,
                                   body(2400 if name.startswith("long") else 64, 10 + k),
                                   name))
        time.sleep(0.02)
        peak = max(peak, nginx.status()["queues"]["prefill_waiting"])
    for f in futures:
        f.result(timeout=120)
    pool.shutdown()

    # the proxy held the burst; the engine never had more than one waiting
    assert peak >= 3, peak
    for inst in sim.stats()["cluster"]:
        if inst["role"] == "prefill":
            assert inst["max_waiting_seen"] <= 1, inst

    starts = _prefill_starts(sim, set(names), tmp_path)
    released = sorted(names, key=lambda n: starts[n])
    if order == "sjf":
        assert [n.split("-")[0] for n in released] == ["short0", "short1", "long0", "long1"]
    else:
        assert [n.split("-")[0] for n in released] == ["long0", "long1", "short0", "short1"]
    log = _access(tmp_path)
    assert all(int(log[n]["queue_ms"]) > 0 for n in names)
    _idle(nginx)
    del sim_before


def _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation):
    """Omni policy, shortest first, one prefill at a time on the one instance."""
    return omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                      decode_endpoints=sim.decode_endpoints[0],
                      schedule_policy="omni", prefill_queue_order="sjf",
                      prefill_max_num_seqs=1, max_batch_num_token=1,
                      prefill_starvation_timeout=starvation,
                      access_log_file=str(tmp_path / "access.log"))


def test_starvation_timeout_bounds_the_wait(omni_nginx, one_by_one, tmp_path):
    """Short requests keep coming; shortest-first would keep the long one
    waiting while they do, the starvation timeout lets it go first."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="800ms")
    tag = time.monotonic_ns()
    pool = concurrent.futures.ThreadPoolExecutor(16)
    futures = [pool.submit(_post, nginx, {"prompt": _tokens(4000, 1), "max_tokens": 1},
                           f"block-{tag}")]
    _wait_busy(nginx, "prefill")
    # long enough that aging alone would keep it back for seconds
    futures.append(pool.submit(_post, nginx, {"prompt": _tokens(30000, 2), "max_tokens": 1},
                               f"long-{tag}"))
    stop = time.monotonic() + 3.0
    k = 0
    while time.monotonic() < stop:
        futures.append(pool.submit(_post, nginx,
                                   {"prompt": _tokens(64, 100 + k), "max_tokens": 1},
                                   f"short{k}-{tag}"))
        k += 1
        time.sleep(0.04)
    for f in futures:
        f.result(timeout=120)
    pool.shutdown()

    log = _access(tmp_path)
    waited = int(log[f"long-{tag}"]["queue_ms"])
    # it went by the starvation rule (its wait plus its work reached the
    # timeout), not much past the timeout (plus the one prefill that was
    # running when it struck)
    assert log[f"long-{tag}"]["release"] == "starved", log[f"long-{tag}"]
    assert waited <= 2000, waited
    status = _idle(nginx)
    assert status["queues"]["released_by_starvation_timeout"] >= 1


def _short_then_long(nginx, block, long, gap, short=64):
    """A blocker of `block` tokens; while it runs, a `short`-token request,
    then `gap` s later one of `long` tokens.  All answered; their request
    ids."""
    tag = time.monotonic_ns()
    names = {k: f"{k}-{tag}" for k in ("block", "short", "long")}
    pool = concurrent.futures.ThreadPoolExecutor(4)
    futures = [pool.submit(_post, nginx, {"prompt": _tokens(block, f"b{tag}"),
                                          "max_tokens": 1}, names["block"])]
    _wait_busy(nginx, "prefill")
    futures.append(pool.submit(_post, nginx, {"prompt": _tokens(short, f"s{tag}"),
                                              "max_tokens": 1}, names["short"]))
    time.sleep(gap)
    futures.append(pool.submit(_post, nginx, {"prompt": _tokens(long, f"l{tag}"),
                                              "max_tokens": 1}, names["long"]))
    for f in futures:
        f.result(timeout=60)
    pool.shutdown()
    return names


def test_a_longer_request_does_not_join_a_shorter_ones_step(omni_nginx, one_by_one,
                                                           tmp_path):
    """Engines batch in steps, and what waits for the next step shares it.
    A short request sent to a busy instance, then a long one right behind
    it, would share a step: the short one would finish with the long one's
    first chunk.  The long one is held until the short one is predicted
    done, so it reaches the engine after the short one's step began.  (The
    slack is wide, so that without this rule both would be sent at once.)"""
    sim = one_by_one
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", hold_slack="300ms",
                       access_log_file=str(tmp_path / "access.log"))
    names = _short_then_long(nginx, block=4000, long=4000, gap=0.01)

    seen = _prefill_records(sim, set(names.values()), tmp_path)
    short, long_ = seen[names["short"]], seen[names["long"]]
    short_step = short["arrival_unix"] + short["queue_s"]
    assert long_["arrival_unix"] > short_step, (short, long_)
    log = _access(tmp_path)
    # the long one waited in the proxy, the short one did not (it went at
    # once; its queue_ms may read 1 when a millisecond ticks between its
    # arrival and its release: not a wait)
    assert int(log[names["long"]]["queue_ms"]) > 0, log[names["long"]]
    assert log[names["short"]]["release"] == "now", log[names["short"]]
    assert int(log[names["short"]]["queue_ms"]) <= 20, log[names["short"]]
    _idle(nginx)


def test_short_requests_held_together_share_one_engine_step(omni_nginx, one_by_one,
                                                           tmp_path):
    """Three 200-token requests wait in the proxy behind a long one.  When
    it ends, the first goes to the idle engine and starts a step; the other
    two go at once too, to share a step (their tokens add less than the
    slack and less than that step's own work), where held until the
    instance was free each waited for the one before (docs/scheduler.md,
    "Short prompts share a step")."""
    sim = one_by_one
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni",
                       access_log_file=str(tmp_path / "access.log"))
    tag = time.monotonic_ns()
    names = [f"short{k}-{tag}" for k in range(3)]
    pool = concurrent.futures.ThreadPoolExecutor(4)
    futures = [pool.submit(_post, nginx, {"prompt": _tokens(12000, f"b{tag}"),
                                          "max_tokens": 1}, f"block-{tag}")]
    _wait_busy(nginx, "prefill")
    for k, name in enumerate(names):
        futures.append(pool.submit(_post, nginx,
                                   {"prompt": _tokens(200, f"s{k}-{tag}"),
                                    "max_tokens": 1}, name))
    for f in futures:
        f.result(timeout=60)
    pool.shutdown()

    seen = _prefill_records(sim, set(names), tmp_path)
    steps = sorted(seen[n]["arrival_unix"] + seen[n]["queue_s"] for n in names)
    log = _access(tmp_path)
    # all three waited in the proxy for the long one
    assert all(int(log[n]["queue_ms"]) > 0 for n in names), [log[n] for n in names]
    # released in one pass (held until the instance was free, the second
    # went 5-30 ms after the first, the third later still), so the three
    # prefills ran in at most two engine steps: the one the first started
    # (which another may have reached in time) and the next (a step is 40 ms
    # or more on this cluster)
    released = [int(log[n]["start_us"]) // 1000 + int(log[n]["queue_ms"])
                for n in names]
    assert max(released) - min(released) <= 2, [log[n] for n in names]
    distinct = 1 + sum(b - a > 0.005 for a, b in zip(steps, steps[1:]))
    assert distinct <= 2, (steps, [seen[n] for n in names])
    _idle(nginx)


BLOCKER = 12000      # tokens: about 0.6 s of prefill on the one_by_one cluster


def test_a_text_prompt_goes_its_tokenization_early(omni_nginx, one_by_one, tmp_path):
    """The engine tokenizes a text prompt before it can schedule it, so a
    held text request may go that much before its instance frees
    (omni_engine_tokenize_ns, here 1 ms a token: far more than the blocker's
    work left); the same request as token ids, or with the allowance off,
    waits in the proxy until the instance is about to free.  The blocker is
    long (about 0.6 s) so that a slow machine (CI under ASan) still sends
    the text request well before the blocker's predicted end."""
    sim = one_by_one
    text = " ".join(["word"] * 960)          # 4,800 bytes: 1,200 tokens estimated
    results = {}
    for ns in (1_000_000, 0):
        logs = tmp_path / f"ns{ns}"
        logs.mkdir()
        nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                           decode_endpoints=sim.decode_endpoints[0],
                           schedule_policy="omni", engine_tokenize_ns=ns,
                           access_log_file=str(logs / "access.log"))
        assert nginx.status()["config"]["engine_tokenize_ns"] == ns
        tag = time.monotonic_ns()
        # the predictor learns what a blocker costs (its prior alone may
        # call the instance free at once)
        for k in range(3):
            _post(nginx, {"prompt": _tokens(BLOCKER, f"w{k}{tag}"), "max_tokens": 1},
                  f"warm-{k}-{tag}")
        _idle(nginx)
        for kind, prompt in (("text", text), ("ids", _tokens(400, f"i{tag}"))):
            pool = concurrent.futures.ThreadPoolExecutor(2)
            blocker = pool.submit(_post, nginx, {"prompt": _tokens(BLOCKER, f"b{kind}{tag}"),
                                                 "max_tokens": 1}, f"block-{kind}-{tag}")
            _wait_busy(nginx, "prefill")
            # past the blocker's first step: a request sent within 1 ms of
            # it joins that step (sent at once, nothing to wait for)
            time.sleep(0.05)
            rid = f"{kind}-{ns}-{tag}"
            _post(nginx, {"prompt": prompt, "max_tokens": 1}, rid)
            blocker.result(timeout=60)
            pool.shutdown()
            _idle(nginx)
            results[kind, ns] = _access(logs)[rid]
    # sent at once (not held: a millisecond of the proxy's own time at most)
    # though the blocker had far more than the slack left
    sent_early = results["text", 1_000_000]
    assert int(sent_early["queue_ms"]) < 50 and sent_early["release"] == "now", sent_early
    assert int(sent_early["prefill_pred_wait_ms"]) > 100, sent_early
    for key in (("ids", 1_000_000), ("text", 0), ("ids", 0)):
        held = results[key]
        assert int(held["queue_ms"]) > 100, (key, held)
        assert int(held["prefill_pred_wait_ms"]) <= 20, (key, held)


def test_over_its_budget_an_instance_takes_the_next_one_during_its_last_step(
        omni_nginx, one_by_one, tmp_path):
    """An instance over its batch budget (omni_max_batch_num_token 1 here:
    any request in flight fills it) is busy until its prefill's answer comes
    back, and then idles while the proxy binds the next request and that
    one travels to the engine: the handover.  With the engines' step budget
    known (omni_prefill_step_tokens, the tiny preset's 4,096), the next
    request goes the slack before the blocker's predicted end when the
    blocker's last step (12,000 % 4,096 = 3,808 tokens, about 190 ms here)
    is long enough: it reaches the engine during that step and starts in
    the next one, not sharing it.  With a short last step (8,292 % 4,096 =
    100 tokens, about 45 ms) or without the step budget (0), it goes only
    when the blocker's answer is back; nor when it is released for having
    starved (a starvation timeout of 1 ms: every held request starves)."""
    sim = one_by_one
    seen = {}
    for step_tokens, starve in ((4096, "60s"), (0, "60s"), (4096, "1ms")):
        logs = tmp_path / f"step{step_tokens}-{starve}"
        logs.mkdir()
        nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                           decode_endpoints=sim.decode_endpoints[0],
                           schedule_policy="omni", max_batch_num_token=1,
                           prefill_step_tokens=step_tokens, hold_slack="50ms",
                           prefill_starvation_timeout=starve,
                           access_log_file=str(logs / "access.log"))
        assert nginx.status()["config"]["prefill_step_tokens"] == step_tokens
        tag = time.monotonic_ns()
        # the predictor learns what a prefill costs here, one at a time
        for k, n in enumerate((4000, 8000, 12000, 4000, 8000, 12000)):
            _post(nginx, {"prompt": _tokens(n, f"w{k}{tag}"), "max_tokens": 1},
                  f"warm-{k}-{tag}")
        _idle(nginx)
        blockers = (12000, 8292) if (step_tokens, starve) == (4096, "60s") else (12000,)
        for blocker_tokens in blockers:
            pool = concurrent.futures.ThreadPoolExecutor(2)
            bid = f"block-{blocker_tokens}-{step_tokens}-{starve}-{tag}"
            blocker = pool.submit(_post, nginx,
                                  {"prompt": _tokens(blocker_tokens, f"b{bid}"),
                                   "max_tokens": 1}, bid)
            _wait_busy(nginx, "prefill")
            time.sleep(0.05)
            rid = f"next-{blocker_tokens}-{step_tokens}-{starve}-{tag}"
            _post(nginx, {"prompt": _tokens(400, f"n{rid}"), "max_tokens": 1}, rid)
            blocker.result(timeout=60)
            pool.shutdown()
            _idle(nginx)
            rec = _prefill_records(sim, {bid, rid}, logs)
            log = _access(logs)
            seen[blocker_tokens, step_tokens, starve] = (rec[bid], rec[rid], log[rid])

    for (blocker_tokens, step_tokens, starve), (b, n, log) in seen.items():
        end = b["arrival_unix"] + b["ttft_s"]
        # held in the proxy first, whatever the rule (the blocker ran on)
        assert int(log["queue_ms"]) > 100, (blocker_tokens, step_tokens, log)
        assert log["release"] == ("starved" if starve == "1ms" else "order"), log
        # never in the blocker's step: it starts when the blocker is done
        assert n["arrival_unix"] + n["queue_s"] >= end - 0.002, (b, n)
        if (blocker_tokens, step_tokens, starve) == (12000, 4096, "60s"):
            # reached the engine before the blocker's answer came back
            assert n["arrival_unix"] < end, (b, n, log)
        else:
            assert n["arrival_unix"] >= end, (blocker_tokens, step_tokens, b, n)


@contextlib.contextmanager
def _parallel_one_prefill(omni_nginx, tmp_path, sim_args=(), before_warm=None,
                          **conf):
    """Parallel P/D (SGLang simulator, h100 preset at half speed: KV
    transfers of tens to hundreds of ms), one prefill instance over its
    batch budget whenever it has work, its predictor warmed up one prefill
    at a time (after `before_warm(sim, nginx)`)."""
    with SimCluster(prefill=1, decode=1, engine="sglang",
                    preset="llama3-8b-h100",
                    args=["--speedup", "0.5", *sim_args]) as sim:
        nginx = omni_nginx(pd_policy="parallel",
                           prefill_endpoints=sim.prefill_endpoints[0],
                           decode_endpoints=sim.decode_endpoints[0],
                           schedule_policy="omni", max_batch_num_token=1,
                           prefill_step_tokens=8192,
                           access_log_file=str(tmp_path / "access.log"), **conf)
        if before_warm is not None:
            before_warm(sim, nginx)
        tag = time.monotonic_ns()
        for k, n in enumerate((4000, 12000, 8000, 4000, 12000, 8000)):
            _post(nginx, {"prompt": _tokens(n, f"w{k}{tag}"), "max_tokens": 1},
                  f"warm-{k}-{tag}")
        _idle(nginx)
        yield sim, nginx, tag


def _blocker_then_next(nginx, tag, blocker_tokens, gap):
    """A blocker of blocker_tokens, then, `gap` s after its prefill leg is
    in flight, a 400-token request; returns their request ids."""
    bid, rid = f"block-{tag}", f"next-{tag}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(_post, nginx,
                              {"prompt": _tokens(blocker_tokens, f"b{bid}"),
                               "max_tokens": 1}, bid)
        _wait_busy(nginx, "prefill")
        time.sleep(gap)
        _post(nginx, {"prompt": _tokens(400, f"n{rid}"), "max_tokens": 1}, rid)
        blocker.result(timeout=60)
    return bid, rid


@pytest.mark.parametrize("starve", ["60s", "1ms"])
def test_parallel_an_instance_takes_the_next_one_while_its_kv_transfers(
        omni_nginx, tmp_path, starve):
    """Parallel P/D (SGLang): a prefill leg answers after its KV transfer,
    which the engine overlaps with its next work.  The instance is over its
    batch budget (omni_max_batch_num_token 1) until that answer, but once
    its work is predicted done it is free: the next request, held in the
    proxy meanwhile, reaches the engine before the blocker's answer comes
    back, and still not before the blocker's work is over.  A starved one
    too (a starvation timeout of 1 ms: every held request starves), which
    the last-step rule does not let go early.  Counted busy until the
    answer, the engine idled through every transfer (docs/scheduler.md,
    "Parallel P/D: the transfer counted busy")."""
    with _parallel_one_prefill(omni_nginx, tmp_path,
                               prefill_starvation_timeout=starve) as (sim, nginx, tag):
        bid, rid = _blocker_then_next(nginx, tag, 12000, 0.05)
        _idle(nginx)
        rec = _prefill_records(sim, {bid, rid}, tmp_path)
        log = _access(tmp_path)
    b, n = rec[bid], rec[rid]
    end = b["arrival_unix"] + b["ttft_s"]
    answer = int(log[bid]["start_us"]) / 1e6 + int(log[bid]["prefill_ms"]) / 1e3
    # the transfer after the blocker's work (tens of ms here) is what the
    # engine would idle through
    assert answer - end > 0.04, (b, log[bid])
    assert int(log[rid]["queue_ms"]) > 100, log[rid]
    assert log[rid]["release"] == ("starved" if starve == "1ms" else "order")
    # at the engine within the first half of the transfer (counted busy
    # until the answer, it came 90% of the way through, or after it)
    assert n["arrival_unix"] < end + (answer - end) / 2, (end, answer, n, log[rid])
    # and not into the blocker's work
    assert n["arrival_unix"] + n["queue_s"] >= end - 0.002, (end, n)


def test_parallel_a_short_prompt_answered_before_the_long_one_frees_the_instance(
        omni_nginx, tmp_path):
    """Parallel P/D (SGLang): the engine serves in order, but a short prompt
    queued behind a long one is answered first, its transfer being short,
    while the long one's transfer still runs.  The engine is then past both.
    The predictor re-anchored the instance at the short one's end plus the
    long one's service once more, so the next request, held meanwhile, went
    out only at the long one's answer; now it reaches the engine right after
    the short one's answer (docs/scheduler.md, "Parallel P/D: answers out of
    order")."""
    with _parallel_one_prefill(omni_nginx, tmp_path) as (sim, nginx, tag):
        lid, sid, rid = f"long-{tag}", f"short-{tag}", f"next-{tag}"
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(_post, nginx,
                                {"prompt": _tokens(24000, f"l{lid}"),
                                 "max_tokens": 1}, lid)]
            _wait_busy(nginx, "prefill")
            time.sleep(0.2)
            futs.append(pool.submit(_post, nginx,
                                    {"prompt": _tokens(200, f"s{sid}"),
                                     "max_tokens": 1}, sid))
            _wait_held(nginx, 1)
            time.sleep(0.01)
            futs.append(pool.submit(_post, nginx,
                                    {"prompt": _tokens(400, f"n{rid}"),
                                     "max_tokens": 1}, rid))
            for f in futs:
                f.result(timeout=60)
        _idle(nginx)
        rec = _prefill_records(sim, {lid, sid, rid}, tmp_path)
        log = _access(tmp_path)

    def answer(i):
        return int(log[i]["start_us"]) / 1e6 + int(log[i]["prefill_ms"]) / 1e3

    long_end = rec[lid]["arrival_unix"] + rec[lid]["ttft_s"]
    # the premise: the short one ran after the long one's work and was
    # answered well before it (the long one's transfer is ~250 ms here)
    assert rec[sid]["arrival_unix"] + rec[sid]["queue_s"] >= long_end - 0.002
    assert answer(sid) < answer(lid) - 0.15, (answer(sid), answer(lid), log)
    # the next one was held, then reached the engine soon after the short
    # one's answer, long before the long one's (on b01c071: at it)
    assert int(log[rid]["queue_ms"]) > 50, log[rid]
    assert rec[rid]["arrival_unix"] < answer(lid) - 0.1, (rec[rid], answer(lid))
    assert rec[rid]["arrival_unix"] >= answer(sid) - 0.05, (rec[rid], answer(sid))


def test_parallel_the_engines_events_tell_a_prefill_end_before_its_answer(
        omni_nginx, tmp_path):
    """Parallel P/D (SGLang) with the KV-event agent: the engine publishes a
    prompt's last block when its prefill is done, before the KV transfer
    that its answer waits for.  Here the predictor learnt an engine twice as
    slow as it is (warmed up under the simulator's slow fault), so its
    predicted end is seconds late; the next request, held meanwhile, went
    out only at the blocker's answer, a transfer after the engine's end.
    Told by the engine's events, it reaches the engine right after that end
    (docs/scheduler.md, "Parallel P/D: the engine tells the end")."""
    agent = None

    def slow_warm_up(sim, nginx):
        nonlocal agent
        agent = _agent(nginx)
        wait_until(lambda: all(i["agent"]["mode"] == "precise"
                               for i in nginx.status()["instances"]),
                   timeout=30, what="the agent's instances precise")
        sim.fault(sim.prefill_urls[0], mode="slow", factor=2)

    try:
        with _parallel_one_prefill(omni_nginx, tmp_path, sim_args=["--kv-events"],
                                   before_warm=slow_warm_up,
                                   block_size=16) as (sim, nginx, tag):
            sim.fault(sim.prefill_urls[0], mode="none")
            before = nginx.status()["ingest"]["engine_ends"]
            bid, rid = _blocker_then_next(nginx, tag, 24000, 0.2)
            st = _idle(nginx)
            rec = _prefill_records(sim, {bid, rid}, tmp_path)
            log = _access(tmp_path)
    finally:
        if agent is not None:
            _stop(agent)
    b, n = rec[bid], rec[rid]
    end = b["arrival_unix"] + b["ttft_s"]
    answer = int(log[bid]["start_us"]) / 1e6 + int(log[bid]["prefill_ms"]) / 1e3
    # the premises: predicted far too late, and answered a transfer after
    # the engine's end
    assert int(log[bid]["prefill_pred_ms"]) > 1.5 * b["ttft_s"] * 1000, (b, log[bid])
    assert answer - end > 0.15, (end, answer, log[bid])
    assert int(log[rid]["queue_ms"]) > 100, log[rid]
    # told by the events (flushed every 20 ms), it went out at the end, not
    # at the answer (it came after the answer before the events were heard)
    assert n["arrival_unix"] < end + 0.1, (end, answer, n, log[rid])
    assert n["arrival_unix"] + n["queue_s"] >= end - 0.002, (end, n)
    assert st["ingest"]["engine_ends"] > before, st["ingest"]
    prefill = [i for i in st["instances"] if i["role"] == "prefill"][0]
    assert prefill["predictor"]["engine_ends"] >= 1, prefill["predictor"]


def test_past_the_starvation_timeout_the_oldest_goes_first(omni_nginx, one_by_one,
                                                          tmp_path):
    """Under a backlog every request is past the starvation timeout.  Among
    those the oldest goes first (it minimises the largest TTFT among them):
    here a short prompt, then a long one.  Before issue 24 the one whose
    TTFT would be the largest (waited + predicted work) went first, the long
    one, and under a backlog every short starved request waited behind the
    long ones."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="200ms")
    names = _short_then_long(nginx, block=12000, long=6000, gap=0.05)

    starts = _prefill_starts(sim, {names["short"], names["long"]}, tmp_path)
    assert starts[names["short"]] < starts[names["long"]], starts
    log = _access(tmp_path)
    # both were held past the timeout (the blocker takes ~600 ms), and the
    # short one went by the starvation rule, not by its key
    assert int(log[names["short"]]["queue_ms"]) > 200, log[names["short"]]
    assert int(log[names["long"]]["queue_ms"]) > 200, log[names["long"]]
    assert log[names["short"]]["release"] == "starved", log[names["short"]]
    status = _idle(nginx)
    assert status["queues"]["released"]["starved"] >= 2
    # (released_by_starvation_timeout counts the releases the timeout took
    # out of key order: none here, the oldest is also the shortest)


@pytest.fixture(scope="module")
def two_prefill():
    with SimCluster(prefill=2, decode=1, engine="vllm", preset="tiny",
                    args=["--speedup", "0.05"]) as sim:
        yield sim


def _wait_held(nginx, n, timeout=10):
    deadline = time.monotonic() + timeout
    while nginx.status()["queues"]["prefill_waiting"] < n:
        assert time.monotonic() < deadline, f"fewer than {n} held"
        time.sleep(0.01)


def test_a_younger_longer_request_starves_first(omni_nginx, one_by_one, tmp_path):
    """A request is starved when the TTFT it would have if it started now
    (its wait plus its predicted prefill) reaches the timeout (wave 6).
    Behind a blocker, a short prompt, then a long one: when the blocker
    ends, the long one's wait plus its work is past the timeout and the
    short one's is not, so the younger, longer one goes first, by the
    starvation rule.  With the wait alone (before wave 6) neither had
    waited the timeout and shortest-first took the short one.  (The work
    counts once the instance's model has fitted a few prefills: warmed up
    first.  The short one, 1,000 tokens, about 80 ms, is not short enough
    to go before the starved: test_a_short_request_goes_before_the_starved.)"""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="900ms")
    _warm_up(nginx)
    names = _short_then_long(nginx, block=12000, long=12000, gap=0.05, short=1000)

    log = _access(tmp_path)
    starts = _prefill_starts(sim, {names["short"], names["long"]}, tmp_path)
    assert starts[names["long"]] < starts[names["short"]], (starts, log)
    assert log[names["long"]]["release"] == "starved", log[names["long"]]
    # neither had waited the timeout when the long one went
    assert int(log[names["long"]]["queue_ms"]) < 900, log[names["long"]]
    _idle(nginx)


def _warm_up(nginx):
    """The starvation rule counts the work of a fitted model only, not the
    prior's guess: a few prefills of several sizes, one at a time."""
    tag = time.monotonic_ns()
    for k in range(lib.OMNI_POLICY_STARVE_SAMPLES):
        _post(nginx, {"prompt": _tokens(2000 + 1500 * k, f"w{k}{tag}"),
                      "max_tokens": 1}, f"warm-{k}-{tag}")
    _idle(nginx)


def test_a_short_request_goes_before_the_starved(omni_nginx, one_by_one, tmp_path):
    """A request whose predicted work is at most OMNI_POLICY_SHORT_PCT % of
    the starvation timeout goes first, ahead of the starved, while the
    oldest starved one is less than OMNI_POLICY_SHORT_LATE_PCT % of the
    timeout past its bound (stop 46).  A 3 s timeout (a 120 ms limit, a
    0.6 s window); behind a blocker of about 2.8 s, a 64-token request
    (about 45 ms here), then a 12,000-token one (about 0.6 s of work).  When
    the blocker ends the long one's wait plus work is about 3.4 s, past the
    timeout by two thirds of the window: it is starved, and the short one goes
    first all the same, released by the order.  On the module before, the
    starved long one went first."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="3s")
    _warm_up(nginx)
    names = _short_then_long(nginx, block=56000, long=12000, gap=0.05)

    log = _access(tmp_path)
    starts = _prefill_starts(sim, {names["short"], names["long"]}, tmp_path)
    assert starts[names["short"]] < starts[names["long"]], (starts, log)
    assert log[names["short"]]["release"] == "order", log[names["short"]]
    assert log[names["long"]]["release"] == "starved", log[names["long"]]
    _idle(nginx)


def test_an_unfitted_model_does_not_starve_a_long_prompt(omni_nginx, one_by_one,
                                                         tmp_path):
    """The same requests on a proxy just started: the instance's model is
    still the built-in prior, which guesses the long prompt's prefill at
    about 1 s here (0.6 s on this engine), past the 900 ms timeout before
    it waited at all.  Counted, that starved it at once, ahead of the
    shorter one, and in the first seconds of every Mooncake run it released
    42-56k-token prompts after waits of 0.25-0.8 s (docs/scheduler.md,
    "The prior's guess and the starvation rule").  Now shortest first takes
    the short one, and neither starves."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="900ms")
    names = _short_then_long(nginx, block=12000, long=12000, gap=0.05)

    log = _access(tmp_path)
    starts = _prefill_starts(sim, {names["short"], names["long"]}, tmp_path)
    assert starts[names["short"]] < starts[names["long"]], (starts, log)
    assert log[names["long"]]["release"] != "starved", log[names["long"]]
    assert log[names["short"]]["release"] != "starved", log[names["short"]]
    _idle(nginx)


def _behind_a_blocker(nginx, names, sizes, tag, pause=None):
    """Send names' requests (sizes: their prompt tokens, max_tokens 1) in
    order, 30 ms apart, the first (the blocker) once it runs, and `pause`
    seconds more before those named there; once all but the blocker are
    held, /omni/status then; returns it after every answer came."""
    pool = concurrent.futures.ThreadPoolExecutor(len(names))
    futures = []
    for k in names:
        time.sleep((pause or {}).get(k, 0))
        futures.append(pool.submit(_post, nginx, {"prompt": _tokens(sizes[k], f"{k}{tag}"),
                                                  "max_tokens": 1}, names[k]))
        if not futures[1:]:
            _wait_busy(nginx, "prefill")
        else:
            time.sleep(0.03)
    _wait_held(nginx, len(names) - 1)
    status = nginx.status()
    for f in futures:
        f.result(timeout=60)
    pool.shutdown()
    return status


def test_under_a_backlog_shortest_first_goes_on(omni_nginx, one_by_one, tmp_path):
    """Under a backlog deeper than the starvation timeout the bound follows
    the backlog (125% of the held work per instance), so shortest first goes
    on instead of turning first come first served (wave 10).  A 200 ms
    timeout; behind a blocker (~0.6 s) a long request (~0.2 s of work),
    then a 64-token one, then two more blockers' worth of work.  When the
    blocker ends both have waited past the timeout; with the timeout alone
    the oldest, the long one, went first (it fails on the module before).
    Now the bound is about 1.75 s, nobody is starved and the short one goes
    first.  /omni/status shows the bound while they wait, and the timeout
    again once the queue is empty."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="200ms")
    tag = time.monotonic_ns()
    names = {k: f"{k}-{tag}" for k in ("block", "long", "short", "more1", "more2")}
    sizes = {"block": BLOCKER, "long": 4000, "short": 64, "more1": BLOCKER,
             "more2": BLOCKER}
    held = _behind_a_blocker(nginx, names, sizes, tag)["queues"]

    log = _access(tmp_path)
    starts = _prefill_starts(sim, {names["long"], names["short"]}, tmp_path)
    assert starts[names["short"]] < starts[names["long"]], (starts, log)
    # both waited past the timeout, and the short one went by the order
    assert int(log[names["long"]]["queue_ms"]) > 200, log[names["long"]]
    assert int(log[names["short"]]["queue_ms"]) > 200, log[names["short"]]
    assert log[names["short"]]["release"] == "order", log[names["short"]]
    # the bound while they waited: 125% of the held work, one instance
    assert held["prefill_work_ms"] > 200, held
    assert abs(held["starvation_bound_ms"] - 1.25 * held["prefill_work_ms"]) <= 2, held
    status = _idle(nginx)
    assert status["queues"]["prefill_work_ms"] == 0
    assert status["queues"]["starvation_bound_ms"] == 200


def test_under_a_backlog_the_aging_weakens_with_the_bound(omni_nginx, one_by_one,
                                                        tmp_path):
    """The SJF key is work minus 0.25 x waited; when the starvation bound
    follows a backlog, the aging is scaled by timeout / bound (wave 11), or
    the waits of a deep backlog outweigh any difference in work and the
    order is first come first served again.  A 200 ms timeout; behind a
    long blocker (~1.2 s): `older` (4000 tokens), three blockers' worth of
    work, then ~0.75 s later `younger` (1000 tokens, ~0.15 s less work).
    With the aging fixed, 0.75 s of wait is worth ~0.19 s of work and
    `older` went first (it fails on the module before); at this backlog
    (bound ~2.6 s) the aging is under a tenth and `younger`, the shorter,
    goes first, by the order (nobody is starved).  /omni/status shows the
    weaker aging while they wait and 0.25 again at idle."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="200ms")
    tag = time.monotonic_ns()
    names = {k: f"{k}-{tag}" for k in ("block", "older", "more1", "more2", "more3",
                                       "younger")}
    sizes = {"block": 2 * BLOCKER, "older": 4000, "more1": BLOCKER, "more2": BLOCKER,
             "more3": BLOCKER, "younger": 1000}
    status = _behind_a_blocker(nginx, names, sizes, tag, pause={"younger": 0.75 - 0.03 * 4})

    log = _access(tmp_path)
    starts = _prefill_starts(sim, {names["older"], names["younger"]}, tmp_path)
    assert starts[names["younger"]] < starts[names["older"]], (starts, log)
    assert log[names["younger"]]["release"] == "order", log[names["younger"]]
    # while they waited: the bound followed the backlog, the aging with it
    held, sched = status["queues"], status["scheduler"]
    assert held["starvation_bound_ms"] > 1000, held
    assert 0 < sched["queue_aging"] < 0.25 * 200 / held["starvation_bound_ms"] * 1.5, \
        (held, sched)
    assert sched["aging_rekeys"] >= 1, sched
    status = _idle(nginx)
    assert status["scheduler"]["queue_aging"] == 0.25


def test_a_waiting_request_whose_prefix_was_sent_meanwhile_moves_up(
        omni_nginx, one_by_one, tmp_path):
    """A held request's place in the order is its predicted work, and that
    changes while it waits: here a request sharing its prefix is sent after
    it arrived, so most of its prompt is now cached.  Behind a blocker:
    `prefix` (the shared 4096 tokens alone), `shares` (the prefix + 2000
    tokens) and `other` (5000 tokens of its own).  At arrival nothing held
    the prefix: shortest first is prefix, other, shares.  Once `prefix` is
    sent, `shares` has 2000 tokens to compute, fewer than `other`, and goes
    before it.  Before the keys were computed again (the same key from
    arrival to release) `other` went first."""
    sim = one_by_one
    nginx = _sjf_one_at_a_time(omni_nginx, sim, tmp_path, starvation="60s")
    tag = time.monotonic_ns()
    shared = _tokens(4096, f"p{tag}")
    bodies = {"prefix": shared, "shares": shared + _tokens(2000, f"s{tag}"),
              "other": _tokens(5000, f"o{tag}")}
    names = {k: f"{k}-{tag}" for k in bodies}
    pool = concurrent.futures.ThreadPoolExecutor(4)
    futures = [pool.submit(_post, nginx, {"prompt": _tokens(BLOCKER, f"b{tag}"),
                                          "max_tokens": 1}, f"block-{tag}")]
    _wait_busy(nginx, "prefill")
    for k in ("prefix", "shares", "other"):
        futures.append(pool.submit(_post, nginx, {"prompt": bodies[k], "max_tokens": 1},
                                   names[k]))
        time.sleep(0.02)
    _wait_held(nginx, 1)
    for f in futures:
        f.result(timeout=60)
    pool.shutdown()

    log = _access(tmp_path)
    starts = _prefill_starts(sim, set(names.values()), tmp_path)
    order = [k for k in sorted(names, key=lambda k: starts[names[k]])]
    assert order == ["prefix", "shares", "other"], (order, log)
    # all three were held behind the blocker, and `shares` found its prefix
    assert all(int(log[n]["queue_ms"]) > 0 for n in names.values()), log
    assert int(log[names["shares"]]["cached_tokens"]) == 4096, log[names["shares"]]
    status = _idle(nginx)
    assert status["scheduler"]["queue_rekeys"] >= 1, status["scheduler"]


def _starving_pair(omni_nginx, sim, tmp_path):
    """nginx in front of the two prefill instances, SJF with a 100 ms
    starvation timeout (a request waiting starves at once), the predictor
    warmed on both: (nginx, tag)."""
    nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", prefill_queue_order="sjf",
                       prefill_starvation_timeout="100ms",
                       access_log_file=str(tmp_path / "access.log"))
    tag = time.monotonic_ns()
    # the predictor learns both instances first (its priors are a
    # different engine's): pairs of prompts, one on each instance
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for n in (2000, 8000, 16000, 24000):
            list(pool.map(lambda k: _post(nginx, {"prompt": _tokens(n, f"w{n}-{k}-{tag}"),
                                                  "max_tokens": 1}, f"warm{n}-{k}-{tag}"),
                          range(2)))
    _idle(nginx)
    return nginx, tag


def _send_spaced(nginx, bodies, tag):
    """POST each prompt of `bodies` (name -> prompt, in order) 50 ms after
    the one before, all at once in flight; waits for every answer and
    returns name -> request id."""
    names = {k: f"{k}-{tag}" for k in bodies}
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        futures = []
        for k, prompt in bodies.items():
            futures.append(pool.submit(_post, nginx, {"prompt": prompt, "max_tokens": 1},
                                       names[k]))
            time.sleep(0.05)
        for f in futures:
            f.result(timeout=60)
    return names


def test_a_starved_request_waiting_for_its_instance_does_not_idle_another(
        omni_nginx, two_prefill, tmp_path):
    """The oldest starved request is decided first; when it waits for a
    busy instance (most of its prompt is cached there), the entries after
    it in the order are offered what is free, and the shortest of them is
    the heap's head.  Two instances: `long` (24000 tokens, about 1.3 s)
    runs on one, `mid` (2000) on the other.  Then `starved` (long's prompt
    + 200: it waits for long's instance) and `short` (64 tokens); the
    timeout (100 ms) makes `starved` starved at once.  When mid ends, short
    takes that instance, about a second before long ends.  Before, the
    look ahead began after the heap's head, which was short, and short
    waited for long's end with the other instance idle."""
    sim = two_prefill
    nginx, tag = _starving_pair(omni_nginx, sim, tmp_path)
    long_ = _tokens(2 * BLOCKER, f"l{tag}")
    bodies = {"long": long_, "mid": _tokens(2000, f"m{tag}"),
              "starved": long_ + _tokens(200, f"s{tag}"), "short": _tokens(64, f"t{tag}")}
    names = _send_spaced(nginx, bodies, tag)

    log = _access(tmp_path)
    starts = _prefill_starts(sim, set(names.values()), tmp_path)
    # long and mid went at once to the two instances; starved waited for
    # long's (its prefix), short for the first free one
    assert log[names["long"]]["prefill"] != log[names["mid"]]["prefill"], log
    assert log[names["starved"]]["prefill"] == log[names["long"]]["prefill"], log
    assert log[names["short"]]["prefill"] == log[names["mid"]]["prefill"], log
    assert log[names["starved"]]["release"] == "starved", log[names["starved"]]
    assert int(log[names["starved"]]["cached_tokens"]) > 20000, log[names["starved"]]
    # short went when mid ended, well before long ended and starved went
    assert starts[names["starved"]] - starts[names["short"]] > 0.3, (starts, log)
    _idle(nginx)


def test_a_free_instance_goes_to_the_shortest_of_those_behind_in_queue_order(
        omni_nginx, two_prefill, tmp_path):
    """When the request deciding first waits for a busy instance, the free
    one is offered to the requests behind it in the queue's order, not in
    the order of the heap's array.  `starved` waits for `long`'s instance
    (its prefix); behind it `x` (12000 tokens) arrives before `y` (1000),
    so the heap's array holds [starved, x, y] while the order is starved,
    y, x.  When `mid` ends, y takes its instance.  Before, x was offered it
    first and took it for about 0.65 s, and y waited behind x or long (on
    the Mooncake run a 61k-token prompt took a free instance for 4 s that
    way while shorter requests waited)."""
    sim = two_prefill
    nginx, tag = _starving_pair(omni_nginx, sim, tmp_path)
    long_ = _tokens(2 * BLOCKER, f"l{tag}")
    bodies = {"long": long_, "mid": _tokens(6000, f"m{tag}"),
              "starved": long_ + _tokens(200, f"s{tag}"),
              "x": _tokens(BLOCKER, f"x{tag}"), "y": _tokens(1000, f"y{tag}")}
    names = _send_spaced(nginx, bodies, tag)

    log = _access(tmp_path)
    starts = _prefill_starts(sim, set(names.values()), tmp_path)
    assert log[names["long"]]["prefill"] != log[names["mid"]]["prefill"], log
    assert log[names["starved"]]["prefill"] == log[names["long"]]["prefill"], log
    # x and y were held (both instances busy), y took mid's instance first
    assert int(log[names["x"]]["queue_ms"]) > 0 and int(log[names["y"]]["queue_ms"]) > 0, log
    assert log[names["y"]]["prefill"] == log[names["mid"]]["prefill"], log
    assert starts[names["y"]] < starts[names["x"]], (starts, log)
    _idle(nginx)


def _prefill_instance(sim, resp):
    """The prefill instance that served an answer, by the id the engines saw
    (the proxy's own, X-Omni-Request-Id), and its cached tokens there."""
    rid = resp.headers.get("x-omni-request-id")
    for inst in sim.stats(requests=500)["cluster"]:
        for req in inst.get("requests", []):
            if req.get("x_request_id") == rid and inst["role"] == "prefill":
                return inst["url"], req["cached_tokens"]
    raise AssertionError(f"{rid} not seen by a prefill instance")


def test_prefix_affinity_yields_to_load(omni_nginx, two_prefill):
    sim = two_prefill
    nginx = omni_nginx(prefill_endpoints=",".join(sim.prefill_endpoints),
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni")
    tag = time.monotonic_ns()
    shared = _tokens(2048, 7)

    resp = _post(nginx, {"prompt": shared + _tokens(16, 8), "max_tokens": 1}, f"first-{tag}")
    holder, _ = _prefill_instance(sim, resp)

    # the same long prefix again: it goes where the prefix is cached
    resp = _post(nginx, {"prompt": shared + _tokens(16, 9), "max_tokens": 1}, f"again-{tag}")
    url, cached = _prefill_instance(sim, resp)
    assert url == holder and cached >= 2000, (url, holder, cached)

    # now keep the holder busy with a long uncached prefill: recomputing the
    # prefix on the idle instance finishes sooner than waiting for it
    pool = concurrent.futures.ThreadPoolExecutor(2)
    other = [u for u in sim.prefill_urls if u != holder][0]
    blocker = None
    for attempt in range(4):
        rid = f"block{attempt}-{tag}"
        blocker = pool.submit(_post, nginx, {"prompt": _tokens(16000, 20 + attempt),
                                             "max_tokens": 1}, rid)
        _wait_busy(nginx, "prefill")
        time.sleep(0.05)
        # the blocker is where it is; we need it on the holder
        busy = [i["address"] for i in nginx.status()["instances"]
                if i["role"] == "prefill" and i["inflight_requests"]]
        if holder.endswith(busy[0]):
            break
        blocker.result(timeout=60)
    else:
        pytest.fail("could not get a long prefill onto the prefix holder")

    resp = _post(nginx, {"prompt": shared + _tokens(16, 30), "max_tokens": 1}, f"busy-{tag}")
    url, cached = _prefill_instance(sim, resp)
    assert url == other, (url, other, holder)
    blocker.result(timeout=60)
    pool.shutdown()
    _idle(nginx)


@pytest.fixture(scope="module")
def two_decode():
    with SimCluster(prefill=1, decode=2, engine="vllm", preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        yield sim


def _decode_tokens(nginx):
    return {i["address"]: i["tokens_total"] for i in nginx.status()["instances"]
            if i["role"] == "decode"}


def _imbalance(before, after):
    loads = [after[a] - before[a] for a in after]
    return max(loads) / (sum(loads) / len(loads))


@pytest.mark.parametrize("policy", ["omni", "least-loaded"])
def test_lpt_evens_decode_load(omni_nginx, two_decode, policy):
    """Four short jobs, then a long one.  Placed in arrival order on the
    least-loaded instance, the long job lands on top of two short ones; held
    and placed longest first, it gets an instance to itself."""
    sim = two_decode
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=",".join(sim.decode_endpoints),
                       schedule_policy=policy, decode_max_num_seqs=1)
    tag = time.monotonic_ns()
    pool = concurrent.futures.ThreadPoolExecutor(8)
    futures = []
    if policy == "omni":
        # occupy both decode instances so the burst waits in the decode queue
        for k in range(2):
            futures.append(pool.submit(_post, nginx, {"prompt": _tokens(32, 50 + k),
                                                      "max_tokens": 20,
                                                      "ignore_eos": True},
                                       f"occupy{k}-{tag}"))
        deadline = time.monotonic() + 10
        while sum(i["inflight_requests"] for i in nginx.status()["instances"]
                  if i["role"] == "decode") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    before = _decode_tokens(nginx)
    jobs = [40] * 4 + [160]
    for k, n in enumerate(jobs):
        futures.append(pool.submit(_post, nginx, {"prompt": _tokens(32, 60 + k),
                                                  "max_tokens": n, "ignore_eos": True},
                                   f"job{k}-{tag}"))
        time.sleep(0.03)
    for f in futures:
        f.result(timeout=120)
    pool.shutdown()
    after = _decode_tokens(nginx)
    imbalance = _imbalance(before, after)
    if policy == "omni":
        # the long job and the four short ones split evenly
        assert imbalance < 1.25, (before, after)
    else:
        assert imbalance > 1.25, (before, after)
    _idle(nginx)


def test_parallel_pairs_share_a_room_and_respect_limits(omni_nginx):
    with SimCluster(prefill=2, decode=2, engine="sglang", preset="tiny",
                    args=["--speedup", "0.2"]) as sim:
        nginx = omni_nginx(pd_policy="parallel",
                           prefill_endpoints=",".join(sim.prefill_endpoints),
                           decode_endpoints=",".join(sim.decode_endpoints),
                           schedule_policy="omni", prefill_max_num_seqs=1,
                           decode_max_num_seqs=1)
        tag = time.monotonic_ns()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_post, nginx, {"prompt": _tokens(256, k),
                                                  "max_tokens": 8, "ignore_eos": True},
                                   f"p{k}-{tag}") for k in range(12)]
            peak = 0
            while not all(f.done() for f in futures):
                peak = max(peak, nginx.status()["queues"]["prefill_waiting"])
                time.sleep(0.01)
            for f in futures:
                f.result()
        # every pair met (the simulator's rendezvous needs the same room on
        # both legs; a mismatch fails both), and was held until both could
        # take it: no decode instance ever had two requests at once
        assert peak >= 2
        for inst in sim.stats()["cluster"]:
            if inst["role"] == "decode":
                assert inst["max_running_seen"] <= 1, inst
                assert inst["errors_total"] == 0, inst
        _idle(nginx)


def _held_client(nginx, body):
    """A raw client whose request will be held; returns its socket."""
    import socket
    sock = socket.create_connection((nginx.host, nginx.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_queue_bounds_and_a_client_that_leaves(omni_nginx, one_by_one):
    """Beyond omni_queue_max: 429 with Retry-After; held past
    omni_queue_timeout: 503; a held client that goes away leaves the queue
    at once and nothing it held stays charged."""
    sim = one_by_one
    nginx = omni_nginx(prefill_endpoints=sim.prefill_endpoints[0],
                       decode_endpoints=sim.decode_endpoints[0],
                       schedule_policy="omni", prefill_max_num_seqs=1,
                       max_batch_num_token=1, queue_max=2, queue_timeout="500ms",
                       prefill_starvation_timeout="60s")
    pool = concurrent.futures.ThreadPoolExecutor(4)
    # about 1.3 s of prefill at this speed
    blocker = pool.submit(_post, nginx, {"prompt": _tokens(28000, "qb-block"),
                                         "max_tokens": 1}, "qb-block")
    _wait_busy(nginx, "prefill")

    # one held by a client that will leave, one held until its timeout
    leaver = _held_client(nginx, {"prompt": _tokens(64, "qb-leave"), "max_tokens": 1})
    waiter = pool.submit(nginx.post, "/v1/completions",
                         json={"prompt": _tokens(64, "qb-wait"), "max_tokens": 1},
                         timeout=30)
    deadline = time.monotonic() + 10
    while nginx.status()["queues"]["prefill_waiting"] < 2:
        assert time.monotonic() < deadline, nginx.status()["queues"]
        time.sleep(0.01)

    # the queue is full
    full = nginx.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert full.status == 429, full.text
    # when the queue will have drained (omni_policy_retry_after), whole s
    assert 1 <= int(full.headers.get("retry-after")) <= 3600
    assert full.json()["error"]["type"] == "rate_limit_error"

    # the leaver goes: its place is free at once
    leaver.close()
    deadline = time.monotonic() + 5
    while nginx.status()["queues"]["prefill_waiting"] != 1:
        assert time.monotonic() < deadline, nginx.status()["queues"]
        time.sleep(0.01)

    # the other one waits past the queue timeout (the blocker takes longer)
    resp = waiter.result(timeout=30)
    assert resp.status == 503, resp.text
    assert 1 <= int(resp.headers.get("retry-after")) <= 3600
    assert "omni_queue_timeout" in resp.json()["error"]["message"]

    assert blocker.result(timeout=60).status == 200
    pool.shutdown()
    status = _idle(nginx)
    assert status["queues"]["rejected_full"] == 1
    assert status["queues"]["timed_out"] == 1
