"""Scheduling policies (omni_policy.h): prefill choice with hold, the held
request's decision (step and budget rules, the free instance when the best
is busy), decode placement and the LPT decode queue, the queues' order (SJF
with aging, the oldest past the starvation timeout), the at-once picks.

These are the functions the nginx module calls (docs/scoring.md, "How the
module calls the policies"); the scenarios mirror tests/test_scheduler.py's,
which run them inside nginx."""

import random

import pytest

from omni_ctl.scoring import (Arrivals, DecodeInstance, DecodeJob, PickCandidate,
                              PrefillCandidate, PrefixIndex, Predictor, QueueItem,
                              add_prefill_delay, choose_prefill, decide_prefill, lib,
                              pick_now, place_decode, prepare_prefill, queue_key,
                              queue_next, queue_order, queue_pick, queue_work)
from omni_ctl.scoring.errors import InvalidArgumentError
from test_scoring_predict import _serve_with_transfer

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


def _release_decode(insts, jobs, order):
    """A decode queue of `jobs` (queue order) released at one instant, as
    the module's pass does: the next by queue order, placed with
    place_decode, charged (prompt + output tokens, one running); the first
    that must wait ends the pass.  Returns the instance of each job."""
    items = [QueueItem(j.arrival_us, j.prompt_tokens + j.output_tokens) for j in jobs]
    where = [None] * len(jobs)
    for k in queue_order(items, now_us=10**9, order=order):
        d = place_decode(insts, jobs[k])
        if d.hold:
            break
        insts[d.choice].load_tokens += jobs[k].prompt_tokens + jobs[k].output_tokens
        insts[d.choice].running += 1
        where[k] = d.choice
    return where


def test_lpt_queue_evens_decode_load():
    """test_scheduler.py::test_lpt_evens_decode_load: four short jobs, then
    a long one.  In arrival order on the least-loaded instance the long job
    lands on top of two short ones; longest first it gets an instance of its
    own and the short ones fill the other."""
    jobs = [DecodeJob(32, 40, arrival_us=k) for k in range(4)] + [DecodeJob(32, 160, 4)]
    lpt = [DecodeInstance(0), DecodeInstance(1)]
    where = _release_decode(lpt, jobs, "lpt")
    assert where[4] == 0 and where[:3] == [1, 1, 1]
    fcfs = [DecodeInstance(0), DecodeInstance(1)]
    _release_decode(fcfs, jobs, "fcfs")

    def imbalance(insts):
        loads = [d.load_tokens for d in insts]
        return max(loads) / (sum(loads) / len(loads))

    assert imbalance(lpt) < 1.25 < imbalance(fcfs)


def test_lpt_balances_better_than_fcfs_least_loaded():
    rnd = random.Random(7)
    worse = 0
    for _ in range(20):
        jobs = [DecodeJob(rnd.choice([200, 400, 4000]),
                          rnd.choice([50, 300, 3000]), arrival_us=k)
                for k in range(24)]
        lpt = [DecodeInstance(i) for i in range(4)]
        fcfs = [DecodeInstance(i) for i in range(4)]
        assert None not in _release_decode(lpt, jobs, "lpt")
        assert None not in _release_decode(fcfs, jobs, "fcfs")
        lpt = [d.load_tokens for d in lpt]
        fcfs = [d.load_tokens for d in fcfs]
        assert sum(lpt) == sum(fcfs)
        assert max(lpt) <= max(fcfs)
        worse += max(lpt) < max(fcfs)
    assert worse >= 10          # strictly better most of the time


def test_decode_pass_stops_at_the_first_job_that_must_wait():
    """Longest first, and the first that does not fit ends the pass: small
    jobs do not overtake a big one that waits for room."""
    insts = [DecodeInstance(0, running=1, load_tokens=0, max_tokens=1000)]
    jobs = [DecodeJob(900, 200), DecodeJob(300, 100), DecodeJob(100, 100)]
    assert _release_decode(insts, jobs, "lpt") == [None, None, None]
    assert insts[0].running == 1
    insts = [DecodeInstance(0, running=1, load_tokens=0, max_tokens=2000)]
    assert _release_decode(insts, jobs, "lpt") == [0, 0, 0]
    assert insts[0].running == 4 and insts[0].load_tokens == 1700


def test_lpt_ties_keep_queue_order_and_starved_oldest_goes_first():
    items = [QueueItem(0, 100), QueueItem(5, 300), QueueItem(7, 100), QueueItem(9, 300)]
    assert queue_order(items, 10, order="lpt") == [1, 3, 0, 2]
    # past the starvation timeout the oldest goes first, not the longest
    assert queue_order(items, 1000, order="lpt", starvation_us=991) == [0, 1, 2, 3]
    assert queue_order(items, 1000, order="lpt", starvation_us=1000) == [0, 1, 3, 2]


# ---- the held request's decision -------------------------------------------


def _pred(n=2):
    # prefill = 2 ms + 100 us per 1000 new tokens... in us: (a, b per 1000, c)
    return Predictor(n, prefill_prior=(2000, 100_000, 0))


def _decide(pred, cands, prompt, now_us, slack_us=20_000, **kw):
    return decide_prefill(pred, cands, None, 16, prompt, now_us, slack_us, **kw)


def test_decide_idle_instance_is_chosen_at_once():
    pred = _pred()
    cands = [PrefillCandidate(0, max_running=16, max_tokens=16384),
             PrefillCandidate(1, max_running=16, max_tokens=16384)]
    d = _decide(pred, cands, 1000, now_us=1_000_000)
    assert d.choice == 0 and d.reason == "chosen" and d.retry_us == 0
    assert cands[0].prefill_us == pred.prefill_us(0, 1000)
    # max_tokens became no limit for choose (the budget rule handled it)
    assert cands[0].max_tokens == 0


def test_decide_a_longer_request_does_not_join_a_shorter_ones_step():
    """test_scheduler.py::test_a_longer_request_does_not_join_a_shorter_ones_step:
    the instance's last prefill started less than a slack ago, is not done,
    and is shorter than this one: this one waits until it is done, plus the
    slack, so it reaches the engine after that one's step began."""
    pred = _pred(1)
    now = 10_000_000
    job = pred.dispatch_prefill(0, 64, 0, now_us=now - 1_000)
    slack = 300_000

    def cand():
        return [PrefillCandidate(0, running=1, inflight_tokens=64, max_running=16,
                                 max_tokens=16384, step_start_us=job.start_us,
                                 step_done_us=job.done_us,
                                 step_service_us=job.service_us)]

    long_ = cand()
    d = _decide(pred, long_, 4000, now, slack_us=slack, force=True)
    assert d.hold and d.reason == "hold-busy"
    assert long_[0].wait_us == job.done_us - now + slack
    assert d.retry_us == job.done_us - now
    # the same request without the step record goes at once
    free = cand()
    free[0].step_start_us = free[0].step_done_us = free[0].step_service_us = 0
    assert _decide(pred, free, 4000, now, slack_us=slack, force=True).choice == 0
    # and a request no longer than the one in flight joins its step
    assert _decide(pred, cand(), 64, now, slack_us=slack, force=True).choice == 0


def test_decide_a_short_request_joins_the_step_waiting_at_the_engine():
    """Two 300-token prompts sent to an instance: the first runs, the second
    waits for the next step.  A third sent now shares that step (it starts
    within the slack, the budget has room, its tokens add less than the
    slack): it goes, its wait is that step's end and its prefill what its
    tokens add.  Held until the instance was free, short prompts ran one or
    two a step (stop 51: 300-token prompts at 150/s on two instances, mean
    TTFT 2.0 s, 0.3-0.4 s once they join)."""
    pred = Predictor(1, prefill_prior=(6400, 32000, 0))     # h100-like
    now = 10_000_000
    first = pred.dispatch_prefill(0, 300, 0, now_us=now - 5_000)
    second = pred.dispatch_prefill(0, 300, 0, now_us=now - 3_000)
    assert not second.shared and second.start_us == first.done_us - first.tail_us

    def cand(inflight=600):
        return [PrefillCandidate(0, running=2, inflight_tokens=inflight,
                                 max_running=256, max_tokens=16384,
                                 step_start_us=second.start_us,
                                 step_done_us=second.done_us,
                                 step_service_us=second.service_us)]

    for step_tokens, goes in ((8192, True), (0, False), (500, False)):
        c = cand()
        d = _decide(pred, c, 300, now, step_tokens=step_tokens, force=True)
        assert (d.choice == 0) == goes, (step_tokens, d)
        assert c[0].wait_us > 20_000                 # the step's end: past the slack
        if goes:
            # what its tokens add: no second fixed cost
            assert c[0].prefill_us == pred.prefill_us(0, 300) - 6400
    # a prompt whose tokens add more than the slack waits as before, and
    # so does one that would more than double the step's work (a long
    # prompt riding on short ones': a wide slack lets it)
    d = _decide(pred, cand(), 2000, now, step_tokens=8192, force=True)
    assert d.hold
    assert pred.prefill_us(0, 2000) - 6400 > second.service_us
    d = _decide(pred, cand(), 2000, now, slack_us=300_000, step_tokens=8192,
                force=True)
    assert d.hold and d.reason == "hold-busy"
    # once that step has started, nothing joins it: a request sent then
    # starts a step of its own, fixed cost and all
    c = cand()
    _decide(pred, c, 300, second.start_us + 1, step_tokens=8192)
    assert c[0].prefill_us == pred.prefill_us(0, 300)


def test_decide_over_the_batch_budget_is_busy_not_excluded():
    pred = _pred()
    now = 5_000_000
    cands = [PrefillCandidate(0, running=1, inflight_tokens=8000, max_running=16,
                              max_tokens=8192),
             PrefillCandidate(1, running=1, inflight_tokens=100, max_running=16,
                              max_tokens=8192)]
    d = _decide(pred, cands, 1000, now)
    assert d.choice == 1
    assert cands[0].wait_us == 20_001 and cands[1].wait_us == 0
    # alone and over its budget: held, and nothing behind it may go either
    # (no instance has room: every one is at its budget)
    cands = [PrefillCandidate(0, running=1, inflight_tokens=8192, max_running=16,
                              max_tokens=8192)]
    d = _decide(pred, cands, 1000, now, force=True)
    assert d.hold and d.reason == "hold-full" and d.best == 0
    # 0 is no limit
    cands = [PrefillCandidate(0, running=1, inflight_tokens=8192, max_running=16)]
    assert _decide(pred, cands, 1000, now).choice == 0


def test_decide_over_the_budget_takes_the_next_one_during_the_last_step():
    """An instance over its batch budget is busy until its tokens come back,
    unless the engine's last step of that work (its tokens modulo the step
    budget) lasts long enough for a request sent the slack before the
    predicted end to arrive during that step: then it goes then, so the next
    prefill starts without the handover's idle.  Not when the last step is
    short (it would arrive before it and share it), not once the work has
    overrun its predicted end, not without the engines' step budget, not
    for a request released for having starved."""
    pred = _pred(1)
    now = 10_000_000
    job = pred.dispatch_prefill(0, 20_000, 0, now_us=now)   # ~1.95 s
    end = pred.end_us(0)
    assert end == job.done_us - job.tail_us > now + 1_000_000

    def cand(inflight=20_000):
        return [PrefillCandidate(0, running=1, inflight_tokens=inflight,
                                 max_running=16, max_tokens=16384,
                                 step_start_us=job.start_us, step_done_us=end,
                                 step_service_us=job.service_us)]

    def decide(at, step_tokens=8192, **kw):
        c = cand(**kw)
        return _decide(pred, c, 4000, at, step_tokens=step_tokens), c

    # last step: 20,000 % 8,192 = 3,616 tokens, ~355 ms: open
    d, c = decide(end - 30_000)
    assert d.hold and d.reason == "hold-full" and d.retry_us == 10_000
    assert c[0].wait_us == 30_000
    d, c = decide(end - 20_000)
    assert d.choice == 0 and c[0].wait_us == 20_000
    # a starved request is not bound early: an overrun of the work there
    # would add to the tail it already is
    c = cand()
    d = _decide(pred, c, 4000, end - 20_000, step_tokens=8192, starved=True)
    assert d.hold and c[0].wait_us == 20_001
    # the same without the step budget: busy until the tokens come back
    d, c = decide(end - 20_000, step_tokens=0)
    assert d.hold and c[0].wait_us == 20_001
    # a short last step (16,500 % 8,192 = 116 tokens, ~13 ms): the request
    # would arrive before it began
    d, c = decide(end - 10_000, inflight=16_500)
    assert d.hold and c[0].wait_us == 20_001
    # a last step of the whole budget (inflight a multiple of it)
    assert decide(end - 20_000, inflight=16_384 + 8_192)[0].choice == 0
    # overrun: the end is not known any more
    d, c = decide(end + 5_000)
    assert d.hold and c[0].wait_us == 20_001
    # the predictor re-anchors on a completion: a job queued behind one that
    # ran long ends later, and so does the window
    j2 = pred.dispatch_prefill(0, 20_000, 0, now_us=now + 1_000)
    pred.prefill_done(0, job, done_us=job.done_us + 300_000, ok=True)
    end2 = pred.end_us(0)
    assert end2 >= j2.done_us - j2.tail_us + 300_000 - 1
    c = cand(inflight=20_000)
    d = _decide(pred, c, 4000, end2 - 20_000, step_tokens=8192)
    assert d.choice == 0
    d = _decide(pred, cand(inflight=20_000), 4000, end2 - 60_000, step_tokens=8192)
    assert d.hold and d.retry_us == 40_000


def _decide_over_budget(pred, at, starved=False):
    """A 4000-token request at `at`, the one instance running 20,000 tokens
    against a 16,384-token budget, in steps of 8,192: (decision, cands)."""
    c = [PrefillCandidate(0, running=1, inflight_tokens=20_000,
                          max_running=16, max_tokens=16384)]
    return _decide(pred, c, 4000, at, step_tokens=8192, starved=starved), c


def test_decide_over_the_budget_takes_the_next_one_while_the_kv_transfers():
    """Parallel P/D: a prefill's answer comes after its KV transfer, which
    the engine overlaps with its next work.  Once the work is predicted
    done and the answer is still more than the slack away, the instance is
    free, though its tokens count against the budget until that answer:
    any request may take it then, a starved one too (it is no early
    binding: the work is over).  Not while the work runs (outside its last
    step), not once the answer too is late (the work has overrun), and not
    when the answer is a plain trip away (sequential P/D: within the
    slack)."""
    pred = Predictor(1, prefill_prior=(2000, 100_000, 0), transfer=True)
    now = 10_000_000
    job = pred.dispatch_prefill(0, 20_000, 0, now_us=now)
    end, ans = pred.end_us(0), pred.answer_us(0)
    # until the transfer's time is learned, an eighth of the latency
    assert ans == job.done_us and ans - end >= (job.done_us - now) // 8

    for starved in (False, True):
        d, c = _decide_over_budget(pred, end + 1000, starved)
        assert d.choice == 0, (starved, d)
        # (ans - slack, ans]: the answer is due within the slack
        d, c = _decide_over_budget(pred, ans - 10_000, starved)
        assert d.hold and c[0].wait_us == 20_001, (starved, d)
        d, c = _decide_over_budget(pred, ans + 5_000, starved)
        assert d.hold and c[0].wait_us == 20_001, (starved, d)
    # before the end, a starved request waits for the answer (its last step
    # is no place for it), a request in the order takes the last step
    d, c = _decide_over_budget(pred, end - 20_000, starved=True)
    assert d.hold and c[0].wait_us == 20_001
    assert _decide_over_budget(pred, end - 20_000)[0].choice == 0
    # sequential P/D: the same work, its answer a plain trip after its end
    seq = _pred(1)
    seq.dispatch_prefill(0, 20_000, 0, now_us=now)
    assert seq.answer_us(0) - seq.end_us(0) < 20_000
    c = [PrefillCandidate(0, running=1, inflight_tokens=20_000,
                          max_running=16, max_tokens=16384)]
    d = _decide(seq, c, 4000, seq.end_us(0) + 1000, step_tokens=8192,
                starved=True)
    assert d.hold and c[0].wait_us == 20_001


def test_decide_parallel_counts_the_instance_free_a_transfer_early():
    """Parallel P/D: the proxy hears a prefill's end only with its answer,
    a KV transfer after it, and the service model (its samples are answers
    less a learned transfer) predicted long prompts up to 18% long on the
    Mooncake trace: past the engine's end the instance still counted busy,
    over its batch budget, until the answer, while the next request waited
    (the engines idled 14-20 s a run through such transfers).  Once the
    transfer's time is known, the instance counts free the last job's
    predicted transfer before its predicted end, for the wait and for the
    budget rules alike: a request sent then waits in the engine at most
    that long.  Sequential P/D, without a transfer, is unchanged."""
    k = 7680
    pred = Predictor(1, min_us=100, transfer=True)
    _serve_with_transfer(True, k, 0, predictor=pred)    # the transfer learned
    assert abs(pred.state(0)["transfer_per_1k_us"] - k) < 0.2 * k
    now = pred.state(0)["free_at_us"] + 1_000_000
    job = pred.dispatch_prefill(0, 20_000, 0, now_us=now)
    end, early = pred.end_us(0), pred.transfer_us(0)
    assert abs(job.tail_us - k * 20_000 / 1024) < 0.2 * k * 20
    assert pred.answer_us(0) == end + job.tail_us
    # at least an eighth of the work's latency (the next test)
    assert early == max(job.tail_us, (job.service_us + job.tail_us) // 8)

    for starved in (False, True):
        # within a transfer of the predicted end: free, over the budget too
        d, c = _decide_over_budget(pred, end - early + 10_000, starved)
        assert d.choice == 0 and c[0].wait_us == 0, (starved, d, c[0])
        # earlier: busy (over the budget), retried at the window's start
        d, c = _decide_over_budget(pred, end - early - 50_000, starved)
        assert d.hold and c[0].wait_us > 20_000, (starved, d, c[0])
    # under the budget, the wait alone: the window's start less the slack
    c = [PrefillCandidate(0, running=1, inflight_tokens=20_000,
                          max_running=16, max_tokens=65536)]
    d = _decide(pred, c, 4000, end - early - 50_000)
    assert d.hold and c[0].wait_us == 50_000 and d.retry_us == 30_000
    # no transfer learned yet, or none at all: the predicted end stands
    fresh = Predictor(1, prefill_prior=(2000, 100_000, 0), transfer=True)
    fresh.dispatch_prefill(0, 20_000, 0, now_us=now)
    assert fresh.transfer_us(0) == 0
    seq = _pred(1)
    seq.dispatch_prefill(0, 20_000, 0, now_us=now)
    assert seq.transfer_us(0) == 0
    for p in (fresh, seq):
        c = [PrefillCandidate(0, running=1, inflight_tokens=20_000,
                              max_running=16, max_tokens=65536)]
        d = _decide(p, c, 4000, p.end_us(0) - 50_000)
        assert d.hold and c[0].wait_us >= 50_000 - 1000, (p, c[0])
    # nothing in flight: nothing to count early
    assert Predictor(1, transfer=True).transfer_us(0) == 0


def test_decide_parallel_a_transfer_learned_short_still_frees_the_instance_early():
    """Parallel P/D without the engines' events: the transfer's time per
    token is learned from the gaps between answers, and the proxy, sending
    each request just in time, leaves that fit few clean samples.  Live, on
    section 1's trace, it came out at 0.4-4.8 ms per 1k tokens against 5.3
    true, and the runs that learned little had the highest TTFTs (2.38-2.46
    s against 1.81-2.17): learned near 0, the instance counted free only at
    its predicted end, and a service predicted long (15-25% apiece) idled
    the engine through the whole transfer.  The instance now counts free at
    least an eighth of the in-flight work's predicted latency before its
    end, the share the predictor gives the transfer before it has learned
    one (docs/scheduler.md, "Parallel P/D without the agent")."""
    pred = Predictor(1, min_us=100, transfer=True)
    _serve_with_transfer(True, 100, 0, predictor=pred)    # 0.1 ms per 1k
    assert pred.state(0)["transfer_per_1k_us"] < 1000
    now = pred.state(0)["free_at_us"] + 1_000_000
    job = pred.dispatch_prefill(0, 20_000, 0, now_us=now)
    end, early = pred.end_us(0), pred.transfer_us(0)
    eighth = (job.service_us + job.tail_us) // 8
    assert early == eighth > 4 * job.tail_us
    for starved in (False, True):
        # an eighth of the latency before the end: free, over the budget too
        d, c = _decide_over_budget(pred, end - eighth + 10_000, starved)
        assert d.choice == 0 and c[0].wait_us == 0, (starved, d, c[0])
        d, c = _decide_over_budget(pred, end - eighth - 50_000, starved)
        assert d.hold, (starved, d, c[0])
    # the answer is still predicted a learned transfer after the end
    assert pred.answer_us(0) == end + job.tail_us


def test_decide_a_starved_request_weighs_its_own_ttft_only():
    """What a prefill costs the requests waiting is weighed for a request in
    the order, not for one released for having starved: that one goes ahead
    of them whatever it costs them, and the cost, multiplied by the queue,
    magnified the instances' differences in learned rate (several percent
    for a long prompt between engines that are alike) into seconds: the
    starved request held for the busy instance predicted faster while the
    idle ones went to shorter requests, and its TTFT passed the bound the
    starvation rule is there to keep."""
    pred = _pred(2)
    # instance 1 has seen prefills 8% faster than the prior
    for n in (2000, 8000, 20000, 40000, 60000, 1000, 30000):
        pred.observe_prefill(1, n, 0, int(pred.prefill_us(0, n) * 0.92))
    own = [pred.prefill_us(i, 60_000) for i in (0, 1)]
    assert own[0] - own[1] > 400_000
    now = 50_000_000
    pred.dispatch_prefill(1, 6000, 0, now_us=now)
    wait1 = pred.wait_us(1, now)
    assert 450_000 < wait1 < own[0] - own[1] + 1_000_000

    def cands():
        return [PrefillCandidate(0, max_running=16, max_tokens=16384),
                PrefillCandidate(1, running=1, inflight_tokens=6000,
                                 max_running=16, max_tokens=16384)]

    # in the order, 20 waiting: what it costs the others is weighed (19/2 x
    # its prefill there)
    c = cands()
    _decide(pred, c, 60_000, now, waiting=20)
    assert c[0].prefill_us == pytest.approx(own[0] * (1 + 19 / 2), abs=2)
    # starved: its own TTFT, the idle instance
    c = cands()
    d = _decide(pred, c, 60_000, now, waiting=20, starved=True)
    assert d.choice == 0 and not d.hold
    assert [x.prefill_us for x in c] == own and c[1].wait_us == wait1
    assert _decide(pred, cands(), 60_000, now, waiting=1, arrival_gap_us=50_000,
                   starved=True).choice == 0
    # a starved request still waits for a busy instance that would finish
    # it sooner (half its prompt cached there)
    c = cands()
    d = decide_prefill(pred, c, [0, 30_000 // 16], 16, 60_000, now, 20_000,
                       waiting=20, starved=True, force=True)
    assert d.hold and d.best == 1 and c[1].prefill_us == pred.prefill_us(1, 30_000, 30_000)


def test_decide_holds_for_a_busy_instance_only_when_its_own_ttft_gains():
    """A request in the order weighs what its prefill costs the others
    (multiplied by the queue), but holds for a busy instance only when that
    also brings its own first token sooner.  Instance 1 has learned an 8%
    faster rate than instance 0 (engines alike, the rest is noise): with the
    queue's weight it costs the others seconds less, so before, the request
    held for it while the idle instance went to a request far behind in the
    order.  Now: held while instance 1's wait is under the 8% it saves the
    request itself, else the idle instance."""
    pred = _pred(2)
    for n in (2000, 8000, 20000, 40000, 60000, 1000, 30000):
        pred.observe_prefill(1, n, 0, int(pred.prefill_us(0, n) * 0.92))
    own = [pred.prefill_us(i, 60_000) for i in (0, 1)]
    gain = own[0] - own[1]
    assert gain > 400_000
    now = 50_000_000

    def cands(tokens):
        return [PrefillCandidate(0, max_running=16, max_tokens=16384),
                PrefillCandidate(1, running=1, inflight_tokens=tokens,
                                 max_running=16, max_tokens=16384)]

    pred.dispatch_prefill(1, 6000, 0, now_us=now)
    assert gain < pred.wait_us(1, now) < 2 * gain
    # its own TTFT is sooner on the idle instance: it goes there, with the
    # queue's weight or the arrivals' (before: held for instance 1)
    for kw in ({"waiting": 20}, {"waiting": 1, "arrival_gap_us": 50_000}):
        d = _decide(pred, cands(6000), 60_000, now, **kw)
        assert d.choice == 0 and not d.hold, (kw, d)
    # instance 1 frees sooner than the gain: it holds for it, in the order
    # and starved alike
    later = now + pred.wait_us(1, now) - gain // 2
    assert 0 < pred.wait_us(1, later) < gain
    for kw in ({"waiting": 20}, {"waiting": 20, "starved": True},
               {"waiting": 1, "arrival_gap_us": 50_000}):
        d = _decide(pred, cands(6000), 60_000, later, **kw)
        assert d.hold and d.reason == "hold-busy" and d.best == 1, (kw, d)
    # a free instance that is not the one with the least own TTFT is still
    # taken with force (none of the others wanted it)
    d = _decide(pred, cands(6000), 60_000, later, waiting=20, force=True)
    assert d.choice == 0


def test_decide_a_cached_prefix_is_held_for_though_its_own_ttft_loses():
    """The own-TTFT rule is for instances that differ by their learned
    rates only.  A prefix cached on the busy instance saves work the queue
    behind would otherwise wait for: it is held for by the cost to the
    others even when the request would start sooner recomputing the prefix
    on the free instance (without this, a few 30k-token prompts of a shared
    prefix went to a free instance in some section-1 runs and recomputed
    it)."""
    pred = _pred(2)
    now = 50_000_000
    pred.dispatch_prefill(1, 12000, 0, now_us=now)
    wait = pred.wait_us(1, now)
    cached = 8000
    own_free = pred.prefill_us(0, 20_000)
    own_busy = wait + pred.prefill_us(1, 20_000 - cached, cached)
    assert own_free < own_busy
    c = [PrefillCandidate(0, max_running=16),
         PrefillCandidate(1, running=1, inflight_tokens=12000, max_running=16)]
    d = decide_prefill(pred, c, [0, cached // 16], 16, 20_000, now, 20_000, waiting=20)
    assert d.hold and d.reason == "hold-busy" and d.best == 1, d


def test_decide_held_decides_again_when_any_instance_frees():
    """A held request is decided again (retry_us, which the module keeps
    its decision for and arms its timer with) when any instance comes
    within the slack, not only its best.  Held until its best frees, the
    other one went to whichever request arrived meanwhile and decided
    afresh, ahead of those held with their old decisions.  Instance 1
    holds 48% of the prompt and frees in about 0.59 s; instance 0 frees in
    about 0.15 s: held for instance 1, decided again when instance 0 frees
    (before: when instance 1 did)."""
    pred = _pred(2)
    now = 50_000_000
    pred.dispatch_prefill(0, 1500, 0, now_us=now)
    pred.dispatch_prefill(1, 6000, 0, now_us=now)
    w0, w1 = pred.wait_us(0, now), pred.wait_us(1, now)
    slack = 20_000
    assert slack < w0 < w1 / 2

    def decide(at, **kw):
        c = [PrefillCandidate(0, running=1, inflight_tokens=1500, max_running=16),
             PrefillCandidate(1, running=1, inflight_tokens=6000, max_running=16)]
        return decide_prefill(pred, c, [0, 9_600 // 16], 16, 20_000, at, slack,
                              waiting=4, **kw)

    d = decide(now)
    assert d.hold and d.best == 1, d
    assert d.retry_us == w0 - slack, (d, w0, w1)
    # once instance 0 is within the slack the decision is another one
    d = decide(now + d.retry_us, force=True)
    assert d.choice == 0, d


def test_decide_a_text_prompt_goes_its_front_end_time_early():
    """front_us (the engine's tokenization of a text prompt) widens how
    early a request may be sent to a busy instance, so that the engine
    tokenizes it while the instance finishes; the batch-budget and step
    rules still hold; a front_us the slack cannot add is refused."""
    pred = _pred(1)
    now = 1_000_000
    job = pred.dispatch_prefill(0, 1000, 0, now_us=now)    # busy 102 ms
    left = job.done_us - now

    def cand(**kw):
        return [PrefillCandidate(0, running=1, inflight_tokens=1000, max_running=16,
                                 max_tokens=16384, **kw)]

    # ids (no front end): held until the instance is 20 ms from free
    d = _decide(pred, cand(), 4000, now)
    assert d.hold and d.reason == "hold-full" and d.retry_us == left - 20_000
    # text the engine needs longer to tokenize than the instance's work left
    assert _decide(pred, cand(), 4000, now, front_us=left - 20_000).choice == 0
    d = _decide(pred, cand(), 4000, now, front_us=left - 20_001)
    assert d.hold and d.retry_us == 1
    # over the batch budget it stays busy whatever its front end
    d = _decide(pred, [PrefillCandidate(0, running=1, inflight_tokens=16000,
                                        max_running=16, max_tokens=16384)],
                4000, now, front_us=10_000_000)
    assert d.hold
    # a longer request than the step in flight: sent at most its front end
    # before that step is done (the step rule keeps the plain slack)
    step = dict(step_start_us=job.start_us, step_done_us=job.done_us,
                step_service_us=job.service_us)
    at = job.start_us + 1_000
    c = cand(**step)
    d = _decide(pred, c, 4000, at, slack_us=300_000, front_us=50_000)
    assert d.hold and c[0].wait_us == job.done_us - at + 300_000
    at = job.done_us - 50_000
    assert _decide(pred, cand(**step), 4000, at, slack_us=300_000,
                   front_us=50_000).choice == 0
    with pytest.raises(InvalidArgumentError):
        _decide(pred, cand(), 4000, now, front_us=1 << 62)


def test_decide_best_busy_offers_free_instances_then_takes_one():
    """The best instance holds the prompt's prefix but is busy past the
    slack: without force the request waits (one behind it may take the free
    instance); with force it takes the free one, unless half its prompt or
    more is cached on the best one."""
    pred = _pred()
    now = 1_000_000
    pred.dispatch_prefill(0, 1000, 0, now_us=now)          # busy 102 ms
    matched = [200, 0]                                     # blocks of 16
    kw = dict(prompt_tokens=4000, now_us=now, hold_slack_us=20_000)

    def cands():
        return [PrefillCandidate(0, max_running=16), PrefillCandidate(1, max_running=16)]

    c = cands()
    d = decide_prefill(pred, c, matched, 16, waiting=1, **kw)
    assert d.hold and d.reason == "hold-busy" and d.best == 0
    assert d.retry_us == c[0].wait_us - 20_000 > 0
    assert c[0].cached_tokens == 3200
    d = decide_prefill(pred, cands(), matched, 16, waiting=1, force=True, **kw)
    assert d.hold and d.reason == "hold-busy"          # 3200 of 4000 cached
    # 1920 of 4000 cached on the busy one: the free one, with the retry kept
    c = cands()
    d = decide_prefill(pred, c, [120, 0], 16, waiting=1, force=True, **kw)
    assert d.choice == 1 and d.retry_us > 0
    assert c[0].draining and not c[1].draining


def test_decide_no_room_anywhere_is_hold_full():
    pred = _pred()
    now = 1_000_000
    pred.dispatch_prefill(0, 8000, 0, now_us=now)
    pred.dispatch_prefill(1, 8000, 0, now_us=now)
    c = [PrefillCandidate(0), PrefillCandidate(1)]
    d = _decide(pred, c, 1000, now, force=True)
    assert d.hold and d.reason == "hold-full" and d.retry_us > 0


def test_decide_limits_and_errors():
    pred = _pred()
    c = [PrefillCandidate(0, running=4, max_running=4), PrefillCandidate(1, healthy=False)]
    d = _decide(pred, c, 100, 0)
    assert d.hold and d.reason == "hold-limits"
    with pytest.raises(InvalidArgumentError):
        _decide(pred, [PrefillCandidate(0)], 100, 0, arrival_gap_us=-1)
    with pytest.raises(InvalidArgumentError):
        _decide(pred, [PrefillCandidate(0)], 100, 0, slack_us=2**63)
    with pytest.raises(InvalidArgumentError):          # unknown to the predictor
        _decide(pred, [PrefillCandidate(7)], 100, 0)


# ---- queues ------------------------------------------------------------------


def test_fcfs_and_sjf_orders():
    q = [QueueItem(0, 500), QueueItem(10, 100), QueueItem(20, 300)]
    assert queue_order(q, 30, order="fcfs") == [0, 1, 2]
    assert queue_order(q, 30, order="sjf", aging=0) == [1, 2, 0]
    assert queue_pick(q, 30, order="sjf", aging=0) == 1
    assert queue_pick([], 30) is None
    with pytest.raises(ValueError):
        queue_order(q, 30, order="lifo")


def test_queue_keys_and_ties():
    # SJF: work + aging * arrival (the module: aging 1, times in us)
    assert queue_key(2_000_000, 150_000) == 2_150_000
    assert queue_key(2_000_000, 150_000, aging=0.5) == 1_150_000
    assert queue_key(7, 99, order="fcfs") == 7
    assert queue_key(7, 99, order="lpt") == -99
    # equal keys: queue order
    q = [QueueItem(10, 100), QueueItem(0, 110), QueueItem(5, 105)]
    assert queue_order(q, 20, aging=1.0) == [0, 1, 2]
    assert lib.omni_policy_queue_before(1.0, 3, 1.0, 4) == 1
    assert lib.omni_policy_queue_before(1.0, 4, 1.0, 3) == 0
    assert lib.omni_policy_queue_before(0.5, 9, 1.0, 3) == 1


def test_aging_lets_old_long_work_overtake_newcomers():
    q = [QueueItem(0, 1000), QueueItem(900, 200)]
    # after 900 us the long one has 'paid' 900 of its 1000: 100 < 200
    assert queue_order(q, 900, aging=1.0) == [0, 1]
    assert queue_order(q, 900, aging=0.5) == [1, 0]


def test_past_the_starvation_timeout_the_oldest_goes_first():
    """test_scheduler.py::test_past_the_starvation_timeout_the_oldest_goes_first:
    a short prompt, then 50 ms later a long one, both held behind a long
    blocker past the 200 ms timeout.  The oldest goes first: not the one
    whose TTFT will be the largest (the long one, waited + work: the rule
    before issue 24, which under a backlog put every short starved request
    behind the long ones)."""
    short, long_ = QueueItem(0, 10_000), QueueItem(50_000, 300_000)
    now = 700_000
    assert queue_order([short, long_], now, starvation_us=200_000) == [0, 1]
    assert queue_pick([short, long_], now, order="fcfs", starvation_us=200_000) == 0
    # the other way round: a long prompt, then a short one; both starved,
    # the long one is the oldest and goes first, where shortest-first
    # (before anything starves) takes the short one (30 ms: more than
    # OMNI_POLICY_SHORT_PCT % of the bound, so not short enough to go first)
    long_, short = QueueItem(0, 300_000), QueueItem(50_000, 30_000)
    assert queue_order([long_, short], 150_000, starvation_us=500_000) == [1, 0]
    assert queue_order([long_, short], now, starvation_us=500_000) == [0, 1]


def _largest_ttft(q, order, now_us):
    """One instance free at now_us releasing q in `order`: the largest
    TTFT (arrival to the end of its work)."""
    t, worst = now_us, 0
    for i in order:
        t += q[i].work_us
        worst = max(worst, t - q[i].arrival_us)
    return worst


def test_starved_oldest_first_minimises_the_largest_ttft():
    """Why the oldest: on one instance, of every order of a starved set,
    oldest first has the least largest TTFT (Jackson's rule), on random
    sets and on the case where the rule before issue 24 (waited + work,
    largest first) did worse."""
    import itertools
    rng = random.Random(24)
    for _ in range(200):
        n = rng.randint(1, 6)
        q = sorted((QueueItem(rng.randrange(0, 1_000_000),
                              rng.randrange(1, 2_000_000)) for _ in range(n)),
                   key=lambda it: it.arrival_us)
        now = 2_000_000
        got = queue_order(q, now, starvation_us=1_000_000)
        assert got == list(range(n))
        best = min(_largest_ttft(q, p, now) for p in itertools.permutations(range(n)))
        assert _largest_ttft(q, got, now) == best
    # waited + work, largest first, takes the long one first: the short one
    # then ends 1010 ms after its arrival, against 960 ms for the worse of
    # the two oldest first
    q = [QueueItem(0, 10_000), QueueItem(50_000, 300_000)]
    most_late = sorted(range(2), key=lambda i: -(700_000 - q[i].arrival_us
                                                + q[i].work_us))
    assert most_late == [1, 0]
    assert (_largest_ttft(q, queue_order(q, 700_000, starvation_us=200_000), 700_000)
            < _largest_ttft(q, most_late, 700_000))


def test_starved_is_waited_plus_work():
    """SJF: a request is starved when the TTFT it would have if it started
    now (waited + predicted work) reaches the timeout, so a long prompt
    starves as much earlier as it takes longer and every TTFT is bounded
    alike (wave 6, docs/scheduler.md).  FCFS and LPT: the wait alone."""
    from omni_ctl.scoring import ffi
    o = ffi.new("omni_queue_opts_t *", {"order": lib.OMNI_QUEUE_SJF, "aging": 0.25,
                                        "starvation_us": 1000})
    assert lib.omni_policy_starved(o, 100, 400, 700) == 1      # 600 + 400
    assert lib.omni_policy_starved(o, 100, 400, 699) == 0
    assert lib.omni_policy_starved(o, 100, 1000, 100) == 1     # its work alone
    assert lib.omni_policy_starved(o, 100, 2**64 - 1, 0) == 1  # no overflow
    assert lib.omni_policy_starved(o, 100, 0, 50) == 0         # a clock behind
    for order in (lib.OMNI_QUEUE_FCFS, lib.OMNI_QUEUE_LPT):
        o.order = order
        assert lib.omni_policy_starved(o, 100, 400, 700) == 0
        assert lib.omni_policy_starved(o, 100, 400, 1100) == 1
    o.order, o.starvation_us = lib.OMNI_QUEUE_SJF, 0
    assert lib.omni_policy_starved(o, 0, 10**9, 10**9) == 0    # off


def test_under_a_backlog_the_starvation_bound_follows_it():
    """SJF: the bound is the starvation timeout, or OMNI_POLICY_BACKLOG_PCT %
    of the backlog (the queue's work per usable instance) when that is
    more (wave 10, docs/scheduler.md).  FCFS and LPT, and a request past
    its SLO deadline: the timeout alone."""
    from omni_ctl.scoring import ffi
    pct = lib.OMNI_POLICY_BACKLOG_PCT
    assert pct == 125
    o = ffi.new("omni_queue_opts_t *", {"order": lib.OMNI_QUEUE_SJF, "aging": 0.25,
                                        "starvation_us": 1000, "backlog_us": 0})
    assert lib.omni_policy_starvation_bound(o) == 1000
    o.backlog_us = 700                      # 875: the timeout is more
    assert lib.omni_policy_starvation_bound(o) == 1000
    o.backlog_us = 2000
    assert lib.omni_policy_starvation_bound(o) == 2500
    assert lib.omni_policy_starved(o, 100, 400, 2199) == 0      # 2099 + 400
    assert lib.omni_policy_starved(o, 100, 400, 2200) == 1
    o.backlog_us = 2**64 - 1                # no overflow
    assert lib.omni_policy_starvation_bound(o) == 2**64 - 1
    o.bound_max_us = 2200                   # starved before it times out
    assert lib.omni_policy_starvation_bound(o) == 2200
    o.backlog_us = 1200                     # 1500: under the limit
    assert lib.omni_policy_starvation_bound(o) == 1500
    o.bound_max_us = 500                    # never under the timeout
    assert lib.omni_policy_starvation_bound(o) == 1000
    o.bound_max_us, o.backlog_us = 0, 2000
    for order in (lib.OMNI_QUEUE_FCFS, lib.OMNI_QUEUE_LPT):
        o.order = order
        assert lib.omni_policy_starvation_bound(o) == 1000
        assert lib.omni_policy_starved(o, 100, 400, 1100) == 1
    o.order, o.starvation_us = lib.OMNI_QUEUE_SJF, 0
    assert lib.omni_policy_starvation_bound(o) == 0             # off
    assert lib.omni_policy_starved(o, 0, 10**9, 10**9) == 0
    # past a deadline: the wait since it against the timeout, whatever the
    # backlog; without a deadline the backlog counts
    o.starvation_us = 1000
    late = ffi.new("omni_slo_item_t *", {"arrival_us": 0, "work_us": 400,
                                         "deadline_us": 500, "seq": 1})
    assert lib.omni_policy_slo_starved(o, late, 1500) == 1
    late.deadline_us = 0
    assert lib.omni_policy_slo_starved(o, late, 1500) == 0      # 1900 < 2500
    assert lib.omni_policy_slo_starved(o, late, 2100) == 1


def test_under_a_backlog_a_short_request_is_not_starved_behind_old_long_ones():
    """tests/test_scheduler.py::test_under_a_backlog_shortest_first_goes_on:
    one instance, a 200 ms timeout; a long request, then a short one, then
    1.2 s of other work, all held behind a blocker.  At 600 ms both are past
    the timeout, and with the timeout alone the oldest (the long one) goes
    first: the order is first come first served.  The backlog (1.41 s for
    one instance) puts the bound at 1.76 s: nobody is starved and the short
    one goes first."""
    q = [QueueItem(0, 200_000), QueueItem(50_000, 10_000),
         QueueItem(100_000, 600_000), QueueItem(120_000, 600_000)]
    backlog = sum(it.work_us for it in q)
    assert queue_pick(q, 600_000, starvation_us=200_000, aging=0.25) == 0
    assert queue_pick(q, 600_000, starvation_us=200_000, aging=0.25,
                      backlog_us=backlog) == 1
    # still a bound: once the long one's TTFT would pass it, it goes first
    assert queue_pick(q, 1_600_000, starvation_us=200_000, aging=0.25,
                      backlog_us=backlog) == 0


def test_under_a_backlog_the_aging_weakens_with_the_bound():
    """SJF keys are work + a x arrival; a is OMNI_POLICY_AGING times the
    timeout over the starvation bound (wave 11), so a wait of the bound is
    worth what a wait of the timeout is without a backlog.  Keys made at
    one backlog are made again when a moved by more than 1/8 of itself."""
    from omni_ctl.scoring import ffi
    assert lib.OMNI_POLICY_AGING_SLACK == 8
    o = ffi.new("omni_queue_opts_t *", {"order": lib.OMNI_QUEUE_SJF, "aging": 0.25,
                                        "starvation_us": 1000, "backlog_us": 0})
    assert lib.omni_policy_queue_aging(o) == 0.25
    o.backlog_us = 700                          # bound 1000: the timeout
    assert lib.omni_policy_queue_aging(o) == 0.25
    o.backlog_us = 2000                         # bound 2500
    assert lib.omni_policy_queue_aging(o) == pytest.approx(0.1)
    assert lib.omni_policy_queue_key(o, 1000, 50) == pytest.approx(150)
    o.bound_max_us = 2000                       # the capped bound counts
    assert lib.omni_policy_queue_aging(o) == pytest.approx(0.125)
    o.bound_max_us = 0
    for order in (lib.OMNI_QUEUE_FCFS, lib.OMNI_QUEUE_LPT):
        o.order = order
        assert lib.omni_policy_queue_aging(o) == 0.25
    o.order, o.starvation_us = lib.OMNI_QUEUE_SJF, 0
    assert lib.omni_policy_queue_aging(o) == 0.25   # no bound: no backlog
    o.starvation_us = 1000
    now = ffi.new("omni_queue_opts_t *", dict(order=lib.OMNI_QUEUE_SJF, aging=0.25,
                                              starvation_us=1000, backlog_us=2100))
    assert lib.omni_policy_queue_rekey(o, now) == 0     # 0.1 -> 0.095
    now.backlog_us = 3000                               # 0.1 -> 0.067
    assert lib.omni_policy_queue_rekey(o, now) == 1
    assert lib.omni_policy_queue_rekey(now, o) == 1
    now.backlog_us = 0                                  # back to 0.25
    assert lib.omni_policy_queue_rekey(o, now) == 1
    o.backlog_us = 0
    assert lib.omni_policy_queue_rekey(o, now) == 0
    # the order: an older request of a little more work and a younger one
    # (tests/test_scheduler.py::test_under_a_backlog_the_aging_weakens_with_
    # the_bound): 0.75 s of wait is worth 0.19 s of work at the full aging,
    # and the older has the smaller key; with 3.3 s of backlog (a 4.1 s
    # bound) it is worth 0.01 s, and the younger goes first, by the order
    # (neither is starved)
    o.starvation_us, o.backlog_us = 200_000, 0
    assert lib.omni_policy_queue_key(o, 0, 200_000) \
        < lib.omni_policy_queue_key(o, 750_000, 50_000)
    o.backlog_us = 3_300_000
    assert lib.omni_policy_queue_key(o, 0, 200_000) \
        > lib.omni_policy_queue_key(o, 750_000, 50_000)
    q = [QueueItem(0, 200_000), QueueItem(750_000, 50_000)]
    assert queue_pick(q, 1_200_000, aging=0.25, starvation_us=200_000,
                      backlog_us=3_300_000) == 1
    assert queue_order(q, 1_200_000, aging=0.25, starvation_us=200_000,
                       backlog_us=3_300_000) == [1, 0]


def _one_instance(seed, backlog, order="sjf", n=300, load=1.2, cap=8e6):
    """One instance releasing a queue with the library's pick (SJF with the
    module's aging, a 5 s timeout): heavy-tailed work (lognormal, median
    0.44 s, at most `cap`), Poisson arrivals at `load` times what it can
    serve.  Each request's TTFT (arrival to the end of its work, us), sorted,
    and the largest backlog seen."""
    rng = random.Random(seed)
    works = [int(min(cap, rng.lognormvariate(13.0, 1.3))) for _ in range(n)]
    t, arrivals = 0.0, []
    for _ in works:
        t += rng.expovariate(load * n / sum(works))
        arrivals.append(int(t))
    q, now, i, ttft, most = [], 0, 0, [], 0
    while i < n or q:
        if not q:
            now = max(now, arrivals[i])
        while i < n and arrivals[i] <= now:
            q.append(QueueItem(arrivals[i], works[i]))
            i += 1
        most = max(most, sum(it.work_us for it in q))
        k = queue_pick(q, now, order=order, aging=0.25, starvation_us=5_000_000,
                       backlog_us=sum(it.work_us for it in q) if backlog else 0)
        it = q.pop(k)
        now += it.work_us
        ttft.append(now - it.arrival_us)
    return sorted(ttft), most


def test_the_bound_that_follows_the_backlog_keeps_shortest_first_under_overload():
    """Why the bound follows the backlog: under a sustained overload (1.2x)
    every request reaches a 5 s timeout, and with the timeout alone the
    release order is first come first served (same mean as FCFS).  With
    the bound at 125% of the backlog, and the aging weakened as much
    (omni_policy_queue_aging), the mean is lower by more than 30% in every
    one of ten workloads; the price is the p99, within 40% of the
    timeout's (here the backlog grows for the whole run and nothing caps
    the bound; the module caps it at half the queue timeout).  Under a load
    whose backlog never reaches 80% of the timeout nothing changes."""
    def mean(v):
        return sum(v) / len(v)

    def p99(v):                         # v sorted
        return v[int(0.99 * (len(v) - 1))]

    light = 0
    for seed in range(10):
        (alone, _), (follows, _) = _one_instance(seed, False), _one_instance(seed, True)
        fcfs, _ = _one_instance(seed, False, order="fcfs")
        assert abs(mean(alone) - mean(fcfs)) < 0.01 * mean(fcfs), seed
        assert mean(follows) < 0.7 * mean(alone), seed
        assert p99(follows) < 1.4 * p99(alone), seed
        alone, most = _one_instance(seed, False, load=0.3, cap=2e6)
        if most * lib.OMNI_POLICY_BACKLOG_PCT // 100 <= 5_000_000:
            light += 1
            assert _one_instance(seed, True, load=0.3, cap=2e6)[0] == alone, seed
    assert light >= 5


def test_a_younger_longer_request_starves_first():
    # an old short request and a young long one: the long one's TTFT would
    # reach the timeout first; it goes before the shorter, older one
    # (the short one's 400 is more than OMNI_POLICY_SHORT_PCT % of the
    # timeout: not short enough to go before the starved)
    q = [QueueItem(0, 400), QueueItem(3000, 5000)]
    assert queue_pick(q, 4000, starvation_us=7000) == 0        # none starved: SJF
    assert queue_pick(q, 5000, starvation_us=7000) == 1        # 2000 + 5000
    # both starved: the oldest
    assert queue_pick(q, 7000, starvation_us=7000) == 0
    # the starved are looked for among the OMNI_POLICY_LATE_SCAN oldest:
    # one behind them waits for its turn there
    n = lib.OMNI_POLICY_LATE_SCAN
    q = [QueueItem(k, 100 + k) for k in range(n)] + [QueueItem(n, 10**9)]
    assert queue_pick(q, 2 * n, starvation_us=10**6) == 0
    q[n - 1] = QueueItem(n - 1, 10**9)
    assert queue_pick(q, 2 * n, starvation_us=10**6) == n - 1
    # nothing starved: the least key
    q = [QueueItem(9_500, 500), QueueItem(9_600, 1)]
    assert queue_pick(q, 10_000, starvation_us=2000) == 1


def test_queue_next_protocol():
    assert queue_next([], 10, starvation_us=5) is None
    late = [QueueItem(0, 10), QueueItem(2, 10), QueueItem(4, 15)]
    for order in ("sjf", "fcfs", "lpt"):
        assert queue_next(late, 100, order=order, starvation_us=5) == 0
    opts = {"order": lib.OMNI_QUEUE_SJF, "aging": 1.0, "starvation_us": 0}
    from omni_ctl.scoring import ffi
    o = ffi.new("omni_queue_opts_t *", opts)
    assert lib.omni_policy_late_scan(o) == 0
    o.starvation_us = 5
    assert lib.omni_policy_late_scan(o) == lib.OMNI_POLICY_LATE_SCAN
    for order in (lib.OMNI_QUEUE_LPT, lib.OMNI_QUEUE_FCFS):
        o.order = order
        assert lib.omni_policy_late_scan(o) == 1
    assert lib.omni_policy_starved(o, 10, 0, 15) == 1
    assert lib.omni_policy_starved(o, 10, 0, 14) == 0
    assert lib.omni_policy_starved(o, 20, 0, 10) == 0     # a clock behind
    items = ffi.new("omni_queue_item_t[]", lib.OMNI_POLICY_LATE_SCAN + 1)
    assert lib.omni_policy_queue_next(o, items, lib.OMNI_POLICY_LATE_SCAN + 1,
                                      ffi.NULL, 0) == lib.OMNI_EINVAL


def test_a_short_request_goes_before_the_starved():
    """SJF: the request the order puts first goes ahead of the starved when
    its predicted work is at most OMNI_POLICY_SHORT_PCT % of the starvation
    timeout: it adds that little to a starved request's TTFT and saves its
    own a wait behind a starved prefill (stop 46, docs/scheduler.md).  Only
    while the oldest starved one's wait plus work is under the bound plus
    OMNI_POLICY_SHORT_LATE_PCT % of the timeout, so that short requests
    that keep coming cannot hold it back for ever.  Work 0 (no fitted model
    yet) is not short; FCFS and LPT keep the starved first; a backlog that
    lifts the bound does not lift the limit."""
    assert (lib.OMNI_POLICY_SHORT_PCT, lib.OMNI_POLICY_SHORT_LATE_PCT) == (4, 20)
    timeout = 5_000_000
    limit = timeout * 4 // 100                              # 200 ms
    late = [QueueItem(0, 4_000_000), QueueItem(10, 3_000_000)]
    now = 1_000_000                                         # 0 past the bound
    for work, first in ((limit, None), (1, None), (limit + 1, 0), (0, 0)):
        assert queue_next(late, now, aging=0.25, starvation_us=timeout,
                          head=QueueItem(900_000, work)) == first, work
    head = QueueItem(900_000, 1)
    # not known: the oldest starved
    assert queue_next(late, now, aging=0.25, starvation_us=timeout) == 0
    for order in ("fcfs", "lpt"):
        assert queue_next(late, 6_000_000, order=order, starvation_us=timeout,
                          head=head) == 0
    # the oldest starved one 1 s (20% of the timeout) past the bound: it goes
    assert queue_next(late, 1_999_999, aging=0.25, starvation_us=timeout,
                      head=head) is None
    assert queue_next(late, 2_000_000, aging=0.25, starvation_us=timeout,
                      head=head) == 0
    # a backlog of 8 s per instance: a 10 s bound, the same 200 ms limit
    for work, first in ((limit, None), (limit + 1, 0)):
        assert queue_next(late, 6_000_000, aging=0.25, starvation_us=timeout,
                          backlog_us=8_000_000, head=QueueItem(900_000, work)) == first
    # over a whole queue: a young 150 ms request before an old, starved one;
    # a 300 ms one behind it
    now = 1_500_000
    q = [QueueItem(0, 4_000_000), QueueItem(1_400_000, 150_000)]
    assert queue_pick(q, now, aging=0.25, starvation_us=timeout) == 1
    assert queue_order(q, now, aging=0.25, starvation_us=timeout) == [1, 0]
    q[1] = QueueItem(1_400_000, 300_000)
    assert queue_pick(q, now, aging=0.25, starvation_us=timeout) == 0
    assert queue_order(q, now, aging=0.25, starvation_us=timeout) == [0, 1]


def test_queue_work_is_the_best_instances_uncached_prefill():
    pred = Predictor(4, prefill_prior=(1000, 50_000, 2_000))
    # instance 2 holds 100 blocks of 16, instance 1 holds 10
    assert queue_work(pred, [0, 10, 100, 0], 16, [1, 2, 3], 2000) == \
        pred.prefill_us(2, 400, 1600)
    # ties: the first; instance numbers past the match are not known to hold
    assert queue_work(pred, [0, 10, 10], 16, [3, 2, 1], 2000) == \
        pred.prefill_us(2, 1840, 160)
    # fully cached: one token is computed
    assert queue_work(pred, [500], 16, [0], 64) == pred.prefill_us(0, 1, 63)
    # nothing matched: the first instance, the whole prompt
    assert queue_work(pred, None, 16, [3, 1], 2000) == pred.prefill_us(3, 2000, 0)


def test_the_starvation_rule_counts_no_work_from_an_unfitted_model():
    """The first prefills of a start are predicted by the built-in prior, a
    generic guess: for a 42k-token prompt on the simulator's h100 preset
    6.0 s against 1.9 s, which put it past the 5 s starvation bound after
    a 0.7 s wait, ahead of shorter prompts.  Its work counts for the order,
    not for the starvation rule, until the instance's model has fitted
    OMNI_POLICY_STARVE_SAMPLES prefills (then: all of it)."""
    pred = Predictor(2)
    work, starve = queue_work(pred, None, 16, [1], 42608, starve=True)
    assert work == pred.prefill_us(1, 42608, 0) > 5_000_000 and starve == 0
    for i in range(lib.OMNI_POLICY_STARVE_SAMPLES):
        n = 2000 + 5000 * i           # the preset's service, us
        pred.observe_prefill(1, n, 0, int(6700 + 33300 * n / 1024
                                          + 1100 * n * (n / 2) / 2**20))
        counted = queue_work(pred, None, 16, [1], 42608, starve=True)[1]
        assert (counted > 0) == (i == lib.OMNI_POLICY_STARVE_SAMPLES - 1)
    work, starve = queue_work(pred, None, 16, [1], 42608, starve=True)
    assert starve == work < 3_000_000, work
    # per instance: instance 0 has fitted nothing
    assert queue_work(pred, None, 16, [0], 42608, starve=True)[1] == 0


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


def test_arrival_gap_is_an_exponential_mean():
    a = Arrivals().arrived(1_000)
    assert a.gap_us == 0 and a.last_us == 1_000
    a.arrived(101_000)
    assert a.gap_us == 100_000
    a.arrived(121_000)
    assert a.gap_us == pytest.approx(100_000 + 0.05 * (20_000 - 100_000))
    g = a.gap_us
    a.arrived(121_000 + 60_000_000)                    # idle a minute: capped
    assert a.gap_us == pytest.approx(g + 0.05 * (10_000_000 - g))


# ---- at once -----------------------------------------------------------------


def test_pick_now_round_robin_least_loaded_cache_aware():
    c = [PickCandidate(running=1, load_tokens=500),
         PickCandidate(running=0, load_tokens=100, healthy=False),
         PickCandidate(running=2, load_tokens=300, matched=4),
         PickCandidate(running=3, load_tokens=300, matched=9)]
    assert pick_now(c, "round-robin", start=1) == 2
    assert pick_now(c, "round-robin", start=0) == 0
    assert pick_now(c, "least-loaded") == 2            # ties: first from start
    assert pick_now(c, "least-loaded", start=3) == 3
    assert pick_now(c, "cache-aware") == 3             # longest prefix
    # the holder has BALANCE more running than the least busy: least loaded
    c[3].running = 1 + lib.OMNI_POLICY_BALANCE
    assert pick_now(c, "cache-aware") == 2
    c[3].running = lib.OMNI_POLICY_BALANCE
    assert pick_now(c, "cache-aware") == 3
    # least-loaded ignores matches; tried ones are skipped
    c[2].tried = True
    assert pick_now(c, "least-loaded") == 3
    assert pick_now([PickCandidate(healthy=False)], "round-robin") is None
    assert pick_now([], "least-loaded") is None
    with pytest.raises(ValueError):
        pick_now(c, "random")
