"""The per-instance predictor (omni_predict.h): priors, convergence on
synthetic data, adaptation, robustness, and the work-in-flight tracking.

All data is synthetic and deterministic (seeded); time is an argument."""

import random

import pytest

from omni_ctl.scoring import Predictor
from omni_ctl.scoring.errors import InvalidArgumentError

TRUE_PREFILL = (3000.0, 50000.0, 2000.0)    # us, us per 1k new, us per Mi pairs
TRUE_DECODE = (8000.0, 30.0, 15.0)          # us, us per seq, us per 1k KV


def prefill_truth(n, m, coef=TRUE_PREFILL):
    return coef[0] + coef[1] * n / 1024 + coef[2] * n * (m + n / 2) / 2**20


def decode_truth(b, kv, coef=TRUE_DECODE):
    return coef[0] + coef[1] * b + coef[2] * kv / 1024


def feed_prefill(p, inst, rnd, count, coef=TRUE_PREFILL, noise=0.05):
    for _ in range(count):
        n = rnd.randrange(64, 8192)
        m = rnd.randrange(0, 16384)
        y = prefill_truth(n, m, coef) * (1 + rnd.uniform(-noise, noise))
        p.observe_prefill(inst, n, m, int(y))


def rel(a, b):
    return abs(a - b) / b


def test_priors_until_data_arrives():
    p = Predictor(2)
    prior = p.config["prefill_prior"]
    want = prior[0] + prior[1] * 1 + prior[2] * 1024 * 512 / 2**20
    assert p.prefill_us(0, 1024, 0) == int(want)
    assert p.state(1)["prefill_samples"] == 0
    custom = Predictor(1, prefill_prior=(1000, 2000, 0))
    assert custom.prefill_us(0, 2048) == 1000 + 4000
    assert custom.prefill_us(0, 0) >= custom.config["min_us"]


def test_prefill_converges_on_noisy_data():
    p = Predictor(2)
    rnd = random.Random(1)
    feed_prefill(p, 0, rnd, 400)
    st = p.state(0)
    for got, want in zip(st["prefill_coef"], TRUE_PREFILL):
        assert rel(got, want) < 0.15, (st["prefill_coef"], TRUE_PREFILL)
    assert st["prefill_samples"] == 400
    assert st["prefill_mape"] < 0.08
    for n, m in ((100, 0), (2000, 5000), (8000, 16000)):
        assert rel(p.prefill_us(0, n, m), prefill_truth(n, m)) < 0.08
    # the other instance learned nothing
    assert p.state(1)["prefill_samples"] == 0


def test_short_prefills_are_predicted_well_beside_long_noisy_ones():
    """Prompt sizes spread over three orders of magnitude (as in real
    traces): the fit weighs relative errors, so the long prefills' noise
    does not inflate the fixed cost and every short one with it."""
    truth = (8000.0, 32800.0, 1110.0)
    p = Predictor(1)
    rnd = random.Random(11)
    for _ in range(300):
        n = int(10 ** rnd.uniform(1.3, 4.8))       # 20 .. 63k tokens
        y = prefill_truth(n, 0, truth) * (1 + rnd.uniform(-0.1, 0.1))
        p.observe_prefill(0, n, 0, int(y))
    for n in (30, 200, 2000, 40000):
        assert rel(p.prefill_us(0, n, 0), prefill_truth(n, 0, truth)) < 0.12, n


SHORT_TRUTH = (8000.0, 32800.0, 1110.0)      # a 8B model on one A100, about


def feed_tiny_prefills(p, rnd, count, noise_us=5000):
    """Prompts of 1-63 tokens, timed with an absolute noise (the trip, the
    engine's step): their tokens' part is under a millisecond."""
    for _ in range(count):
        n = rnd.randrange(1, 64)
        y = prefill_truth(n, 0, SHORT_TRUTH) + rnd.uniform(-noise_us, noise_us)
        p.observe_prefill(0, n, 0, int(y))


@pytest.mark.parametrize("count", [2, 5, 20, 200])
def test_tiny_prompts_do_not_decide_the_costs_per_token(count):
    """Prompts too short for their tokens' part to stand out of the timing
    noise say nothing about the costs per token.  Fitted whole, two of them
    (10 and 8 ms at 2 and 31 tokens, from a live run's access log) set
    those costs to 0 and a 17k-token prompt was predicted at 9 ms: the
    proxy piled 15 requests on that instance.  The costs stay at the prior
    (which over-predicts here, the safe side) until longer prompts tell."""
    for seed in range(20):
        p = Predictor(1)
        feed_tiny_prefills(p, random.Random(seed), count)
        got = p.prefill_us(0, 20000, 0)
        assert got > 0.8 * prefill_truth(20000, 0, SHORT_TRUTH), (seed, got)
        assert rel(p.prefill_us(0, 30, 0),
                   prefill_truth(30, 0, SHORT_TRUTH)) < 0.5, seed


def test_an_engine_faster_than_the_prior_on_short_prompts_is_learned():
    """Prompts of 200-300 tokens answered in 0.1-0.3 ms (an engine far
    faster than the prior's 60 ms per 1k tokens; here, bench-overhead's
    canned backend).  Their tokens' part by the prior is under the timing
    noise, but a sample shorter than what the model gives its tokens alone
    contradicts the costs per token.  Fitted on the fixed cost only, they
    stayed at the prior: each was predicted at 14 ms, and the proxy held
    every request of the 1 KB overhead run for an instance it thought busy."""
    for seed in range(5):
        rnd = random.Random(seed)
        p = Predictor(1)
        for _ in range(500):
            p.observe_prefill(0, rnd.randrange(200, 300), 0, rnd.randrange(100, 300))
        got = p.prefill_us(0, 250, 0)
        assert got < 2000, (seed, got)


def test_a_run_of_tiny_prompts_is_not_predicted_short():
    """After a mix of sizes, 200 tiny prompts timed with +-5 ms of noise:
    they are still predicted within 13%, and a long one as before.  Weighed
    in relative terms alone, the samples timed low counted most and the
    tiny prompts came out 15-27% short."""
    for seed in range(10):
        rnd = random.Random(seed)
        p = Predictor(1)
        for _ in range(100):
            n = int(10 ** rnd.uniform(1.3, 4.8))
            y = prefill_truth(n, 0, SHORT_TRUTH) * (1 + rnd.uniform(-0.1, 0.1))
            p.observe_prefill(0, n, 0, int(y))
        feed_tiny_prefills(p, rnd, 200)
        for n, tol in ((30, 0.13), (20000, 0.12)):
            got = p.prefill_us(0, n, 0)
            assert rel(got, prefill_truth(n, 0, SHORT_TRUTH)) < tol, (seed, n)


def test_the_access_logs_tiny_prompts_leave_a_long_one_predicted_long():
    """The sequence of the live collapse, through dispatch and answer: a
    40k-token prompt answered out of order (not fitted), then prompts of 33
    and 31 tokens in 19 and 8 ms.  The next 17,642-token prompt took about
    600 ms on that engine; it was predicted at 9 ms."""
    p = Predictor(4, transfer=True)
    job = p.dispatch_prefill(0, 2, 0, 0)
    p.prefill_done(0, job, 10_000)
    long_job = p.dispatch_prefill(0, 40160, 0, 68_000)
    p.expect_prefill_end(0, long_job, 111)
    p.prefill_stored(0, 111, 2_140_000)
    job = p.dispatch_prefill(0, 33, 0, 2_207_000)
    p.expect_prefill_end(0, job, 222)
    p.prefill_done(0, job, 2_226_000)
    job = p.dispatch_prefill(0, 31, 0, 2_249_000)
    p.prefill_done(0, job, 2_257_000)
    coef = p.state(0)["prefill_coef"]
    assert coef[1] > 0 and coef[2] > 0, coef
    assert p.prefill_us(0, 17642, 0) > 500_000


def test_prefill_follows_a_slowdown():
    p = Predictor(1)
    rnd = random.Random(2)
    feed_prefill(p, 0, rnd, 300)
    slow = tuple(2 * c for c in TRUE_PREFILL)
    feed_prefill(p, 0, rnd, 250, coef=slow)
    assert rel(p.prefill_us(0, 3000, 3000), prefill_truth(3000, 3000, slow)) < 0.1


def test_one_outlier_is_clipped_and_forgotten():
    p = Predictor(1)
    rnd = random.Random(3)
    feed_prefill(p, 0, rnd, 300)
    before = p.prefill_us(0, 2000, 1000)
    p.observe_prefill(0, 2000, 1000, 100 * before)
    assert p.prefill_us(0, 2000, 1000) < 4.5 * before
    feed_prefill(p, 0, rnd, 100)
    assert rel(p.prefill_us(0, 2000, 1000), prefill_truth(2000, 1000)) < 0.1


def test_no_windup_on_unvarying_input():
    p = Predictor(1)
    for _ in range(5000):
        p.observe_prefill(0, 1024, 0, 40000)
    assert rel(p.prefill_us(0, 1024, 0), 40000) < 0.01
    # a new kind of input afterwards: a sane, finite answer
    p.observe_prefill(0, 4096, 4096, 200000)
    got = p.prefill_us(0, 4096, 4096)
    assert 50000 < got < 400000
    for c in p.state(0)["prefill_coef"]:
        assert abs(c) < 1e9


def test_decode_converges():
    p = Predictor(1)
    rnd = random.Random(4)
    for _ in range(400):
        b = rnd.randrange(1, 256)
        kv = rnd.randrange(0, 2_000_000)
        p.observe_decode(0, b, kv, int(decode_truth(b, kv)
                                       * (1 + rnd.uniform(-0.03, 0.03))))
    assert rel(p.decode_step_us(0, 64, 500_000), decode_truth(64, 500_000)) < 0.05
    assert p.state(0)["decode_mape"] < 0.06


def test_dispatch_queues_behind_work_in_flight_and_reanchors():
    p = Predictor(1, prefill_prior=(1000, 10000, 0))
    j1 = p.dispatch_prefill(0, 1024, 0, now_us=0)      # 11000 us each
    # sent once the first one's step runs: it waits for the next
    j2 = p.dispatch_prefill(0, 1024, 0, now_us=5000)
    assert (j1.service_us, j1.done_us) == (11000, 11000)
    assert (j2.start_us, j2.done_us, j2.shared) == (11000, 22000, False)
    assert p.wait_us(0, 5000) == 17000
    assert p.end_us(0) == 22000
    assert p.state(0)["inflight"] == 2
    # the first one took longer than predicted: the second is now expected
    # its predicted service after the real completion
    p.prefill_done(0, j1, done_us=15000)
    assert p.wait_us(0, 15000) == 11000
    assert p.state(0)["free_at_us"] == 26000
    assert p.end_us(0) == 26000
    p.prefill_done(0, j2, done_us=25000)
    assert p.state(0)["inflight"] == 0
    assert p.wait_us(0, 25000) == 0
    assert p.end_us(0) == 0
    # idle instance: a new dispatch starts now
    assert p.dispatch_prefill(0, 1024, 0, now_us=40000).done_us > 40000


def test_requests_waiting_for_one_step_share_it():
    """Engines batch: what is sent while the last request still waits for
    its step joins that step and adds its tokens' cost, not a second step's
    fixed cost.  Such a completion is not fitted (it is not its own)."""
    p = Predictor(1, prefill_prior=(1000, 10000, 0))
    busy = p.dispatch_prefill(0, 1024, 0, now_us=0)     # 0-11000, running
    a = p.dispatch_prefill(0, 1024, 0, now_us=5000)     # next step, 11000-22000
    b = p.dispatch_prefill(0, 512, 0, now_us=6000)      # joins a's step
    assert (a.start_us, a.done_us, a.shared) == (11000, 22000, False)
    assert (b.start_us, b.service_us, b.shared) == (11000, 5000, True)
    assert b.done_us == 27000
    assert p.wait_us(0, 6000) == 21000
    # two sent to an idle instance at once share its first step
    q = Predictor(1, prefill_prior=(1000, 10000, 0))
    x = q.dispatch_prefill(0, 1024, 0, now_us=0)
    y = q.dispatch_prefill(0, 1024, 0, now_us=0)
    assert (x.shared, y.shared, y.done_us) == (False, True, 21000)
    for job in (busy, a, b):
        p.prefill_done(0, job, done_us=job.done_us)
    st = p.state(0)
    assert (st["inflight"], st["prefill_samples"], st["completion_samples"]) == (0, 2, 3)


def test_overdue_work_still_counts_as_busy():
    p = Predictor(1, prefill_prior=(1000, 10000, 0), min_us=100)
    p.dispatch_prefill(0, 1024, 0, now_us=0)
    free_at = p.state(0)["free_at_us"]
    assert p.wait_us(0, free_at - 50) == 100        # nearly done
    assert p.wait_us(0, free_at + 50) == 100
    # overdue by X: about X more, so a hung instance looks busier and busier
    assert p.wait_us(0, free_at + 5000) == 5000
    # while its predicted end stays where it was: overrun
    assert p.end_us(0) == free_at
    assert p.wait_us(0, free_at + 600_000_000) == 600_000_000


def test_completion_error_on_a_serial_server():
    """The proxy's view: dispatch, then a completion; the engine is a serial
    server whose service time follows TRUE_PREFILL with 5% noise.  Requests
    often queue behind each other."""
    p = Predictor(1)
    rnd = random.Random(5)
    now = 0
    server_free = 0
    inflight = []
    for _ in range(600):
        now += rnd.randrange(0, 300000)      # ~80% load: frequent queueing
        # completions that happened by now
        for job, done in sorted(inflight, key=lambda x: x[1]):
            if done <= now:
                p.prefill_done(0, job, done)
        inflight = [(j, d) for j, d in inflight if d > now]
        n, m = rnd.randrange(64, 4096), rnd.randrange(0, 8192)
        job = p.dispatch_prefill(0, n, m, now)
        start = max(now, server_free)
        server_free = start + int(prefill_truth(n, m)
                                  * (1 + rnd.uniform(-0.05, 0.05)))
        inflight.append((job, server_free))
    for job, done in sorted(inflight, key=lambda x: x[1]):
        p.prefill_done(0, job, done)
    st = p.state(0)
    assert st["inflight"] == 0
    assert st["completion_samples"] == 600
    assert st["completion_mape"] < 0.15, st
    assert rel(st["prefill_coef"][1], TRUE_PREFILL[1]) < 0.2


def test_the_trip_to_an_idle_engine_is_learned_apart_from_the_service():
    """A request sent to an idle instance pays the trip to the engine and
    back (R) on top of its service; one already waiting there when the one
    before it finishes does not.  The service model is fitted on the second
    kind, R is learned from the first, so both are predicted well (one
    model for both would be off by about R/2 for each)."""
    trip = 4000
    p = Predictor(1)
    rnd = random.Random(11)
    now = 0
    errors = {"idle": [], "queued": []}
    for i in range(400):
        now += 1_000_000                     # idle before each pair
        n1, n2 = rnd.randrange(64, 2048), rnd.randrange(64, 2048)
        j1 = p.dispatch_prefill(0, n1, 0, now)
        j2 = p.dispatch_prefill(0, n2, 0, now + 2000)   # waits behind j1
        d1 = now + trip + int(prefill_truth(n1, 0))
        d2 = d1 + int(prefill_truth(n2, 0))
        p.prefill_done(0, j1, d1)
        p.prefill_done(0, j2, d2)
        if i >= 300:
            errors["idle"].append(rel(j1.done_us - now, d1 - now))
            errors["queued"].append(rel(j2.done_us - (now + 2000), d2 - (now + 2000)))
    st = p.state(0)
    assert abs(st["reach_us"] - trip) < 0.2 * trip, st
    assert rel(st["prefill_coef"][0], TRUE_PREFILL[0]) < 0.1, st
    for kind, e in errors.items():
        assert sum(e) / len(e) < 0.03, (kind, sum(e) / len(e))


def test_a_transfer_after_the_service_is_learned_and_does_not_count_as_busy():
    """Parallel P/D: a prefill leg answers once the KV has gone to the
    decode instance, while the engine already runs its next step.  That
    trip is learned, predicted completions include it, and the instance
    counts as free once its service is over, not when the answer comes
    back (counted busy through the transfer, it idled that long before
    each held request was released)."""
    transfer = 30000
    p = Predictor(1, min_us=100)
    rnd = random.Random(12)
    now = 0
    errors = []
    for i in range(400):
        now += 2_000_000                     # idle before each pair
        (n1, m1), (n2, m2) = [(rnd.randrange(64, 12000), rnd.randrange(0, 4000))
                              for _ in range(2)]
        j1 = p.dispatch_prefill(0, n1, m1, now)
        j2 = p.dispatch_prefill(0, n2, m2, now + 2000)   # waits behind j1
        end1 = now + int(prefill_truth(n1, m1))          # the engine's work
        end2 = end1 + int(prefill_truth(n2, m2))
        d1, d2 = end1 + transfer, end2 + transfer
        if i >= 300:
            errors += [rel(j1.done_us - now, d1 - now),
                       rel(j2.done_us - (now + 2000), d2 - (now + 2000))]
            # once the engine has done j2's work it is free, though its
            # answer is a transfer away; before, it is busy with j2
            assert p.wait_us(0, end2 + 500) <= 0.1 * transfer
            assert rel(p.wait_us(0, end1), end2 - end1) < 0.1
        p.prefill_done(0, j1, d1)
        p.prefill_done(0, j2, d2)
    st = p.state(0)
    assert rel(st["reach_us"] + st["reach_per_1k_us"] * 6, transfer) < 0.05, st
    assert rel(st["prefill_coef"][1], TRUE_PREFILL[1]) < 0.1, st
    assert sum(errors) / len(errors) < 0.03
    # a job sent while the one before it transfers starts at once
    now += 2_000_000
    j = p.dispatch_prefill(0, 8000, 0, now)
    end = now + int(prefill_truth(8000, 0))
    k = p.dispatch_prefill(0, 1000, 0, end + 100)
    assert k.start_us == end + 100 and not k.shared
    assert rel(k.done_us - (end + 100), prefill_truth(1000, 0) + transfer) < 0.1
    p.prefill_done(0, j, end + transfer)
    assert p.state(0)["inflight"] == 1
    p.prefill_done(0, k, k.done_us)
    assert p.state(0)["inflight"] == 0 and p.wait_us(0, k.done_us + 1) == 0


def _serve_with_transfer(transfer, k_per_1k, seed, jobs=400, load=0.85,
                         slack=20000, predictor=None, noise=0.05,
                         ends_lag=None):
    """One instance, requests of 2k-9k tokens arriving at random (Poisson,
    `load` of the engine's time), held by the proxy and sent when the
    predictor says the instance frees within the slack; each prefill's answer
    comes its KV transfer (k_per_1k us per 1,024 tokens) after the engine's
    work, while the engine goes on with the next one.  Returns the time the
    engine idled per request while the next request was already waiting at
    the proxy (us), and the predictor's state.  With `ends_lag`, the
    engine's KV events tell each prefill's end that long after it (the
    prompt's last block stored; omni_predict_prefill_stored); a (lo, hi)
    pair draws each lag between the two (the agent's flush varies)."""
    p = predictor or Predictor(1, min_us=100, transfer=transfer)
    rnd = random.Random(seed)
    lags = random.Random(seed + 1000)
    mean = prefill_truth(5500, 0)
    t, arrivals = 0, []
    for _ in range(jobs):
        t += int(rnd.expovariate(load / mean))
        arrivals.append((t, rnd.randrange(2000, 9000)))
    t = engine_free = idle = 0
    waiting, inflight = [], []          # (arrival, n), (job, answer_us)
    told = []                           # (engine end + lag, block hash)
    while arrivals or waiting or inflight:
        while arrivals and arrivals[0][0] <= t:
            waiting.append(arrivals.pop(0))
        for at, h in [x for x in told if x[0] <= t]:
            p.prefill_stored(0, h, at)
        told = [x for x in told if x[0] > t]
        for job, done in [x for x in inflight if x[1] <= t]:
            p.prefill_done(0, job, done)
        inflight = [x for x in inflight if x[1] > t]
        if waiting and len(inflight) < 2 and p.wait_us(0, t) <= slack:
            arrived, n = waiting.pop(0)
            job = p.dispatch_prefill(0, n, 0, t)
            s = int(prefill_truth(n, 0) * (1 + rnd.uniform(-noise, noise)))
            start = max(t, engine_free)
            if arrived <= engine_free < start:
                idle += start - engine_free
            engine_free = start + s
            inflight.append((job, engine_free + k_per_1k * n // 1024))
            if ends_lag is not None:
                p.expect_prefill_end(0, job, job.sent_at_us)
                lag = (ends_lag if isinstance(ends_lag, int)
                       else int(lags.uniform(*ends_lag)))
                told.append((engine_free + lag, job.sent_at_us))
            continue
        # the next event: an arrival, an answer, a told end, or the release
        nxt = [x[1] for x in inflight] + [a for a, _ in arrivals[:1]]
        nxt += [x[0] for x in told]
        if waiting and len(inflight) < 2:
            nxt.append(t + max(p.wait_us(0, t) - slack, 1))
        if not nxt:
            break
        t = max(min(nxt), t + 1)
    return idle / jobs, p.state(0)


def test_a_transfer_under_a_backlog_is_learned_and_frees_the_instance_early():
    """Parallel P/D: every prefill's answer comes after its KV transfer,
    which grows with the prompt while the engine already runs the next one.
    Requests sent to an idle instance show the engine's work and the
    transfer only as their sum, so without the transfer flag the service
    model takes the transfer in and the instance counts as busy until each
    answer: the next request, though waiting at the proxy, goes out after
    it, and the engine idles through every transfer.  With the flag, the
    transfer's time per token is learned from the jobs that waited for the
    one before them (their answers' gap is their service plus their
    transfer less the one before's), and the instance counts as free when
    the engine's work is done."""
    k = 7680                                # us per 1,024 tokens
    for seed in range(3):
        idle_off, _ = _serve_with_transfer(False, k, seed)
        idle_on, st = _serve_with_transfer(True, k, seed)
        assert st["transfer_samples"] >= 16, st
        assert rel(st["transfer_per_1k_us"], k) < 0.25, st
        # the trip shown is the one in use: the transfer's time per token
        assert abs(st["reach_per_1k_us"] - st["transfer_per_1k_us"]) <= 1, st
        # the service model is the engine's work, without the transfer
        assert rel(st["prefill_coef"][1], TRUE_PREFILL[1]) < 0.15, st
        assert idle_off > 4000, idle_off
        assert idle_on < 0.3 * idle_off, (idle_on, idle_off)
    # a serial server without a transfer learns none, and idles as before
    idle_off, _ = _serve_with_transfer(False, 0, 0)
    idle_on, st = _serve_with_transfer(True, 0, 0)
    assert st["transfer_per_1k_us"] < 0.1 * k, st
    assert idle_on < 1000 and idle_off < 1000, (idle_on, idle_off)
    # the flag is the configuration's (parallel P/D), and nothing is learned
    # without it
    _, st = _serve_with_transfer(False, k, 0, jobs=60)
    assert st["transfer_samples"] == 0
    assert Predictor(1, transfer=True).config["transfer"] is True
    assert Predictor(1).config["transfer"] is False


def test_a_parallel_engine_is_learned_from_the_jobs_sent_to_it_idle():
    """Parallel P/D: once the transfer's time per token is known, a job sent
    to an idle engine shows its service as its latency less its transfer,
    and the service model learns from it.  Before, only the jobs timed from
    the answer before them taught the model (few, when short prompts sent
    behind long ones are answered first), and an idle job's latency went to
    the trip: an engine that slowed down looked like a longer trip, its
    service was predicted as fast as before, and the instance counted free
    long before it was (live, on the Mooncake trace, the model kept its
    first jobs' fit, transfers included: short prefills were predicted
    70-90% too long)."""
    k = 7680
    p = Predictor(1, min_us=100, transfer=True)
    _serve_with_transfer(True, k, 0, predictor=p)       # the transfer known
    st = p.state(0)
    assert st["transfer_samples"] >= 16 and st["inflight"] == 0, st
    slow = tuple(c * 1.5 for c in TRUE_PREFILL)
    rnd = random.Random(1)
    t = st["free_at_us"] + 1_000_000
    for _ in range(150):
        n = rnd.randrange(200, 9000)
        job = p.dispatch_prefill(0, n, 0, t)
        end = t + 500 + int(prefill_truth(n, 0, slow))
        p.prefill_done(0, job, end + k * n // 1024 + 500)
        t = end + 1_000_000                             # idle in between
    for n in (300, 4000, 9000):
        # the service and the trip (1 ms), which the fixed cost takes
        truth = prefill_truth(n, 0, slow) + 1000
        assert rel(p.prefill_us(0, n, 0), truth) < 0.1, (n, p.state(0))
    # the engine's end of the next job is predicted where it is, and its
    # answer a transfer later
    job = p.dispatch_prefill(0, 6000, 0, t)
    end = t + 500 + prefill_truth(6000, 0, slow)
    assert abs(p.end_us(0) - end) < 0.1 * prefill_truth(6000, 0, slow)
    assert rel(job.done_us - t, end - t + k * 6000 / 1024 + 500) < 0.1


def test_the_engine_tells_a_prefill_end_before_its_answer():
    """Parallel P/D: a prefill's answer comes after its KV transfer; the
    engine's KV events tell its end before that (the prompt's last block
    stored).  The predicted end then is that moment plus the work sent
    after the job, when that is earlier than predicted; an answer that
    comes after moves nothing back, and older news (an end after its
    answer, a block nobody waits for, the same block twice) or a later end
    (the events' lag as much as a slow engine) moves nothing."""
    k = 7680
    p = Predictor(1, min_us=100, transfer=True)
    _serve_with_transfer(True, k, 0, predictor=p)
    t = p.state(0)["free_at_us"] + 1_000_000
    long = p.dispatch_prefill(0, 9000, 0, t)
    p.expect_prefill_end(0, long, 111)
    short = p.dispatch_prefill(0, 1000, 0, t + 5000)       # queued behind it
    p.expect_prefill_end(0, short, 222)
    predicted = p.end_us(0)
    # the engine was 30% faster than predicted on the long one
    told = t + int(0.7 * long.service_us) + 3000
    assert not p.prefill_stored(0, 999, told)               # nobody's block
    assert p.end_us(0) == predicted
    assert p.prefill_stored(0, 111, told)
    assert abs(p.end_us(0) - (told + short.service_us)) <= 1
    assert p.end_us(0) < predicted - 0.2 * long.service_us
    assert not p.prefill_stored(0, 111, told + 10)          # told already
    # its answer, a transfer later, leaves the end the engine told
    end = p.end_us(0)
    p.prefill_done(0, long, told + k * 9000 // 1024)
    assert p.end_us(0) == end
    # the short one's end: nothing left in the engine
    told2 = end - 40_000
    assert p.prefill_stored(0, 222, told2)
    assert p.end_us(0) == told2
    assert p.wait_us(0, told2 + 500) <= 1000
    p.prefill_done(0, short, told2 + k * 1000 // 1024)
    st = p.state(0)
    assert st["inflight"] == 0 and st["engine_ends"] == 2, st
    assert p.end_us(0) == 0
    # an end told after the answer is older news
    t = told2 + 1_000_000
    j = p.dispatch_prefill(0, 4000, 0, t)
    p.expect_prefill_end(0, j, 333)
    j2 = p.dispatch_prefill(0, 4000, 0, t + 1000)
    p.prefill_done(0, j, t + j.service_us + 1000)
    end = p.end_us(0)
    assert not p.prefill_stored(0, 333, t + j.service_us + 5000)
    assert p.end_us(0) == end
    p.prefill_done(0, j2, end + 1000)
    # an end told later than predicted (the events' lag, or a slow engine)
    # moves nothing, and the answer then re-anchors as without events
    t += 10_000_000
    j = p.dispatch_prefill(0, 4000, 0, t)
    p.expect_prefill_end(0, j, 555)
    j2 = p.dispatch_prefill(0, 4000, 0, t + 1000)
    end = p.end_us(0)
    assert not p.prefill_stored(0, 555, j.done_us + 50_000)
    assert p.end_us(0) == end
    done = j.done_us + 60_000
    p.prefill_done(0, j, done)
    assert abs(p.end_us(0) - (done - j.tail_us + j2.service_us)) <= 1
    p.prefill_done(0, j2, p.end_us(0) + j2.tail_us)
    assert p.state(0)["engine_ends"] == 2
    # a failed job's mark goes with it; past OMNI_PREDICT_MARKS jobs in
    # flight, the oldest one's gives way
    t += 10_000_000
    bad = p.dispatch_prefill(0, 2000, 0, t)
    p.expect_prefill_end(0, bad, 444)
    p.prefill_done(0, bad, t + 10, ok=False)
    assert not p.prefill_stored(0, 444, t + 20)
    jobs = []
    for i in range(17):
        jobs.append(p.dispatch_prefill(0, 500, 0, t + 100 + i))
        p.expect_prefill_end(0, jobs[-1], 1000 + i)
    assert not p.prefill_stored(0, 1000, t + 50_000)       # gave way
    assert p.prefill_stored(0, 1016, t + 60_000)
    assert p.end_us(0) == t + 60_000
    assert p.state(0)["engine_ends"] == 3
    for j in jobs:
        p.prefill_done(0, j, t + 70_000)
    assert p.state(0)["inflight"] == 0
    # the same prompt sent twice: the engine stores its blocks for the first
    # (and finds them cached for the second), so the block tells the first's end
    t += 10_000_000
    first = p.dispatch_prefill(0, 6000, 0, t)
    again = p.dispatch_prefill(0, 6000, 0, t + 1000)
    p.expect_prefill_end(0, again, 666)
    p.expect_prefill_end(0, first, 666)
    told = t + first.service_us // 2
    assert p.prefill_stored(0, 666, told)
    assert abs(p.end_us(0) - (told + again.service_us)) <= 1
    p.prefill_done(0, first, told + 5000)
    p.prefill_done(0, again, told + 6000)
    with pytest.raises(InvalidArgumentError):
        p.prefill_stored(1, 111, 0)


def test_told_ends_spare_the_engine_the_errors_of_the_prediction():
    """The same held, serial serving with a KV transfer as above, when
    the engine's service strays from the model by up to 40%: predicted ends
    that come late leave the engine idle until the answer (a transfer
    later) while the next request waits at the proxy.  Told by the engine
    (its events 5 ms after each end), the instance frees at the end."""
    k = 7680
    for seed in range(3):
        idle_pred, _ = _serve_with_transfer(True, k, seed, noise=0.4)
        idle_told, st = _serve_with_transfer(True, k, seed, noise=0.4,
                                             ends_lag=5000)
        assert st["engine_ends"] > 50, st
        assert idle_pred > 3000, idle_pred
        assert idle_told < 0.35 * idle_pred, (idle_told, idle_pred)


def test_the_transfer_is_timed_from_the_ends_the_engine_told():
    """With the engines' KV events, a job's answer comes its transfer (and
    the way back) after the end the engine told, less the events' lag: the
    transfer's time per token is the slope of that time over the prompt,
    whatever the engine's service did.  Fitted only from the gaps between
    answers, the service's own errors (40% here) are in every sample, and
    the time per token came out anywhere from 0 to 1.3x the truth (live,
    with the agent: 0.3-3.9 ms per 1k tokens against 5.3)."""
    k = 7680
    for seed in range(3):
        _, st = _serve_with_transfer(True, k, seed, noise=0.4,
                                     ends_lag=(2000, 20000))
        assert st["transfer_told_samples"] >= 100, st
        assert rel(st["transfer_per_1k_us"], k) < 0.1, st
        # the trip shown is the one in use
        assert abs(st["reach_per_1k_us"] - st["transfer_per_1k_us"]) <= 1, st
        # without the events, nothing is told
        _, st = _serve_with_transfer(True, k, seed, noise=0.4)
        assert st["transfer_told_samples"] == 0, st
    # an engine without a transfer answers before its events come: nothing
    # is timed from them, and no time per token is learned
    _, st = _serve_with_transfer(True, 0, 0, ends_lag=(2000, 20000))
    assert st["transfer_told_samples"] == 0, st
    assert st["transfer_per_1k_us"] < 0.1 * k, st
    # sequential P/D (no transfer flag) learns no transfer from told ends
    _, st = _serve_with_transfer(False, k, 0, ends_lag=5000, jobs=60)
    assert st["transfer_told_samples"] == 0 and st["transfer_samples"] == 0


def test_an_answer_out_of_order_frees_the_instance_through_the_transfers():
    """Parallel P/D: the engine serves in order, but a short prompt sent
    behind a long one is often answered first (its KV transfer is shorter).
    The engine is then past both, the long one transferring.  The short
    one's answer re-anchored the instance at its end plus the service of
    every job still in flight, the long one's too: the instance counted
    busy for that service again (seconds, for a long prompt), and the next
    request waited for the long one's answer.  It counts free now, with the
    long one's answer still to come, and neither answer is fitted (where
    each stood in the engine is not known)."""
    k = 7680
    p = Predictor(1, min_us=100, transfer=True)
    _serve_with_transfer(True, k, 0, predictor=p)
    st = p.state(0)
    assert st["inflight"] == 0 and st["transfer_samples"] >= 16, st
    samples = st["prefill_samples"]
    t = st["free_at_us"] + 1_000_000
    long = p.dispatch_prefill(0, 9000, 0, t)
    short = p.dispatch_prefill(0, 200, 0, t + 5000)         # queued behind it
    end = t + int(prefill_truth(9000, 0)) + int(prefill_truth(200, 0))
    short_answer = end + k * 200 // 1024
    long_answer = t + int(prefill_truth(9000, 0)) + k * 9000 // 1024
    assert short_answer < long_answer - 20000
    p.prefill_done(0, short, short_answer)
    now = short_answer + 1000
    assert p.state(0)["inflight"] == 1
    assert p.end_us(0) <= now                          # the engine's work is done
    assert p.wait_us(0, now) <= 1000
    assert p.answer_us(0) >= long.done_us > now + 20000  # the long one's to come
    p.prefill_done(0, long, long_answer)
    st = p.state(0)
    assert st["inflight"] == 0 and st["prefill_samples"] == samples, st
    assert p.end_us(0) == 0 and p.answer_us(0) == 0
    # in order, the same two are timed: the short one from the long one's
    # answer, and the long one, sent to an idle engine, by its latency less
    # its transfer
    t = long_answer + 1_000_000
    long = p.dispatch_prefill(0, 9000, 0, t)
    short = p.dispatch_prefill(0, 1000, 0, t + 5000)
    p.prefill_done(0, long, t + int(prefill_truth(9000, 0)) + 1000)
    p.prefill_done(0, short, t + int(prefill_truth(9000, 0))
                   + int(prefill_truth(1000, 0)) + 1000)
    assert p.state(0)["prefill_samples"] == samples + 2
    # a job that failed behind a long one (it may never have reached the
    # engine) says nothing of how far the engine is: the long one's work
    # still counts, the failed one's no more
    t += 10_000_000
    long = p.dispatch_prefill(0, 9000, 0, t)
    bad = p.dispatch_prefill(0, 200, 0, t + 5000)
    assert p.end_us(0) > long.done_us - long.tail_us + 10_000
    p.prefill_done(0, bad, t + 6000, ok=False)
    assert abs(p.end_us(0) - (long.done_us - long.tail_us)) <= 1
    p.prefill_done(0, long, long.done_us)
    assert p.state(0)["inflight"] == 0


def test_batched_completion_is_not_fitted():
    p = Predictor(1, prefill_prior=(1000, 10000, 0))
    j1 = p.dispatch_prefill(0, 1024, 0, 0)
    j2 = p.dispatch_prefill(0, 1024, 0, 0)
    p.prefill_done(0, j1, 12000)
    p.prefill_done(0, j2, 12000)          # same step as j1: no clean sample
    st = p.state(0)
    assert st["prefill_samples"] == 1
    assert st["completion_samples"] == 2


def test_failed_job_is_not_fitted_but_leaves_flight():
    p = Predictor(1)
    j = p.dispatch_prefill(0, 1000, 0, 0)
    p.prefill_done(0, j, 5, ok=False)
    st = p.state(0)
    assert (st["inflight"], st["prefill_samples"], st["completion_samples"]) == (0, 0, 0)


def test_decode_wait():
    p = Predictor(1, decode_prior=(10000, 0, 0))
    assert p.decode_wait_us(0, 10, 0, 32, 50) == 0
    assert p.decode_wait_us(0, 32, 0, 32, 50) == 50 * 10000
    assert p.decode_wait_us(0, 5, 0, 0, 50) == 0          # no limit


def test_reset_and_invalid():
    p = Predictor(2)
    feed_prefill(p, 1, random.Random(6), 50)
    p.reset(1)
    assert p.state(1)["prefill_samples"] == 0
    with pytest.raises(InvalidArgumentError):
        p.prefill_us(2, 10)
    with pytest.raises(ValueError):
        Predictor(0)
    with pytest.raises(ValueError):
        Predictor(1, forget=0.3)
    with pytest.raises(ValueError):
        Predictor(1, prefill_prior=(float("nan"), 0, 0))


def test_similar_prompts_only_do_not_diverge():
    """Nearly collinear inputs (only short prompts, nothing cached) made the
    covariance form of RLS lose positive definiteness and diverge to
    ~1e19; the information form stays put and extrapolates sanely."""
    p = Predictor(1)
    rnd = random.Random(8)
    for _ in range(2000):
        n = rnd.randrange(200, 600)
        p.observe_prefill(0, n, 0, 8000 + 20 * n)
    coef = p.state(0)["prefill_coef"]
    assert all(0 <= c < 1e6 for c in coef), coef
    assert rel(p.prefill_us(0, 400, 0), 8000 + 20 * 400) < 0.02
    assert rel(p.prefill_us(0, 30000, 0), 8000 + 20 * 30000) < 0.1


@pytest.mark.parametrize("seed", range(3))
def test_extreme_inputs_stay_finite(seed):
    rnd = random.Random(seed)
    p = Predictor(1)
    for _ in range(500):
        n = rnd.choice([0, 1, 2**32 - 1, rnd.randrange(2**32)])
        m = rnd.choice([0, 2**32 - 1, rnd.randrange(2**32)])
        us = rnd.choice([0, 1, 2**64 - 1, rnd.randrange(2**40)])
        p.observe_prefill(0, n, m, us)
        p.observe_decode(0, n, m * 1000, us)
        for c in p.state(0)["prefill_coef"] + p.state(0)["decode_coef"]:
            assert 0 <= c < float("inf")
        assert 0 < p.prefill_us(0, n, m) <= 10**12
        assert 0 < p.decode_step_us(0, n, m) <= 10**12
