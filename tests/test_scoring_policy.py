"""Scheduling policies (omni_policy.h): prefill choice with hold, LPT decode
ordering and placement, prefill queue order with aging."""

import random

import pytest

from omni_ctl.scoring import (DecodeInstance, DecodeJob, PrefillCandidate,
                              PrefixIndex, Predictor, QueueItem, add_prefill_delay,
                              assign_decode, choose_prefill, lpt_order, place_decode,
                              prepare_prefill, queue_order, queue_pick)
from omni_ctl.scoring_errors import InvalidArgumentError

# ---- prefill choice ---------------------------------------------------------


def test_cache_hit_on_busy_instance_loses_to_recompute_elsewhere():
    hit = PrefillCandidate(0, cached_tokens=3000, wait_us=400_000,
                           prefill_us=20_000, running=3)
    cold = PrefillCandidate(1, cached_tokens=0, wait_us=0, prefill_us=150_000)
    d = choose_prefill([hit, cold], prompt_tokens=3200)
    assert d.choice == 1 and d.cost_us == 150_000 and not d.hold


def test_cache_hit_wins_when_its_instance_is_free_soon():
    hit = PrefillCandidate(0, cached_tokens=3000, wait_us=30_000,
                           prefill_us=20_000)
    cold = PrefillCandidate(1, wait_us=0, prefill_us=150_000)
    assert choose_prefill([hit, cold], 3200).choice == 0


def test_what_a_prefill_costs_the_others():
    # queued behind it: (waiting - 1) / n requests delayed by t each
    c = add_prefill_delay([PrefillCandidate(0, prefill_us=100_000),
                           PrefillCandidate(1, prefill_us=100_000)], waiting=5)
    assert [x.prefill_us for x in c] == [300_000, 300_000]
    # arriving while it runs: t / gap / n of them, delayed by t / 2
    c = add_prefill_delay([PrefillCandidate(0, prefill_us=400_000),
                           PrefillCandidate(1, prefill_us=40_000)], waiting=1,
                          arrival_gap_us=100_000)
    assert [x.prefill_us for x in c] == [800_000, 44_000]
    # with a queue, those arriving meanwhile queue behind it: the larger count
    c = add_prefill_delay([PrefillCandidate(0, prefill_us=400_000),
                           PrefillCandidate(1, prefill_us=400_000)], waiting=5,
                          arrival_gap_us=100_000)
    assert [x.prefill_us for x in c] == [1_200_000, 1_200_000]
    # nothing waiting, arrivals unknown: its own time only
    c = add_prefill_delay([PrefillCandidate(0, prefill_us=400_000)], waiting=1)
    assert c[0].prefill_us == 400_000
    with pytest.raises(InvalidArgumentError):
        add_prefill_delay([PrefillCandidate(0)], waiting=1, arrival_gap_us=-1)


def test_a_busy_proxy_values_a_cache_hit_more():
    """The same two candidates: alone, the idle instance finishes this
    request sooner; with a request arriving every 100 ms, recomputing the
    prefix there delays the ones that come meanwhile by more than waiting
    for the instance that holds it."""
    def cands():
        return [PrefillCandidate(0, cached_tokens=3000, wait_us=300_000,
                                 prefill_us=100_000),
                PrefillCandidate(1, wait_us=0, prefill_us=350_000)]
    assert choose_prefill(add_prefill_delay(cands(), waiting=1), 4000).choice == 1
    assert choose_prefill(add_prefill_delay(cands(), waiting=1,
                                            arrival_gap_us=100_000), 4000).choice == 0


def test_end_to_end_prepare_with_index_and_predictor():
    """The same decision from real parts: the index says instance 0 holds
    most of the prompt, the predictor says instance 0 is busy for a long
    time; the choice flips when instance 0's queue drains."""
    bs = 16
    prompt = list(range(4096))
    ix = PrefixIndex(2, bs, 10_000)
    ix.insert(0, prompt[:3840], now_us=0)
    pred = Predictor(2, prefill_prior=(5000, 40_000, 0))
    busy = [pred.dispatch_prefill(0, 8192, 0, now_us=0) for _ in range(3)]
    cands = [PrefillCandidate(0), PrefillCandidate(1)]
    prepare_prefill(pred, cands, ix.match(prompt, now_us=0), bs, len(prompt),
                    now_us=0)
    assert cands[0].cached_tokens == 3840 and cands[1].cached_tokens == 0
    assert cands[0].wait_us > 900_000 and cands[1].wait_us == 0
    assert cands[0].prefill_us < cands[1].prefill_us
    assert choose_prefill(cands, len(prompt)).choice == 1
    for job in busy:
        pred.prefill_done(0, job, job.done_us)
    prepare_prefill(pred, cands, ix.match(prompt, now_us=0), bs, len(prompt),
                    now_us=busy[-1].done_us)
    assert cands[0].wait_us == 0
    assert choose_prefill(cands, len(prompt)).choice == 0


def test_fully_cached_prompt_still_computes_one_token():
    pred = Predictor(1, prefill_prior=(0, 1024, 0), min_us=1)
    c = [PrefillCandidate(0)]
    prepare_prefill(pred, c, [4], 16, 64, now_us=0)
    assert c[0].cached_tokens == 64 and c[0].prefill_us == 1


def test_hold_when_every_candidate_is_over_a_limit():
    cands = [PrefillCandidate(0, running=4, max_running=4),
             PrefillCandidate(1, running=1, inflight_tokens=7000,
                              max_tokens=8192),
             PrefillCandidate(2, healthy=False)]
    d = choose_prefill(cands, prompt_tokens=2000)
    assert d.hold and d.choice is None and d.best is None
    assert d.reason == "hold-limits" and d.skipped == 3 and d.retry_us == 0


def test_idle_instance_takes_a_prompt_bigger_than_its_token_limit():
    c = [PrefillCandidate(0, running=0, max_tokens=1000)]
    assert choose_prefill(c, prompt_tokens=50_000).choice == 0


def test_hold_on_prediction_binds_late():
    cands = [PrefillCandidate(0, wait_us=80_000, prefill_us=10_000),
             PrefillCandidate(1, wait_us=90_000, prefill_us=30_000)]
    d = choose_prefill(cands, 1000, hold_slack_us=5_000)
    assert d.hold and d.reason == "hold-busy"
    assert d.best == 0 and d.retry_us == 75_000 and d.cost_us == 90_000
    # no slack given: never holds on a prediction
    assert choose_prefill(cands, 1000).choice == 0
    # the best is free within the slack: go now
    cands[0].wait_us = 4_000
    assert choose_prefill(cands, 1000, hold_slack_us=5_000).choice == 0


def test_flags_and_ties():
    cands = [PrefillCandidate(0, prefill_us=100, draining=True),
             PrefillCandidate(1, prefill_us=100, running=2),
             PrefillCandidate(2, prefill_us=100, running=1, inflight_tokens=9),
             PrefillCandidate(3, prefill_us=100, running=1, inflight_tokens=5),
             PrefillCandidate(4, prefill_us=100, running=1, inflight_tokens=5,
                              cached_tokens=16)]
    d = choose_prefill(cands, 100)
    assert d.choice == 4 and d.skipped == 1
    assert choose_prefill([], 100).reason == "hold-none"


# ---- decode ------------------------------------------------------------------


def test_lpt_order_longest_first_ties_by_arrival():
    jobs = [DecodeJob(100, 100, arrival_us=5), DecodeJob(1000, 2000),
            DecodeJob(150, 50, arrival_us=1), DecodeJob(10, 10)]
    assert lpt_order(jobs) == [1, 2, 0, 3]
    assert lpt_order([]) == []


def test_place_on_least_loaded_within_limits_or_hold():
    insts = [DecodeInstance(0, load_tokens=500, running=2),
             DecodeInstance(1, load_tokens=100, running=8, max_running=8),
             DecodeInstance(2, load_tokens=300, running=1, max_tokens=1000),
             DecodeInstance(3, load_tokens=400, running=1)]
    assert place_decode(insts, DecodeJob(200, 200)).choice == 2
    assert place_decode(insts, DecodeJob(500, 500)).choice == 3  # 2 over budget
    full = [DecodeInstance(0, running=8, max_running=8)]
    d = place_decode(full, DecodeJob(1, 1))
    assert d.hold and d.reason == "hold-limits"


def _fcfs_least_loaded(n_inst, jobs):
    loads = [0] * n_inst
    for j in jobs:
        i = min(range(n_inst), key=lambda k: (loads[k], k))
        loads[i] += j.prompt_tokens + j.output_tokens
    return loads


def test_lpt_balances_better_than_fcfs_least_loaded():
    rnd = random.Random(7)
    worse = 0
    for _ in range(20):
        jobs = [DecodeJob(rnd.choice([200, 400, 4000]),
                          rnd.choice([50, 300, 3000]), arrival_us=k)
                for k in range(24)]
        insts = [DecodeInstance(i) for i in range(4)]
        assign = assign_decode(insts, jobs)
        assert None not in assign
        lpt = [d.load_tokens for d in insts]
        fcfs = _fcfs_least_loaded(4, jobs)
        assert sum(lpt) == sum(fcfs)
        mean = sum(lpt) / 4
        assert max(lpt) / mean <= max(fcfs) / mean + 1e-9
        worse += max(lpt) < max(fcfs)
    assert worse >= 10          # strictly better most of the time


def test_assign_holds_what_does_not_fit_and_strict_stops():
    insts = [DecodeInstance(0, running=1, load_tokens=0, max_tokens=1000)]
    jobs = [DecodeJob(900, 200), DecodeJob(300, 100), DecodeJob(100, 100)]
    assert assign_decode(insts, jobs) == [None, 0, 0]
    assert insts[0].running == 3 and insts[0].load_tokens == 600
    insts = [DecodeInstance(0, running=1, load_tokens=0, max_tokens=1000)]
    assert assign_decode(insts, jobs, strict=True) == [None, None, None]


# ---- prefill queue -----------------------------------------------------------


def test_fcfs_and_sjf_orders():
    q = [QueueItem(0, 500), QueueItem(10, 100), QueueItem(20, 300)]
    assert queue_order(q, 30, order="fcfs") == [0, 1, 2]
    assert queue_order(q, 30, order="sjf", aging=0) == [1, 2, 0]
    assert queue_pick(q, 30, order="sjf", aging=0) == 1
    assert queue_pick([], 30) is None
    with pytest.raises(ValueError):
        queue_order(q, 30, order="lifo")


def test_aging_lets_old_long_work_overtake_newcomers():
    q = [QueueItem(0, 1000), QueueItem(900, 200)]
    # after 900 us the long one has 'paid' 900 of its 1000: 100 < 200
    assert queue_order(q, 900, aging=1.0) == [0, 1]
    assert queue_order(q, 900, aging=0.5) == [1, 0]


def test_starvation_timeout_goes_first_in_arrival_order():
    q = [QueueItem(0, 10**9), QueueItem(50, 10**9), QueueItem(5000, 1)]
    assert queue_order(q, 6000, aging=0, starvation_us=5000) == [0, 1, 2]
    assert queue_order(q, 4000, aging=0, starvation_us=5000) == [2, 0, 1]


def _run_queue(aging, starvation_us=0, rounds=3000):
    """One long job, then a steady stream of short ones that keeps the
    server busy; returns when the long job was released (or None)."""
    now = 0
    queue = [QueueItem(0, 50_000)]
    ids = ["long"]
    for r in range(rounds):
        queue.append(QueueItem(now, 1_000 + (r % 7) * 100))
        ids.append(r)
        queue.append(QueueItem(now, 1_200))
        ids.append(-r)
        k = queue_pick(queue, now, aging=aging, starvation_us=starvation_us)
        if ids[k] == "long":
            return now
        now += queue[k].work_us
        del queue[k], ids[k]
    return None


def test_aging_prevents_starvation():
    assert _run_queue(aging=0) is None                 # plain SJF starves it
    # with aging 1 the long job (50 ms of work) outranks every short job
    # that arrived more than ~48.5 ms after it; the queue grows (two arrive
    # per release), so it also waits for those that came before: ~100 ms
    released = _run_queue(aging=1.0)
    assert released is not None and released <= 120_000
    assert _run_queue(aging=0, starvation_us=200_000) <= 210_000
