"""SLO-aware release (omni_policy.h, "SLO-aware release"): the release
order that keeps the most requests within their TTFT SLO, the early 429 and
Retry-After from the queue's expected drain.

These are the functions the module calls in SLO mode (docs/scoring.md, "How
the module calls the policies", point 9).  The simulation at the end is a
model of the proxy's prefill queue (exact predictions, one request at a time
per instance), not the engines: it shows what the rule does to goodput, not
what a benchmark measures."""

import random

import pytest

from omni_ctl.scoring import (DecodeInstance, DecodeJob, PrefillCandidate, Predictor,
                              QueueItem, SloItem, decide_prefill, ffi, lib,
                              place_decode, place_decode_tpot, queue_pick,
                              retry_after, slo_admit, slo_next, slo_starved)
from omni_ctl.scoring.errors import InvalidArgumentError

MS = 1000
S = 1_000_000


# ---- the rule, by hand ---------------------------------------------------------


def test_nothing_at_risk_is_the_queue_order():
    # generous deadlines: shortest first, exactly as without SLOs
    q = [SloItem(0, 300 * MS, 10 * S), SloItem(0, 100 * MS, 10 * S),
         SloItem(0, 200 * MS, 10 * S)]
    p = slo_next(q, [0], now_us=0)
    assert (p.index, p.reason, p.feasible, p.on_time) == (1, "order", 3, 3)
    assert queue_pick([QueueItem(x.arrival_us, x.work_us) for x in q], 0) == 1


def test_an_urgent_long_request_goes_before_a_short_one_that_can_wait():
    """One instance, free now.  Shortest first would finish the 300 ms
    request at 400 ms, past its 350 ms deadline; releasing it first, both
    are on time."""
    urgent = SloItem(0, 300 * MS, 350 * MS)
    short = SloItem(0, 100 * MS, 10 * S)
    assert queue_pick([QueueItem(0, 300 * MS), QueueItem(0, 100 * MS)], 0) == 1
    p = slo_next([urgent, short], [0], now_us=0)
    assert (p.index, p.reason, p.on_time) == (0, "plan", 2)
    # the instance frees only in 60 ms: the urgent one cannot make it any
    # more (60 + 300 > 350); it is lost, and the short one goes
    p = slo_next([urgent, short], [60 * MS], now_us=0)
    assert (p.index, p.reason, p.feasible) == (1, "order", 1)


def test_the_most_that_can_be_on_time():
    """A (100 ms, due 150), B (100, due 200), C (300, due 350) cannot all
    make it; D (50 ms) can wait.  Shortest first (D, A, B, C) makes B and C
    late; the plan drops the longest of the urgent ones (C) and releases A:
    A, B, D on time."""
    q = [SloItem(0, 100 * MS, 150 * MS), SloItem(0, 100 * MS, 200 * MS),
         SloItem(0, 300 * MS, 350 * MS), SloItem(0, 50 * MS, 10 * S)]
    assert queue_pick([QueueItem(x.arrival_us, x.work_us) for x in q], 0) == 3
    p = slo_next(q, [0], now_us=0)
    assert (p.index, p.reason, p.feasible, p.on_time) == (0, "plan", 4, 3)
    # the rest of the schedule, deciding again after each release
    order, now, left = [], 0, list(range(4))
    while left:
        k = slo_next([q[i] for i in left], [0], now_us=now).index
        order.append(left[k])
        now += q[left[k]].work_us
        del left[k]
    ends = {}
    t = 0
    for i in order:
        t += q[i].work_us
        ends[i] = t
    assert sum(ends[i] <= q[i].deadline_us for i in range(4)) == 3
    assert order[:2] == [0, 1]


def test_shortest_first_among_those_that_keep_the_plan():
    """One instance.  Shortest first (B, C, A, U) makes U late.  Released
    first, B still leaves room for U, A, C in deadline order: B goes (the
    plan does not simply take the earliest deadline).  Then nothing short
    fits before U any more: U goes."""
    q = [SloItem(0, 100 * MS, 1 * S), SloItem(0, 50 * MS, 10 * S),
         SloItem(0, 60 * MS, 10 * S), SloItem(0, 400 * MS, 460 * MS)]
    p = slo_next(q, [0], now_us=0)
    assert (p.index, p.reason, p.on_time) == (1, "plan", 4)
    p = slo_next([q[0], q[2], q[3]], [0], now_us=50 * MS)
    assert (p.index, p.reason, p.on_time) == (2, "plan", 3)


def test_lost_requests_go_after_those_that_can_still_make_it():
    lost = SloItem(0, 10 * MS, 500 * MS)          # waited 495 ms already
    fresh = SloItem(400 * MS, 200 * MS, 2400 * MS)
    now = 495 * MS
    # shortest first takes the lost one (less work, and older)
    assert queue_pick([QueueItem(0, 10 * MS), QueueItem(400 * MS, 200 * MS)],
                      now) == 0
    p = slo_next([lost, fresh], [0], now_us=now)
    assert (p.index, p.reason, p.feasible) == (1, "order", 1)
    # nothing can make it: the queue order among them
    p = slo_next([lost, SloItem(1 * MS, 5 * MS, 400 * MS)], [0], now_us=now)
    assert (p.index, p.reason, p.feasible) == (1, "lost", 0)
    # a request without an SLO always counts as able to make it
    p = slo_next([lost, SloItem(300 * MS, 900 * MS)], [0], now_us=now)
    assert (p.index, p.reason) == (1, "order")


def test_a_lost_request_is_not_starved_forever():
    """Past its deadline by the starvation timeout, a lost request goes
    before those that can still make it (the oldest first, as without
    SLOs); a request without SLO counts from its arrival."""
    lost = SloItem(0, 10 * MS, 1 * S)
    fresh = SloItem(2 * S, 100 * MS, 4 * S)
    kw = {"starvation_us": 2 * S}
    assert not slo_starved(lost, 2500 * MS, **kw)   # waited 2.5 s > 2 s
    assert slo_next([lost, fresh], [0], now_us=2500 * MS, **kw).index == 1
    assert slo_starved(lost, 3 * S, **kw)
    p = slo_next([lost, fresh], [0], now_us=3 * S, **kw)
    assert (p.index, p.reason) == (0, "starved")
    # without an SLO: its wait plus its work (the TTFT if it started now)
    assert slo_starved(SloItem(0, 10), 2 * S - 10, **kw)
    assert not slo_starved(SloItem(0, 10), 2 * S - 11, **kw)
    assert not slo_starved(lost, 10 * S)            # no timeout: never


def test_instances_free_later_count():
    # 2 instances, one free in 100 ms: the plan uses both
    q = [SloItem(0, 200 * MS, 240 * MS), SloItem(0, 200 * MS, 320 * MS),
         SloItem(0, 50 * MS, 10 * S)]
    p = slo_next(q, [0, 100 * MS], now_us=0)
    # shortest first: 50 ms on the free one, then the first urgent one
    # there (ends at 250 > 240): at risk; the urgent ones first keep all
    assert p.reason == "plan" and p.on_time == 3 and p.index == 0
    # no instance known: one free now
    assert slo_next(q, [], now_us=0).index == 0


def test_errors_and_protocol():
    assert slo_next([], [0], now_us=0) is None
    with pytest.raises(ValueError):
        slo_next([SloItem(0, 1)], [0], 0, order="lifo")
    o = ffi.new("omni_queue_opts_t *", {"order": lib.OMNI_QUEUE_SJF,
                                        "aging": 1.0, "starvation_us": 0})
    items = ffi.new("omni_slo_item_t[]", 3)
    waits = ffi.new("uint64_t[]", [0, 0])
    out = ffi.new("omni_slo_pick_t *")
    need = lib.omni_policy_slo_scratch_size(3, 2)
    scratch = ffi.new("uint64_t[]", need // 8 + 1)
    assert lib.omni_policy_slo_next(o, items, 3, waits, 2, 0, scratch, need - 1,
                                    out) == lib.OMNI_ERANGE
    assert lib.omni_policy_slo_next(o, items, 3, waits, 2, 0, scratch, need,
                                    out) == lib.OMNI_OK
    assert lib.omni_policy_slo_next(o, items, 0, waits, 2, 0, ffi.NULL, 0,
                                    out) == lib.OMNI_ENOTFOUND
    assert out.index == -1
    misaligned = ffi.cast("char *", scratch) + 4
    assert lib.omni_policy_slo_next(o, items, 3, waits, 2, 0, misaligned, need,
                                    out) == lib.OMNI_EINVAL
    assert lib.omni_policy_slo_next(o, items, 3, ffi.NULL, 2, 0, scratch, need,
                                    out) == lib.OMNI_EINVAL


# ---- Retry-After and the early 429 -----------------------------------------------


def test_retry_after_is_the_queues_expected_drain():
    # 3 s of work over two idle instances: 1.5 s each, rounded up
    assert retry_after([0, 0], 3 * S) == 2
    # one free in 1 s, one in 3 s, 1 s queued: the first takes it all by 2 s
    assert retry_after([1 * S, 3 * S], 1 * S) == 2
    # 5 s queued: both busy until 4.5 s
    assert retry_after([1 * S, 3 * S], 5 * S) == 5
    # an SLO request can afford to wait its slack: come back that much sooner
    assert retry_after([1 * S, 3 * S], 5 * S, slack_us=2 * S) == 3
    # at least 1 s, at most OMNI_POLICY_RETRY_MAX_S
    assert retry_after([0], 0) == 1
    assert retry_after([0], 0, slack_us=5 * S) == 1
    assert retry_after([0], 10**15) == lib.OMNI_POLICY_RETRY_MAX_S
    with pytest.raises(InvalidArgumentError):
        retry_after([], 1)


def test_early_429_only_when_the_queue_cannot_meet_any_slo():
    now = 10 * S
    busy = [3 * S, 4 * S]                         # both busy a while yet
    lost = [SloItem(now - 1 * S, 300 * MS, now + 1 * S),
            SloItem(now - 2 * S, 100 * MS, now)]
    req = SloItem(now, 200 * MS, now + 2 * S)     # 3 s + 0.2 > 2 s
    ra = slo_admit(req, lost, busy, now)
    # drain: 0.4 s over two instances from 3 s and 4 s: 3.4 s; it can
    # wait 1.8 s of it
    assert ra == retry_after(busy, 400 * MS, slack_us=1800 * MS) == 2
    # one queued request can still make it: admitted
    assert slo_admit(req, lost + [SloItem(now, 100 * MS, now + 5 * S)], busy,
                     now) is None
    # a queued request without an SLO: admitted
    assert slo_admit(req, lost + [SloItem(now, 100 * MS)], busy, now) is None
    # it can still make it itself
    assert slo_admit(req, lost, [1 * S, 4 * S], now) is None
    # it is too long for its SLO even on an idle instance: never refused
    # for that
    assert slo_admit(SloItem(now, 3 * S, now + 2 * S), lost, busy, now) is None
    # an empty queue and instances busy past its SLO: refused
    assert slo_admit(req, [], busy, now) == 2
    with pytest.raises(InvalidArgumentError):
        slo_admit(SloItem(now, 1), lost, busy, now)       # no deadline
    with pytest.raises(InvalidArgumentError):
        slo_admit(req, lost, [], now)


# ---- without SLOs: exactly the queue functions -----------------------------------


def _random_queue(rng, n, now):
    items = []
    for _ in range(n):
        arrival = rng.randrange(0, now + 1, 1000) if rng.random() < 0.9 \
            else rng.randrange(0, now + 1)
        items.append(QueueItem(arrival, rng.choice([0, rng.randrange(1, 5 * S)])))
    # queue order is by arrival, except clocks of other workers a little
    # behind: a few neighbours swapped
    items.sort(key=lambda x: x.arrival_us)
    for _ in range(n // 10):
        i = rng.randrange(max(n - 1, 1))
        if i + 1 < n:
            items[i], items[i + 1] = items[i + 1], items[i]
    return items


@pytest.mark.parametrize("seed", range(40))
def test_without_slos_the_release_is_the_queue_functions(seed):
    rng = random.Random(seed)
    now = rng.choice([1 * S, 5 * S, 60 * S])
    q = _random_queue(rng, rng.randrange(1, 200), now)
    order = rng.choice(["sjf", "sjf", "fcfs"])
    aging = rng.choice([0.0, 0.5, 1.0])
    starvation = rng.choice([0, 200 * MS, 2 * S])
    waits = [rng.randrange(0, 2 * S) for _ in range(rng.randrange(0, 5))]
    kw = {"order": order, "aging": aging, "starvation_us": starvation}
    want = queue_pick(q, now, **kw)
    items = [SloItem(x.arrival_us, x.work_us) for x in q]
    got = slo_next(items, waits, now, **kw)
    assert got.index == want
    assert got.reason in ("starved", "order")
    # what the module gathers (the oldest LATE_SCAN, then the least key),
    # in any order: the same entry
    scan = lib.OMNI_POLICY_LATE_SCAN
    keep = list(range(min(scan, len(q))))
    if want not in keep:
        keep.append(want)
    rng.shuffle(keep)
    sub = [SloItem(q[i].arrival_us, q[i].work_us, seq=i) for i in keep]
    assert keep[slo_next(sub, waits, now, **kw).index] == want


def _gather(queue, now, max_slo_us, key):
    """What docs/scoring.md point 9 tells the module to gather: the oldest
    LATE_SCAN, then from the newest backwards up to SLO_SCAN while within
    max_slo_us, then the least key; returns queue positions."""
    late, scan = lib.OMNI_POLICY_LATE_SCAN, lib.OMNI_POLICY_SLO_SCAN
    if len(queue) <= late + scan:
        return list(range(len(queue)))
    pos = list(range(late))
    for i in range(len(queue) - 1, len(queue) - 1 - scan, -1):
        if now - queue[i].arrival_us >= max_slo_us:
            break
        pos.append(i)
    least = min(range(len(queue)), key=lambda i: (key(queue[i]), i))
    if least not in pos:
        pos.append(least)
    return pos


@pytest.mark.parametrize("seed", range(30))
def test_what_the_module_gathers_gives_the_same_release(seed):
    """A long queue (500 entries over 10 s, a 1 s SLO, a few with their own
    of up to 2 s): the entries the module gathers give the release of the
    whole queue."""
    rng = random.Random(seed)
    now = 10 * S
    arrivals = sorted(rng.randrange(0, now) for _ in range(500))
    queue = [SloItem(a, rng.randrange(1, 600 * MS),
                     a + (rng.choice([500 * MS, 2 * S]) if rng.random() < 0.1
                          else 1 * S), seq=i)
             for i, a in enumerate(arrivals)]
    waits = [rng.randrange(0, 300 * MS) for _ in range(rng.randrange(1, 5))]
    starvation = rng.choice([0, 2 * S, 20 * S])
    whole = slo_next(queue, waits, now, starvation_us=starvation)
    pos = _gather(queue, now, 2 * S, lambda x: x.work_us + x.arrival_us)
    rng.shuffle(pos)
    part = slo_next([queue[i] for i in pos], waits, now, starvation_us=starvation)
    assert pos[part.index] == whole.index
    assert (part.reason, part.feasible, part.on_time) == \
        (whole.reason, whole.feasible, whole.on_time)


# ---- the rule as written in the header, in Python ---------------------------------


def _ref_next(items, waits, now, starvation_us, aging=1.0):
    """omni_policy_slo_next() as omni_policy.h states it (SJF keys), written
    plainly: a full re-plan at every step."""
    import heapq
    inf = float("inf")
    n = len(items)
    seq = [it.seq for it in items]
    dl = [it.deadline_us or inf for it in items]
    work = [it.work_us for it in items]

    def key(i):
        return (work[i] + aging * items[i].arrival_us, seq[i])

    # starved: waited since its deadline past the timeout, or without one
    # (or before it) waited + work; of the starved among the oldest
    # OMNI_POLICY_LATE_SCAN, the oldest goes first, unless the least key's
    # work is at most OMNI_POLICY_SHORT_PCT % of the timeout and the oldest
    # starved one's wait plus work is under the bound (here the timeout)
    # plus OMNI_POLICY_SHORT_LATE_PCT % of it: then the rules below choose
    head = min(range(n), key=key)
    for i in sorted(range(n), key=lambda i: seq[i])[:lib.OMNI_POLICY_LATE_SCAN]:
        it = items[i]
        if it.deadline_us > it.arrival_us:
            ttft = max(0, now - it.deadline_us)
        else:
            ttft = max(0, now - it.arrival_us) + it.work_us
        if starvation_us and ttft >= starvation_us:
            short = 0 < work[head] <= starvation_us // 100 * lib.OMNI_POLICY_SHORT_PCT
            late = max(0, now - it.arrival_us) + it.work_us
            if not (short and late < starvation_us + starvation_us // 100
                    * lib.OMNI_POLICY_SHORT_LATE_PCT):
                return i, "starved"
            break
    free = sorted(now + w for w in waits) or [now]

    def plan(order):
        h = list(free)
        for pos, i in enumerate(order):
            t = heapq.heappop(h) + work[i]
            if t > dl[i]:
                return pos
            heapq.heappush(h, t)
        return -1

    korder = sorted(range(n), key=key)
    feas = [i for i in korder if free[0] + work[i] <= dl[i]]
    if not feas:
        return korder[0], "lost"
    if plan(feas) < 0:
        return feas[0], "order"
    kept = []
    for j in sorted(feas, key=lambda i: (dl[i],) + key(i)):
        kept.append(j)
        miss = plan(kept)
        while miss >= 0:
            longest = max(range(miss + 1), key=lambda p: (work[kept[p]], p))
            del kept[longest]
            miss = plan(kept)
    for c in sorted(kept, key=key)[:lib.OMNI_POLICY_SLO_TRY]:
        if plan([c] + [x for x in kept if x != c]) < 0:
            return c, "plan"
    return kept[0], "plan"


@pytest.mark.parametrize("seed", range(300))
def test_the_c_rule_is_the_rule_as_written(seed):
    rng = random.Random(seed)
    now = rng.randrange(3 * S, 10 * S)
    items = []
    for k in range(rng.randrange(1, 40)):
        arrival = now - rng.randrange(0, 3 * S)
        deadline = 0 if rng.random() < 0.2 else arrival + rng.choice(
            [200 * MS, 1 * S, 2 * S, rng.randrange(1, 4 * S)])
        items.append(SloItem(arrival, rng.randrange(1, 800 * MS), deadline,
                             seq=rng.randrange(10**6) * 64 + k))
    waits = [rng.choice([0, rng.randrange(0, 1 * S)])
             for _ in range(rng.randrange(0, 7))]
    starvation = rng.choice([0, 0, 500 * MS, 2 * S])
    p = slo_next(items, waits, now, starvation_us=starvation)
    assert (p.index, p.reason) == _ref_next(items, waits, now, starvation)


# ---- goodput: a simulation of the prefill queue ----------------------------------


def _workload(rng, n, instances, load, slo_us):
    """n requests arriving as a Poisson process at `load` times what the
    instances can serve; prefill work log-normal (median 150 ms, a long
    tail, at most 4 s); a TTFT SLO of slo_us, a fifth of them with their
    own (a header) of half or three times it."""
    works = [min(int(rng.lognormvariate(0, 1.0) * 150 * MS) + 1, 4 * S)
             for _ in range(n)]
    rate = load * instances / (sum(works) / n)
    t, reqs = 0.0, []
    for w in works:
        t += rng.expovariate(rate)
        slo = slo_us
        if rng.random() < 0.2:
            slo = rng.choice([slo_us // 2, 3 * slo_us])
        reqs.append((int(t), w, int(t) + slo))
    return reqs


def _simulate(reqs, instances, policy, starvation_us):
    """Each instance prefills one request at a time, taking exactly its
    work; whenever one is free and requests wait, the policy picks one.
    Returns each request's TTFT (its prefill's end minus its arrival)."""
    free = [0] * instances
    queue, ttft, i, now = [], {}, 0, 0
    while i < len(reqs) or queue:
        while i < len(reqs) and reqs[i][0] <= now:
            queue.append(i)
            i += 1
        while queue and min(free) <= now:
            if policy == "sjf":
                k = queue_pick([QueueItem(reqs[j][0], reqs[j][1]) for j in queue],
                               now, starvation_us=starvation_us)
            else:
                items = [SloItem(reqs[j][0], reqs[j][1], reqs[j][2], seq=j)
                         for j in queue]
                k = slo_next(items, [max(f - now, 0) for f in free], now,
                             starvation_us=starvation_us).index
            j = queue.pop(k)
            inst = free.index(min(free))
            free[inst] = now + reqs[j][1]
            ttft[j] = free[inst] - reqs[j][0]
        events = [reqs[i][0]] if i < len(reqs) else []
        if queue:
            events.append(min(free))
        if not events:
            break
        now = max(min(events), now)
    return ttft


def _goodput(reqs, ttft):
    return sum(ttft[j] <= reqs[j][2] - reqs[j][0] for j in range(len(reqs)))


CASES = [(seed, inst, load) for seed in range(6) for inst in (1, 3)
         for load in (0.5, 0.9, 1.3)]


@pytest.mark.parametrize("seed,instances,load", CASES)
def test_slo_release_goodput_is_never_below_shortest_first(seed, instances, load):
    rng = random.Random(1000 * seed + 10 * instances + int(10 * load))
    reqs = _workload(rng, 150, instances, load, slo_us=1 * S)
    sjf = _goodput(reqs, _simulate(reqs, instances, "sjf", 2 * S))
    slo = _goodput(reqs, _simulate(reqs, instances, "slo", 2 * S))
    assert slo >= sjf, (sjf, slo)
    if load > 1:
        # overloaded: serving the lost ones after those that can still
        # make it is worth many requests
        assert slo > sjf, (sjf, slo)


def test_no_slo_simulation_is_the_same_schedule():
    rng = random.Random(7)
    reqs = [(a, w, 0) for a, w, _ in _workload(rng, 120, 2, 1.2, 1 * S)]
    assert _simulate(reqs, 2, "sjf", 2 * S) == _simulate(reqs, 2, "slo", 2 * S)


# ---- TPOT: decode placement ------------------------------------------------------


def test_decode_placement_meets_the_tpot_target_when_it_can():
    insts = [DecodeInstance(0, running=2, load_tokens=1000),
             DecodeInstance(1, running=4, load_tokens=3000),
             DecodeInstance(2, running=1, load_tokens=500, max_running=1)]
    job = DecodeJob(500, 200)
    # least loaded within limits: 0 (2 is full)
    assert place_decode(insts, job).choice == 0
    # instance 0 is slow (a step of 60 ms with this job), 1 meets 50 ms
    steps = [60 * MS, 40 * MS, 10 * MS]
    assert place_decode_tpot(insts, job, steps, 50 * MS).choice == 1
    # no target, or none meets it: least loaded, as without
    assert place_decode_tpot(insts, job, steps, 0).choice == 0
    assert place_decode_tpot(insts, job, steps, 30 * MS).choice == 0
    # a full instance is not taken for its speed
    insts[0].max_running = 2
    insts[1].max_running = 4
    assert place_decode_tpot(insts, job, steps, 50 * MS).hold
    with pytest.raises(ValueError):
        place_decode_tpot(insts, job, steps[:2], 50 * MS)
    d = ffi.new("omni_decode_inst_t[]", 1)
    j = ffi.new("omni_decode_job_t *")
    out = ffi.new("omni_decision_t *")
    assert lib.omni_policy_decode_place_tpot(d, 1, j, ffi.NULL, 5,
                                             out) == lib.OMNI_EINVAL


# ---- placement with a deadline ---------------------------------------------------


def test_placement_keeps_the_request_on_time_before_weighing_the_others():
    """Instance 0 holds most of the prompt but is busy ~500 ms; instance 1
    is free and would recompute it all (~400 ms).  With 5 waiting, what a
    long prefill costs the others makes instance 0 the cheaper choice (the
    request waits for it).  With a deadline 450 ms away only instance 1
    finishes it in time: it goes there now.  When neither can, the choice
    is the same as without a deadline."""
    pred = Predictor(2, prefill_prior=(2000, 100_000, 0))
    now = 1_000_000
    pred.dispatch_prefill(0, 4980, 0, now_us=now)
    kw = dict(prompt_tokens=4000, now_us=now, hold_slack_us=20_000, waiting=5,
              force=True)

    def cands():
        return [PrefillCandidate(0, max_running=16), PrefillCandidate(1, max_running=16)]

    c = cands()
    d = decide_prefill(pred, c, [200, 0], 16, **kw)
    assert d.hold and d.best == 0
    c = cands()
    d = decide_prefill(pred, c, [200, 0], 16, deadline_us=now + 450_000, **kw)
    assert d.choice == 1 and c[0].draining
    own = [x.wait_us + pred.prefill_us(i, 4000 - x.cached_tokens, x.cached_tokens)
           for i, x in enumerate(c)]
    assert own[0] > 450_000 >= own[1]
    # nobody in time: as without a deadline
    d = decide_prefill(pred, cands(), [200, 0], 16, deadline_us=now + 100_000, **kw)
    assert d.hold and d.best == 0
    # the one in time is over its request limit: as without a deadline
    c = cands()
    c[1].running = c[1].max_running = 1
    d = decide_prefill(pred, c, [200, 0], 16, deadline_us=now + 450_000, **kw)
    assert d.hold and d.best == 0
