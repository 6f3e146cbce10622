/*
 * Omni Proxy scoring library: scheduling policies (see omni_policy.h).
 */

#include <stdlib.h>
#include <string.h>

#include "omni_policy.h"


/* ---- prefill ------------------------------------------------------------- */

static inline uint32_t
omni_policy_new_tokens(uint32_t prompt_tokens, uint32_t cached_tokens)
{
    if (cached_tokens >= prompt_tokens) {
        return prompt_tokens ? 1 : 0;
    }

    return prompt_tokens - cached_tokens;
}


/*
 * Parallel P/D: a prefill's answer comes its KV transfer after the engine's
 * end, so the proxy hears an end up to a transfer late, and a model that
 * predicts the engine's work a few percent long (its samples are answers
 * less a learned transfer) kept the instance busy until each answer while
 * the next request waited: the engines idled 14-20 s a run through such
 * transfers on the Mooncake trace (docs/scheduler.md, "Parallel P/D:
 * counted free a transfer early").  Sent that much early instead, a request
 * waits in the engine for at most that long, which costs the engine
 * nothing.  So the instance counts as free the last job's predicted
 * transfer (at least an eighth of the work's latency: a transfer learned
 * short idled the engines too) before its predicted end; 0 without a
 * transfer (sequential P/D: the answer is the end).
 */
static uint64_t
omni_policy_early(const omni_predict_t *p, uint32_t inst)
{
    int64_t  us = omni_predict_transfer_us(p, inst);

    return us > 0 ? (uint64_t) us : 0;
}


int
omni_policy_prefill_prepare(const omni_predict_t *p,
    const uint32_t *cached_blocks, size_t n_cached, uint32_t block_size,
    uint32_t prompt_tokens, uint64_t now_us, omni_prefill_cand_t *c,
    size_t n)
{
    uint64_t  cached, early;
    uint32_t  n_new;
    int64_t   wait, us;
    size_t    i;

    if (p == NULL || (n > 0 && c == NULL)
        || (n_cached > 0 && cached_blocks == NULL))
    {
        return OMNI_EINVAL;
    }

    for (i = 0; i < n; i++) {
        cached = 0;
        if (cached_blocks != NULL && c[i].inst < n_cached) {
            cached = (uint64_t) cached_blocks[c[i].inst] * block_size;
        }
        if (cached > prompt_tokens) {
            cached = prompt_tokens;
        }

        n_new = omni_policy_new_tokens(prompt_tokens, (uint32_t) cached);

        wait = omni_predict_wait_us(p, c[i].inst, now_us);
        us = omni_predict_prefill_us(p, c[i].inst, n_new,
                                     prompt_tokens - n_new);
        if (wait < 0 || us < 0) {
            return OMNI_EINVAL;
        }

        /* parallel P/D: free a transfer before its predicted end */
        early = omni_policy_early(p, c[i].inst);
        wait = (uint64_t) wait > early ? (int64_t) ((uint64_t) wait - early)
                                       : 0;

        c[i].cached_tokens = (uint32_t) cached;
        c[i].wait_us = (uint64_t) wait;
        c[i].prefill_us = (uint64_t) us;
    }

    return OMNI_OK;
}


/* a is a better prefill choice than b at equal or compared cost */
static inline int
omni_policy_prefill_better(const omni_prefill_cand_t *a, uint64_t ca,
    const omni_prefill_cand_t *b, uint64_t cb)
{
    if (ca != cb) {
        return ca < cb;
    }
    if (a->running != b->running) {
        return a->running < b->running;
    }
    if (a->inflight_tokens != b->inflight_tokens) {
        return a->inflight_tokens < b->inflight_tokens;
    }

    return a->cached_tokens > b->cached_tokens;
}


int
omni_policy_prefill_choose(const omni_prefill_cand_t *c, size_t n,
    uint32_t prompt_tokens, uint64_t hold_slack_us, omni_decision_t *out)
{
    const omni_prefill_cand_t  *ci;
    uint64_t                    cost, best_cost = 0;
    uint32_t                    n_new;
    size_t                      i;
    int32_t                     best = -1;

    if (out == NULL || (n > 0 && c == NULL) || n > INT32_MAX) {
        return OMNI_EINVAL;
    }

    memset(out, 0, sizeof(*out));
    out->choice = -1;
    out->best = -1;

    for (i = 0; i < n; i++) {
        ci = &c[i];

        if (ci->flags & (OMNI_POLICY_UNHEALTHY | OMNI_POLICY_DRAINING)) {
            out->skipped++;
            continue;
        }

        n_new = omni_policy_new_tokens(prompt_tokens, ci->cached_tokens);

        if ((ci->max_running && ci->running >= ci->max_running)
            || (ci->max_tokens && ci->running > 0
                && ci->inflight_tokens + n_new > ci->max_tokens))
        {
            out->skipped++;
            continue;
        }

        cost = ci->wait_us + ci->prefill_us;
        if (best < 0 || omni_policy_prefill_better(ci, cost, &c[best],
                                                   best_cost))
        {
            best = (int32_t) i;
            best_cost = cost;
        }
    }

    out->best = best;

    if (best < 0) {
        out->reason = n == 0 ? OMNI_POLICY_HOLD_NONE : OMNI_POLICY_HOLD_LIMITS;
        return OMNI_EHOLD;
    }

    out->cost_us = best_cost;

    if (c[best].wait_us > hold_slack_us
        && !(c[best].flags & OMNI_POLICY_JOINS))
    {
        out->reason = OMNI_POLICY_HOLD_BUSY;
        out->retry_us = c[best].wait_us - hold_slack_us;
        return OMNI_EHOLD;
    }

    out->choice = best;
    out->reason = OMNI_POLICY_CHOSEN;

    return OMNI_OK;
}


int
omni_policy_prefill_add_delay(omni_prefill_cand_t *c, size_t n,
    uint32_t waiting, double arrival_gap_us)
{
    double  others, t;
    size_t  i;

    if ((n > 0 && c == NULL) || !(arrival_gap_us >= 0)) {
        return OMNI_EINVAL;
    }

    for (i = 0; i < n; i++) {
        t = (double) c[i].prefill_us;
        others = waiting > 1 ? (double) (waiting - 1) : 0;

        /* under a backlog, those arriving meanwhile queue behind the ones
         * waiting: whichever count is larger */
        if (arrival_gap_us > 0 && t / (2 * arrival_gap_us) > others) {
            others = t / (2 * arrival_gap_us);
        }

        t += t * others / (double) n;
        c[i].prefill_us = t < (double) UINT64_MAX / 2 ? (uint64_t) t
                                                      : UINT64_MAX / 2;
    }

    return OMNI_OK;
}


/*
 * The engine computes the prefill work in flight on an instance in steps of
 * at most step_tokens; the last one computes what is left (those tokens
 * modulo the budget).  A request that reaches the engine while that last
 * step runs starts in the step after it, where otherwise the instance idles
 * while the answer comes back and the proxy binds the next one (the
 * handover).  Sent before that step begins, it would share it and stretch
 * it.  So the last step must outlast the slack (how early the request is
 * sent) plus the error of the predicted end (the slack again, and 1/32 of
 * the service predicted for the last prefill bound there), and the work
 * must not have overrun its predicted end.  Whether so (then the predicted
 * wait stands: that end); if not, the budget keeps the instance busy until
 * its tokens come back.
 */
static int
omni_policy_last_step_open(const omni_predict_t *p,
    const omni_prefill_cand_t *c, uint64_t now_us, uint64_t slack,
    uint32_t step_tokens)
{
    int64_t   end, us;
    uint64_t  last;

    if (step_tokens == 0 || c->inflight_tokens == 0) {
        return 0;
    }

    end = omni_predict_end_us(p, c->inst);
    if (end <= 0
        || (uint64_t) end <= now_us + omni_policy_early(p, c->inst))
    {
        return 0;
    }

    last = c->inflight_tokens % step_tokens;
    if (last == 0) {
        last = step_tokens;
    }

    /* its cost without the context it attends to: rather short than long */
    us = omni_predict_prefill_us(p, c->inst, (uint32_t) last, 0);
    return us >= 0 && (uint64_t) us >= 2 * slack + c->step_service_us / 32;
}


/*
 * The work in flight is predicted done, and its answer is still more than
 * the slack away: a KV transfer (parallel P/D), which the engine overlaps
 * with its next work.  The engine is free, though the tokens come back only
 * with the answer; counted busy until then, it idled through every transfer
 * while the next request waited at the proxy (docs/scheduler.md, "Parallel
 * P/D: the transfer counted busy").  Not when the answer too is late: then
 * the work has overrun.  This is not an early binding: a starved request
 * may take it too.
 */
static int
omni_policy_transferring(const omni_predict_t *p,
    const omni_prefill_cand_t *c, uint64_t now_us, uint64_t slack)
{
    int64_t  end, ans;

    end = omni_predict_end_us(p, c->inst);
    if (end <= 0
        || (uint64_t) end > now_us + omni_policy_early(p, c->inst))
    {
        return 0;
    }

    ans = omni_predict_answer_us(p, c->inst);
    return ans > 0 && (uint64_t) ans > now_us + slack;
}


/* the sooner of two delays, 0 meaning none */
static inline uint64_t
omni_policy_sooner(uint64_t a, uint64_t b)
{
    return a == 0 || (b != 0 && b < a) ? b : a;
}


/*
 * Engines batch in steps, and a request sent while one waits at the engine
 * for its step shares it.  When that step starts within the slack, the
 * budget has room for this request's tokens, and they add to it no more
 * than the plain slack nor more than the step's own work so far (a long
 * prompt does not ride on a short one's step: the step rule below), the
 * instance takes the request now: its first token comes at that step's end
 * (wait_us: the work sent before, prefill_us: its own tokens without the
 * step's fixed cost, which is also all it costs the others).  Held until
 * that work was done, short prompts ran one or two a step and the engine's
 * batching went unused: 300-token prompts at 150/s on two instances had a
 * 2.0 s mean TTFT, 0.3-0.4 s once they join (docs/scheduler.md, "Short
 * prompts share a step").
 */
static void
omni_policy_prefill_joins(const omni_predict_t *p, omni_prefill_cand_t *c,
    size_t n, uint32_t prompt_tokens, uint64_t now_us, uint64_t slack,
    uint64_t max_cost_us, uint32_t step_tokens)
{
    uint64_t  start, cost;
    uint32_t  n_new;
    size_t    i;

    for (i = 0; i < n; i++) {
        if (c[i].flags & (OMNI_POLICY_UNHEALTHY | OMNI_POLICY_DRAINING)) {
            continue;
        }

        /* prefill_us: prepare()'s, this prompt alone there */
        n_new = omni_policy_new_tokens(prompt_tokens, c[i].cached_tokens);
        if (omni_predict_join(p, c[i].inst, n_new, c[i].prefill_us,
                              step_tokens, now_us, &start, &cost) == 1
            && start <= slack && cost <= max_cost_us
            && start < c[i].wait_us && cost <= c[i].wait_us - start)
        {
            c[i].flags |= OMNI_POLICY_JOINS;
            c[i].prefill_us = cost;
        }
    }
}


/*
 * Engines batch in steps: what reaches an instance while a step runs waits
 * for the next one, and everything waiting then shares it.  A request that
 * waits there for the next step (or for its first one, just sent) and has
 * less work than this one would finish with this one's first chunk, up to a
 * whole step late, and so would have been mispredicted.  This one waits
 * until that one is done (the slack at most; the engine's next step has
 * it), unless it joins that step (omni_policy_prefill_joins: its tokens
 * add little to it).  And an instance whose batch budget this request does
 * not fit now is not out of the question: it is busy, and may be worth
 * waiting for (it may hold the prompt's prefix, being computed by the
 * request in flight).
 */
static void
omni_policy_prefill_busy(const omni_predict_t *p, omni_prefill_cand_t *c,
    size_t n, uint32_t prompt_tokens, uint64_t now_us, uint64_t slack,
    uint64_t limit, uint32_t step_tokens, uint64_t *next_us)
{
    uint64_t  uncached, wait, next;
    size_t    i;

    /* limit: the wait choose() accepts (the slack plus the request's own
     * front-end time).  next: how soon one of these waits may come within
     * it by the clock alone, with no completion or other event */

    next = 0;

    for (i = 0; i < n; i++) {
        if (c[i].wait_us == 0 || c[i].wait_us > limit
            || (c[i].flags & OMNI_POLICY_JOINS))
        {
            continue;
        }

        /* (slack < UINT64_MAX / 2: checked by the caller) */
        if (now_us < c[i].step_start_us + slack
            && now_us < c[i].step_done_us
            && c[i].prefill_us > c[i].step_service_us)
        {
            wait = c[i].step_done_us - now_us;
            c[i].wait_us = (c[i].wait_us > wait ? c[i].wait_us : wait)
                           + slack;
            next = omni_policy_sooner(next,
                                      c[i].step_start_us + slack - now_us);
        }
    }

    for (i = 0; i < n; i++) {
        uncached = prompt_tokens > c[i].cached_tokens
                   ? prompt_tokens - c[i].cached_tokens : 1;

        if (c[i].inflight_tokens && c[i].max_tokens
            && c[i].inflight_tokens + uncached > c[i].max_tokens
            && c[i].wait_us <= limit)
        {
            if (!omni_policy_last_step_open(p, &c[i], now_us, slack,
                                            step_tokens)
                && !omni_policy_transferring(p, &c[i], now_us, slack))
            {
                /* busy until its tokens come back: an event, not the clock */
                c[i].wait_us = limit + 1;
                c[i].flags &= ~OMNI_POLICY_JOINS;
            }

        } else if (c[i].wait_us > limit
                   && !(c[i].flags
                        & (OMNI_POLICY_UNHEALTHY | OMNI_POLICY_DRAINING
                           | OMNI_POLICY_JOINS)))
        {
            next = omni_policy_sooner(next, c[i].wait_us - limit);
        }

        c[i].max_tokens = OMNI_POLICY_UNLIMITED;
    }

    *next_us = next;
}


/*
 * An SLO: an instance where the request would finish past its deadline is
 * out of the question when another one, within its limits, would finish it
 * in time (waiting for it if need be).  When none would, nothing changes:
 * it is late anyway, and the cost rule limits the harm to the others.
 */
static void
omni_policy_prefill_on_time(omni_prefill_cand_t *c, size_t n,
    uint64_t now_us, uint64_t deadline_us)
{
    size_t  i;
    int     any;

    for (any = 0, i = 0; i < n && !any; i++) {
        any = (c[i].flags & ~OMNI_POLICY_JOINS) == 0
              && (c[i].max_running == 0 || c[i].running < c[i].max_running)
              && now_us + c[i].wait_us + c[i].prefill_us <= deadline_us;
    }

    for (i = 0; any && i < n; i++) {
        if (now_us + c[i].wait_us + c[i].prefill_us > deadline_us) {
            c[i].flags |= OMNI_POLICY_DRAINING;
        }
    }
}


/*
 * decide(), its best instance busy past the slack: the best of those free
 * within it (the busy ones flagged out of the choice), keeping out's retry
 * instant; when none can take it, held for `best` (-1: out's best).
 */
static int
omni_policy_prefill_take_free(omni_prefill_cand_t *c, size_t n,
    uint32_t prompt_tokens, uint64_t slack, int32_t best, omni_decision_t *out)
{
    int       rc;
    size_t    i;
    uint64_t  retry;

    if (best < 0) {
        best = out->best;
    }

    for (i = 0; i < n; i++) {
        if (c[i].wait_us > slack && !(c[i].flags & OMNI_POLICY_JOINS)) {
            c[i].flags |= OMNI_POLICY_DRAINING;
        }
    }

    retry = out->retry_us;

    rc = omni_policy_prefill_choose(c, n, prompt_tokens, UINT64_MAX, out);

    out->retry_us = retry;

    if (rc == OMNI_EHOLD) {
        out->best = best;
        out->reason = OMNI_POLICY_HOLD_BUSY;
    }

    return rc;
}


int
omni_policy_prefill_decide(const omni_predict_t *p,
    const uint32_t *matched, size_t n_matched, uint32_t block_size,
    uint32_t prompt_tokens, uint64_t now_us, const omni_prefill_opts_t *o,
    omni_prefill_cand_t *c, size_t n, omni_decision_t *out)
{
    uint64_t  slack, next;
    int32_t   best, own;
    size_t    i;
    int       rc, room;

    if (o == NULL || out == NULL || o->hold_slack_us >= UINT64_MAX / 4
        || o->front_us >= UINT64_MAX / 4)
    {
        return OMNI_EINVAL;
    }

    memset(out, 0, sizeof(*out));
    out->choice = -1;
    out->best = -1;

    rc = omni_policy_prefill_prepare(p, matched, n_matched, block_size,
                                     prompt_tokens, now_us, c, n);
    if (rc != OMNI_OK) {
        return rc;
    }

    /*
     * How early it may go: the slack, plus the engine's own work on it
     * before it can start (a text prompt's tokenization), which then runs
     * while the instance finishes what it has instead of after.  The step
     * rule keeps the plain slack: sent front_us earlier, it still reaches
     * the engine's scheduler after that step began.
     */
    slack = o->hold_slack_us + o->front_us;

    if (o->step_tokens) {
        omni_policy_prefill_joins(p, c, n, prompt_tokens, now_us, slack,
                                  o->hold_slack_us, o->step_tokens);
    }

    room = 0;

    for (i = 0; i < n && !room; i++) {
        room = (c[i].flags & ~OMNI_POLICY_JOINS) == 0
               && (c[i].max_running == 0 || c[i].running < c[i].max_running)
               && (c[i].max_tokens == 0
                   || c[i].inflight_tokens < c[i].max_tokens)
               && (c[i].wait_us <= slack || (c[i].flags & OMNI_POLICY_JOINS));
    }

    omni_policy_prefill_busy(p, c, n, prompt_tokens, now_us,
                             o->hold_slack_us, slack,
                             o->starved ? 0 : o->step_tokens, &next);

    if (o->deadline_us) {
        omni_policy_prefill_on_time(c, n, now_us, o->deadline_us);
    }

    /*
     * The cost of a choice: its own TTFT and what it takes from the others.
     * A starved request goes ahead of the others whatever it costs them: its
     * own TTFT alone.  Weighed, that cost (multiplied by the queue) turned
     * the instances' differences in learned rate, a few percent for a long
     * prompt between engines that are alike, into seconds: the starved
     * request held for the busy instance predicted faster while the free
     * ones went to shorter requests, 3-5 s past its bound on a model with
     * jittered steps (docs/scheduler.md, "A starved request's own TTFT").
     */

    /*
     * Whether its own first token is predicted soonest on an instance free
     * now, before what the choice costs the others is added.
     */
    own = omni_policy_prefill_choose(c, n, prompt_tokens, slack, out)
          == OMNI_OK ? out->choice : -1;

    rc = omni_policy_prefill_add_delay(c, n, o->starved ? 1 : o->waiting,
                                       o->starved ? 0 : o->arrival_gap_us);
    if (rc != OMNI_OK) {
        return rc;
    }

    rc = omni_policy_prefill_choose(c, n, prompt_tokens, slack, out);

    if (rc != OMNI_EHOLD || out->reason != OMNI_POLICY_HOLD_BUSY) {
        return rc;
    }

    /*
     * Decide again when any instance comes within the slack, not only its
     * best: held until then, the free one went to a request that arrived
     * meanwhile and decided afresh while those held kept their decisions
     * (a 61k-token prompt took an instance for 4 s at its arrival, five
     * shorter ones waiting; docs/scheduler.md, "Held for noise").
     */
    out->retry_us = omni_policy_sooner(out->retry_us, next);

    /*
     * A request holds for a busy instance that holds no more of its prompt
     * than the best free one only when that also brings its own first
     * token sooner (a faster engine).  What it would take from the others
     * then differs between instances alike only by their learned rates, a
     * few percent of noise multiplied by the queue: requests held for an
     * instance predicted a little faster while the free one went to a
     * request far behind them in the order (a 61k-token prompt took it for
     * 4 s on the Mooncake run, with five shorter ones waiting;
     * docs/scheduler.md, "Held for noise").  A cached prefix is the
     * others' gain too: the work it saves counts as the queue's, even when
     * the request itself would start sooner recomputing it elsewhere
     * (without this, in three section-1 runs of seven a few 30k-token
     * prompts of a shared prefix went to a free instance and recomputed
     * it, and the mean TTFT rose about 10%).
     */
    if (own >= 0 && out->best >= 0
        && c[out->best].cached_tokens <= c[own].cached_tokens)
    {
        return omni_policy_prefill_take_free(c, n, prompt_tokens, slack, -1,
                                             out);
    }

    /*
     * Its best instance is busy a while yet.  The caller first offers the
     * free instances to the requests behind this one; if none of them wants
     * one either (`force`), the request takes the best free one: an
     * instance never idles while requests wait.  Only when none is free
     * soon is the request held for its best one.
     */

    if (!room) {
        out->reason = OMNI_POLICY_HOLD_FULL;
        return OMNI_EHOLD;
    }

    if (!o->force) {
        return OMNI_EHOLD;
    }

    best = out->best;

    if (best >= 0 && (uint64_t) c[best].cached_tokens * 2 >= prompt_tokens) {
        /* most of its prompt is (or is being) computed there: taking a
         * free instance would redo it; it waits for that one */
        return OMNI_EHOLD;
    }

    return omni_policy_prefill_take_free(c, n, prompt_tokens, slack, best,
                                         out);
}


/* ---- decode -------------------------------------------------------------- */

static inline uint64_t
omni_policy_work(const omni_decode_job_t *j)
{
    return (uint64_t) j->prompt_tokens + j->output_tokens;
}


/* decode_place(), among the instances whose step_us meets tpot_us when
 * step_us is not NULL */
static int
omni_policy_decode_among(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, const uint64_t *step_us, uint64_t tpot_us,
    omni_decision_t *out)
{
    const omni_decode_inst_t  *di;
    uint64_t                   work;
    size_t                     i;
    int32_t                    best = -1;

    if (out == NULL || job == NULL || (n > 0 && d == NULL) || n > INT32_MAX) {
        return OMNI_EINVAL;
    }

    memset(out, 0, sizeof(*out));
    out->choice = -1;
    out->best = -1;

    work = omni_policy_work(job);

    for (i = 0; i < n; i++) {
        di = &d[i];

        if ((di->flags & (OMNI_POLICY_UNHEALTHY | OMNI_POLICY_DRAINING))
            || (di->max_running && di->running >= di->max_running)
            || (di->max_tokens && di->running > 0
                && di->load_tokens + work > di->max_tokens))
        {
            out->skipped++;
            continue;
        }

        if (step_us != NULL && step_us[i] > tpot_us) {
            continue;
        }

        if (best < 0 || di->load_tokens < d[best].load_tokens
            || (di->load_tokens == d[best].load_tokens
                && di->running < d[best].running))
        {
            best = (int32_t) i;
        }
    }

    out->best = best;

    if (best < 0) {
        out->reason = n == 0 ? OMNI_POLICY_HOLD_NONE : OMNI_POLICY_HOLD_LIMITS;
        return OMNI_EHOLD;
    }

    out->choice = best;
    out->cost_us = d[best].load_tokens;    /* a load, in tokens */
    out->reason = OMNI_POLICY_CHOSEN;

    return OMNI_OK;
}


int
omni_policy_decode_place(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, omni_decision_t *out)
{
    return omni_policy_decode_among(d, n, job, NULL, 0, out);
}


int
omni_policy_decode_place_tpot(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, const uint64_t *step_us, uint64_t tpot_us,
    omni_decision_t *out)
{
    int  rc;

    if (tpot_us == 0) {
        return omni_policy_decode_among(d, n, job, NULL, 0, out);
    }

    if (n > 0 && step_us == NULL) {
        return OMNI_EINVAL;
    }

    rc = omni_policy_decode_among(d, n, job, step_us, tpot_us, out);

    if (rc == OMNI_EHOLD) {
        /* none meets the target (or none is within its limits) */
        rc = omni_policy_decode_among(d, n, job, NULL, 0, out);
    }

    return rc;
}


/* ---- queues -------------------------------------------------------------- */

int
omni_policy_queue_work(const omni_predict_t *p, const uint32_t *matched,
    size_t n_matched, uint32_t block_size, const uint32_t *inst, size_t n,
    uint32_t prompt_tokens, uint64_t *work_us, uint64_t *starve_us)
{
    uint64_t  cached;
    uint32_t  best, at;
    int64_t   us;
    size_t    i;

    if (p == NULL || work_us == NULL || (n > 0 && inst == NULL)
        || (n_matched > 0 && matched == NULL))
    {
        return OMNI_EINVAL;
    }

    best = prompt_tokens;
    at = n ? inst[0] : 0;

    for (i = 0; matched != NULL && i < n; i++) {
        if (inst[i] >= n_matched) {
            continue;
        }

        /* the engine recomputes the last token of a fully cached prompt */
        cached = (uint64_t) matched[inst[i]] * block_size;
        if (cached >= prompt_tokens) {
            cached = prompt_tokens ? prompt_tokens - 1 : 0;
        }

        if (prompt_tokens - cached < best) {
            best = prompt_tokens - (uint32_t) cached;
            at = inst[i];
        }
    }

    /* an instance the predictor does not know: no work known */
    us = omni_predict_prefill_us(p, at, best, prompt_tokens - best);
    *work_us = us > 0 ? (uint64_t) us : 0;

    if (starve_us != NULL) {
        *starve_us = omni_predict_prefill_samples(p, at)
                     >= OMNI_POLICY_STARVE_SAMPLES ? *work_us : 0;
    }

    return OMNI_OK;
}


static int
omni_policy_queue_check(const omni_queue_opts_t *o)
{
    if (o == NULL
        || (o->order != OMNI_QUEUE_FCFS && o->order != OMNI_QUEUE_SJF
            && o->order != OMNI_QUEUE_LPT)
        || !(o->aging >= 0) || o->aging > 1e12)
    {
        return OMNI_EINVAL;
    }

    return OMNI_OK;
}


double
omni_policy_queue_key(const omni_queue_opts_t *o, uint64_t arrival_us,
    uint64_t work)
{
    switch (o->order) {

    case OMNI_QUEUE_SJF:
        return (double) work + omni_policy_queue_aging(o) * (double) arrival_us;

    case OMNI_QUEUE_LPT:
        return -(double) work;

    default:
        return (double) arrival_us;
    }
}


double
omni_policy_queue_aging(const omni_queue_opts_t *o)
{
    uint64_t  b;

    /*
     * The aging forgives `aging` of work per unit waited, so that a long
     * prompt is not passed over for ever; the bound does that too.  With
     * the bound at the timeout, a wait of the timeout is worth aging x the
     * timeout of work.  When the bound follows a backlog many times the
     * timeout, every request waits several timeouts, and at a fixed aging
     * the waits outweighed any difference in work: the order was first
     * come first served again (on the clairvoyant model, the heaviest
     * slices of the Mooncake trace kept 1.8-2.2x the SJF bound's mean).
     * Scaled by timeout / bound, a wait of the bound is worth what a wait
     * of the timeout was: the mean fell to 1.3-1.7x there, the p99 rose
     * 4-8% (docs/scheduler.md, "Wave 11").
     */
    if (o->order != OMNI_QUEUE_SJF) {
        return o->aging;
    }

    b = omni_policy_starvation_bound(o);

    if (b <= o->starvation_us) {
        return o->aging;
    }

    return o->aging * (double) o->starvation_us / (double) b;
}


int
omni_policy_queue_rekey(const omni_queue_opts_t *keyed,
    const omni_queue_opts_t *now)
{
    double  a, b;

    a = omni_policy_queue_aging(keyed);
    b = omni_policy_queue_aging(now);

    return a > b ? (a - b) * OMNI_POLICY_AGING_SLACK > a
                 : (b - a) * OMNI_POLICY_AGING_SLACK > b;
}


static inline uint64_t
omni_policy_waited(uint64_t now, uint64_t arrival)
{
    /* clocks of different processes: one may be a little behind */
    return now > arrival ? now - arrival : 0;
}


uint64_t
omni_policy_starvation_bound(const omni_queue_opts_t *o)
{
    uint64_t  b;

    if (o->starvation_us == 0) {
        return 0;
    }

    /*
     * Under a backlog deeper than the timeout no order gives every request
     * the timeout, and with the timeout alone every request became starved:
     * the order turned first come first served and the mean went to the
     * FCFS bound's (2-3x the SJF bound's on the heavier slices of the
     * Mooncake trace).  A bound a little above the time the instances take
     * to drain what waits keeps shortest first while it drains, and a
     * request still starts within about that time; on the clairvoyant model
     * the mean fell 10-30% on those slices with the p99 within 4% of the
     * FCFS bound's (docs/scheduler.md, "Wave 10").
     */
    if (o->order != OMNI_QUEUE_SJF || o->backlog_us == 0) {
        return o->starvation_us;
    }

    b = o->backlog_us > UINT64_MAX / OMNI_POLICY_BACKLOG_PCT
        ? UINT64_MAX : o->backlog_us * OMNI_POLICY_BACKLOG_PCT / 100;

    if (o->bound_max_us && b > o->bound_max_us) {
        b = o->bound_max_us;
    }

    return b > o->starvation_us ? b : o->starvation_us;
}


int
omni_policy_starved(const omni_queue_opts_t *o, uint64_t arrival_us,
    uint64_t work_us, uint64_t now_us)
{
    uint64_t  ttft;

    if (o->starvation_us == 0) {
        return 0;
    }

    /*
     * SJF: the TTFT it would have if it started now (waited + its own
     * predicted work), so a long prompt becomes starved as much earlier
     * as it takes longer, and every request's TTFT is bounded alike
     * (latest start).  A bound on the wait alone let long prompts reach
     * TTFTs of timeout + work; shortest-first then pushed them there
     * under every burst (docs/scheduler.md, "Wave 6").
     */
    ttft = omni_policy_waited(now_us, arrival_us);

    if (o->order == OMNI_QUEUE_SJF) {
        ttft = work_us > UINT64_MAX - ttft ? UINT64_MAX : ttft + work_us;
    }

    return ttft >= omni_policy_starvation_bound(o);
}


size_t
omni_policy_late_scan(const omni_queue_opts_t *o)
{
    if (o->starvation_us == 0) {
        return 0;
    }

    /* SJF: a younger, longer request may be starved before an older one;
     * else the oldest starves first and is the one released */
    return o->order == OMNI_QUEUE_SJF ? OMNI_POLICY_LATE_SCAN : 1;
}


int
omni_policy_queue_next(const omni_queue_opts_t *o,
    const omni_queue_item_t *late, size_t n, const omni_queue_item_t *head,
    uint64_t now_us)
{
    uint64_t  bound, ttft;

    if (omni_policy_queue_check(o) != OMNI_OK || (n > 0 && late == NULL)
        || n > OMNI_POLICY_LATE_SCAN)
    {
        return OMNI_EINVAL;
    }

    if (n == 0) {
        return OMNI_ENOTFOUND;
    }

    /*
     * SJF: a request whose own work is a small part of the timeout goes
     * first all the same.  It adds that little to a starved request's
     * TTFT, and saves its own a wait behind a starved prefill of seconds
     * (a cached prompt that waited for the instance holding its prefix
     * while starved prompts took that instance each time it freed; a few
     * dozen tokens behind a 50k-token prompt).  On the clairvoyant model
     * the mean fell by up to 11% on the heavy Mooncake cases, the p99
     * moved by -3% to +4%; live, the section-1 mean fell 3-13% in four
     * pairs (docs/scheduler.md, "Short requests before the starved").  Work 0
     * is not known yet (omni_policy_queue_work's starve_us): not short.
     * Short requests that keep coming would hold the starved back for
     * ever: they go first only while the oldest starved one is less than
     * OMNI_POLICY_SHORT_LATE_PCT % of the timeout past the bound.  Both
     * are parts of the timeout, not of the bound, which follows a backlog
     * and would make most requests short under a deep one.
     */
    if (head != NULL && o->order == OMNI_QUEUE_SJF && head->work_us != 0) {
        bound = omni_policy_starvation_bound(o);
        ttft = omni_policy_waited(now_us, late[0].arrival_us);
        ttft = late[0].work_us > UINT64_MAX - ttft
               ? UINT64_MAX : ttft + late[0].work_us;

        if (head->work_us <= o->starvation_us / 100 * OMNI_POLICY_SHORT_PCT
            && (ttft < bound
                || ttft - bound
                   < o->starvation_us / 100 * OMNI_POLICY_SHORT_LATE_PCT))
        {
            return OMNI_ENOTFOUND;
        }
    }

    /*
     * Of the starved requests, the oldest, whatever the order.  The
     * timeout bounds the tail, the largest TTFT (waited + remaining wait +
     * work); for requests that are all waiting, releasing them oldest
     * first minimises the largest of those (Jackson's rule: swap a younger
     * one released just before an older one and neither ends later than
     * the older one did).  Releasing the one whose TTFT will be the
     * largest (waited + work), as before issue 24, released the longest
     * prompts first under a backlog: every shorter starved request waited
     * behind them, which was a third of the mean TTFT on the Mooncake run
     * and no gain in the tail (docs/scheduler.md).  The share of wave 4
     * (only some instances for the starved) is gone with wave 6's
     * definition of starved: it lowered the mean less than that and
     * raised the p99 (docs/bench-notes/wave6_whatif.py).
     */

    return 0;
}


#define omni_policy_at(idx, i)  ((idx) ? (idx)[i] : (uint32_t) (i))


/*
 * queue_next() over the items idx[0, m) of q in queue order (idx NULL: all
 * of q, m = n), then the least key: the position in idx of the one to
 * release next, as the module's queue gives it.
 */
static size_t
omni_policy_pick_among(const omni_queue_item_t *q, const uint32_t *idx,
    size_t m, uint64_t now_us, const omni_queue_opts_t *o)
{
    double                    key, best_key;
    size_t                    i, n, scan, best;
    int                       k;
    size_t                    late_at[OMNI_POLICY_LATE_SCAN];
    omni_queue_item_t         late[OMNI_POLICY_LATE_SCAN];
    const omni_queue_item_t  *it;

    best = 0;
    it = &q[omni_policy_at(idx, 0)];
    best_key = omni_policy_queue_key(o, it->arrival_us, it->work_us);

    for (i = 1; i < m; i++) {
        it = &q[omni_policy_at(idx, i)];
        key = omni_policy_queue_key(o, it->arrival_us, it->work_us);

        if (omni_policy_queue_before(key, omni_policy_at(idx, i), best_key,
                                     omni_policy_at(idx, best)))
        {
            best = i;
            best_key = key;
        }
    }

    scan = omni_policy_late_scan(o);

    for (i = 0, n = 0; i < m && i < scan; i++) {
        it = &q[omni_policy_at(idx, i)];

        if (omni_policy_starved(o, it->arrival_us, it->work_us, now_us)) {
            late_at[n] = i;
            late[n++] = *it;
        }
    }

    k = omni_policy_queue_next(o, late, n, &q[omni_policy_at(idx, best)],
                               now_us);

    return k >= 0 ? late_at[k] : best;
}


int
omni_policy_queue_pick(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts)
{
    if (omni_policy_queue_check(opts) != OMNI_OK || (n > 0 && q == NULL)
        || n > INT32_MAX)
    {
        return OMNI_EINVAL;
    }

    if (n == 0) {
        return OMNI_ENOTFOUND;
    }

    return (int) omni_policy_pick_among(q, NULL, n, now_us, opts);
}


int
omni_policy_queue_order(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts, uint32_t *order)
{
    size_t    i, k;
    uint32_t  t;

    if (omni_policy_queue_check(opts) != OMNI_OK || (n > 0 && q == NULL)
        || n > INT32_MAX || (n > 0 && order == NULL))
    {
        return OMNI_EINVAL;
    }

    for (i = 0; i < n; i++) {
        order[i] = (uint32_t) i;
    }

    /* order[i, n) holds what is left, in queue order */

    for (i = 0; i + 1 < n; i++) {
        k = omni_policy_pick_among(q, order + i, n - i, now_us, opts);
        t = order[i + k];
        memmove(order + i + 1, order + i, k * sizeof(uint32_t));
        order[i] = t;
    }

    return OMNI_OK;
}


void
omni_policy_arrived(omni_arrivals_t *a, uint64_t now_us)
{
    uint64_t  gap;

    if (a->last_us && now_us > a->last_us) {
        gap = now_us - a->last_us;
        if (gap > OMNI_POLICY_MAX_GAP_US) {
            gap = OMNI_POLICY_MAX_GAP_US;
        }

        a->gap_us = a->gap_us
                    ? a->gap_us
                      + OMNI_POLICY_GAP_ALPHA * ((double) gap - a->gap_us)
                    : (double) gap;
    }

    a->last_us = now_us;
}


/* ---- at once ------------------------------------------------------------- */

int
omni_policy_pick_now(const omni_pick_cand_t *c, size_t n, uint32_t policy,
    size_t start)
{
    uint64_t  min_running, hit_running;
    uint32_t  hit_best;
    size_t    i, k, best, hit;

    if ((n > 0 && c == NULL) || n > INT32_MAX
        || (policy != OMNI_PICK_ROUND_ROBIN && policy != OMNI_PICK_LEAST_LOADED
            && policy != OMNI_PICK_CACHE_AWARE))
    {
        return OMNI_EINVAL;
    }

    best = n;
    hit = n;
    hit_best = 0;
    hit_running = 0;
    min_running = UINT64_MAX;
    start = n ? start % n : 0;

    for (k = 0; k < n; k++) {
        i = (start + k) % n;

        if (c[i].flags) {
            continue;
        }

        if (policy == OMNI_PICK_ROUND_ROBIN) {
            return (int) i;
        }

        if (best == n || c[i].load_tokens < c[best].load_tokens) {
            best = i;
        }

        if (c[i].running < min_running) {
            min_running = c[i].running;
        }

        if (policy == OMNI_PICK_CACHE_AWARE && c[i].matched > hit_best) {
            hit = i;
            hit_best = c[i].matched;
            hit_running = c[i].running;
        }
    }

    /* cache-aware: the longest prefix, unless that piles up load */
    if (hit < n && hit_running < min_running + OMNI_POLICY_BALANCE) {
        best = hit;
    }

    return best < n ? (int) best : OMNI_ENOTFOUND;
}


/* ---- SLO-aware release --------------------------------------------------- */

/* times and works are clamped here: sums of a few thousand never wrap */
#define OMNI_SLO_MAX_US  ((uint64_t) 1 << 50)
#define OMNI_SLO_NONE    UINT64_MAX

typedef struct {
    double    key;              /* omni_policy_queue_key() */
    uint64_t  deadline;         /* absolute; OMNI_SLO_NONE: none */
    uint64_t  work;
    uint64_t  seq;
    uint32_t  idx;              /* into q[] */
    uint32_t  pad;
} omni_slo_rec_t;


static inline uint64_t
omni_slo_clamp(uint64_t us)
{
    return us < OMNI_SLO_MAX_US ? us : OMNI_SLO_MAX_US;
}


int
omni_policy_slo_starved(const omni_queue_opts_t *o, const omni_slo_item_t *it,
    uint64_t now_us)
{
    omni_queue_opts_t  t;

    /* past a deadline, the wait since it (the timeout alone: a lost
     * request waits at most this much more); else as without SLOs */
    if (it->deadline_us > it->arrival_us) {
        t = *o;
        t.backlog_us = 0;
        return omni_policy_starved(&t, it->deadline_us, 0, now_us);
    }

    return omni_policy_starved(o, it->arrival_us, it->work_us, now_us);
}


size_t
omni_policy_slo_scratch_size(size_t n, size_t m)
{
    /* records, two heaps of free times, two index lists */
    return n * sizeof(omni_slo_rec_t) + 2 * (m ? m : 1) * sizeof(uint64_t)
           + 2 * n * sizeof(uint32_t);
}


static int
omni_slo_by_key(const void *a, const void *b)
{
    const omni_slo_rec_t  *x = a, *y = b;

    if (x->key != y->key) {
        return x->key < y->key ? -1 : 1;
    }

    return x->seq < y->seq ? -1 : x->seq > y->seq;
}


static int
omni_slo_by_deadline(const void *a, const void *b)
{
    const omni_slo_rec_t  *x = a, *y = b;

    if (x->deadline != y->deadline) {
        return x->deadline < y->deadline ? -1 : 1;
    }

    return omni_slo_by_key(a, b);
}


static int
omni_slo_by_seq(const void *a, const void *b)
{
    const omni_slo_rec_t  *x = a, *y = b;

    return x->seq < y->seq ? -1 : x->seq > y->seq;
}


/* the min-heap of free times h[0, m): h[at] grew, restore */
static void
omni_slo_sift_at(uint64_t *h, size_t m, size_t at)
{
    uint64_t  v;
    size_t    i, c;

    v = h[at];

    for (i = at; (c = 2 * i + 1) < m; i = c) {
        if (c + 1 < m && h[c + 1] < h[c]) {
            c++;
        }

        if (h[c] >= v) {
            break;
        }

        h[i] = h[c];
    }

    h[i] = v;
}


#define omni_slo_sift(h, m)  omni_slo_sift_at(h, m, 0)


/*
 * The plan: r[first] (if first < n_rec) then r[ord[0, k)] (skipping first)
 * each start on the instance free first (h, a heap copied from free0) and
 * take their work.  Returns the position in ord of the first that misses
 * its deadline (k for `first`), or -1 when every one meets its own.
 */
static long
omni_slo_plan(const omni_slo_rec_t *r, const uint32_t *ord, size_t k,
    size_t first, size_t n_rec, const uint64_t *free0, uint64_t *h, size_t m)
{
    const omni_slo_rec_t  *x;
    size_t                 i;

    memcpy(h, free0, m * sizeof(uint64_t));

    for (i = 0; i <= k; i++) {
        if (i == 0 && first < n_rec) {
            x = &r[first];

        } else if (i == 0 || ord[i - 1] == first) {
            continue;

        } else {
            x = &r[ord[i - 1]];
        }

        h[0] += x->work;

        if (h[0] > x->deadline) {
            return i == 0 ? (long) k : (long) (i - 1);
        }

        omni_slo_sift(h, m);
    }

    return -1;
}


/* drop the longest of ord[0, upto] (the last of equals: the latest due) */
static size_t
omni_slo_drop_longest(const omni_slo_rec_t *r, uint32_t *ord, size_t k,
    size_t upto)
{
    size_t  i, l;

    for (l = 0, i = 1; i <= upto; i++) {
        if (r[ord[i]].work >= r[ord[l]].work) {
            l = i;
        }
    }

    memmove(ord + l, ord + l + 1, (k - l - 1) * sizeof(uint32_t));

    return k - 1;
}


int
omni_policy_slo_next(const omni_queue_opts_t *o, const omni_slo_item_t *q,
    size_t n, const uint64_t *wait_us, size_t m, uint64_t now_us,
    void *scratch, size_t scratch_size, omni_slo_pick_t *out)
{
    long               miss;
    size_t             i, j, k, f, scan, mm, best, tried, last;
    uint32_t          *feas, *kept;
    uint64_t          *free0, *h;
    omni_slo_rec_t    *r;
    omni_queue_item_t  head, late[OMNI_POLICY_LATE_SCAN];
    uint32_t           late_at[OMNI_POLICY_LATE_SCAN];
    int                rc;

    if (out == NULL || omni_policy_queue_check(o) != OMNI_OK
        || (n > 0 && q == NULL) || (m > 0 && wait_us == NULL)
        || n > INT32_MAX || (n > 0 && scratch == NULL)
        || ((uintptr_t) scratch & 7))
    {
        return OMNI_EINVAL;
    }

    memset(out, 0, sizeof(*out));
    out->index = -1;

    if (n == 0) {
        return OMNI_ENOTFOUND;
    }

    if (scratch_size < omni_policy_slo_scratch_size(n, m)) {
        return OMNI_ERANGE;
    }

    mm = m ? m : 1;
    r = scratch;
    free0 = (uint64_t *) (r + n);
    h = free0 + mm;
    feas = (uint32_t *) (h + mm);
    kept = feas + n;

    for (i = 0; i < n; i++) {
        r[i].key = omni_policy_queue_key(o, q[i].arrival_us, q[i].work_us);
        r[i].deadline = q[i].deadline_us ? q[i].deadline_us : OMNI_SLO_NONE;
        r[i].work = omni_slo_clamp(q[i].work_us);
        r[i].seq = q[i].seq;
        r[i].idx = (uint32_t) i;
        r[i].pad = 0;
    }

    /* 1. the starvation guarantee, the oldest first */

    qsort(r, n, sizeof(omni_slo_rec_t), omni_slo_by_seq);

    scan = omni_policy_late_scan(o);

    for (i = 0, k = 0; i < n && i < scan; i++) {
        if (omni_policy_slo_starved(o, &q[r[i].idx], now_us)) {
            late_at[k] = r[i].idx;
            late[k].arrival_us = q[r[i].idx].arrival_us;
            late[k++].work_us = q[r[i].idx].work_us;
        }
    }

    /* a short head goes before the starved: then the rules below choose
     * (without deadlines: the least key, as the queue functions) */
    for (i = 1, best = 0; i < n; i++) {
        if (omni_policy_queue_before(r[i].key, r[i].seq, r[best].key,
                                     r[best].seq))
        {
            best = i;
        }
    }

    head.arrival_us = q[r[best].idx].arrival_us;
    head.work_us = q[r[best].idx].work_us;

    rc = omni_policy_queue_next(o, late, k, &head, now_us);
    if (rc >= 0) {
        out->index = (int32_t) late_at[rc];
        out->reason = OMNI_SLO_STARVED;
        return OMNI_OK;
    }

    /* the instances' free instants: a heap */

    for (i = 0; i < m; i++) {
        free0[i] = omni_slo_clamp(now_us) + omni_slo_clamp(wait_us[i]);
    }

    if (m == 0) {
        free0[0] = omni_slo_clamp(now_us);
    }

    for (i = mm / 2; i-- > 0; /* void */) {
        omni_slo_sift_at(free0, mm, i);
    }

    /* 2. feasible: could meet its deadline if released now */

    qsort(r, n, sizeof(omni_slo_rec_t), omni_slo_by_key);

    for (f = 0, i = 0; i < n; i++) {
        if (free0[0] + r[i].work <= r[i].deadline) {
            feas[f++] = (uint32_t) i;
        }
    }

    out->feasible = (uint32_t) f;

    if (f == 0) {
        /* 5. all lost: the queue order (the least key) */
        out->index = (int32_t) r[0].idx;
        out->reason = OMNI_SLO_LOST;
        return OMNI_OK;
    }

    /* 3. nothing at risk in queue order: the queue order stands */

    if (omni_slo_plan(r, feas, f, n, n, free0, h, mm) < 0) {
        out->index = (int32_t) r[feas[0]].idx;
        out->on_time = (uint32_t) f;
        out->reason = OMNI_SLO_ORDER;
        return OMNI_OK;
    }

    /*
     * 4. The most that can be on time: in deadline order, keep each while
     * the plan of those kept meets every deadline, else drop the longest
     * of those up to the one that missed (on one instance this keeps a
     * largest on-time set: Moore-Hodgson).  With several instances list
     * scheduling has anomalies (dropping one may delay another), so the
     * plan is checked again after each drop.
     */

    /* feas[] in deadline order (an insertion sort of positions) */

    memcpy(kept, feas, f * sizeof(uint32_t));

    for (i = 1; i < f; i++) {
        last = kept[i];
        for (j = i; j > 0
             && omni_slo_by_deadline(&r[kept[j - 1]], &r[last]) > 0; j--)
        {
            kept[j] = kept[j - 1];
        }
        kept[j] = (uint32_t) last;
    }

    memcpy(feas, kept, f * sizeof(uint32_t));
    memcpy(h, free0, mm * sizeof(uint64_t));

    for (k = 0, i = 0; i < f; i++) {
        kept[k++] = feas[i];

        if (h[0] + r[feas[i]].work <= r[feas[i]].deadline) {
            h[0] += r[feas[i]].work;
            omni_slo_sift(h, mm);
            continue;
        }

        miss = (long) (k - 1);

        do {
            k = omni_slo_drop_longest(r, kept, k, (size_t) miss);
            miss = omni_slo_plan(r, kept, k, n, n, free0, h, mm);
        } while (miss >= 0);
    }

    out->on_time = (uint32_t) k;

    /* released: the first in queue order that keeps them all on time */

    best = kept[0];
    last = 0;

    for (tried = 0; tried < OMNI_POLICY_SLO_TRY && tried < k; tried++) {
        /* the next least key among kept[] (r is in key order) */
        j = n;
        for (i = 0; i < k; i++) {
            if (kept[i] < j && (tried == 0 || kept[i] > last)) {
                j = kept[i];
            }
        }

        last = j;

        if (omni_slo_plan(r, kept, k, j, n, free0, h, mm) < 0) {
            best = j;
            break;
        }
    }

    out->index = (int32_t) r[best].idx;
    out->reason = OMNI_SLO_PLAN;

    return OMNI_OK;
}


int
omni_policy_retry_after(const uint64_t *wait_us, size_t m,
    uint64_t queued_work_us, uint64_t slack_us, uint32_t *seconds)
{
    uint64_t  lo, hi, mid, sum, w, s;
    size_t    i;

    if (seconds == NULL || m == 0 || wait_us == NULL) {
        return OMNI_EINVAL;
    }

    /* the least level T with sum(max(0, T - wait)) >= work: bisection */

    w = omni_slo_clamp(queued_work_us);
    lo = OMNI_SLO_MAX_US;
    for (i = 0; i < m; i++) {
        if (omni_slo_clamp(wait_us[i]) < lo) {
            lo = omni_slo_clamp(wait_us[i]);
        }
    }
    hi = lo + w;

    while (lo < hi) {
        mid = lo + (hi - lo) / 2;

        for (sum = 0, i = 0; i < m && sum < w; i++) {
            if (mid > omni_slo_clamp(wait_us[i])) {
                sum += mid - omni_slo_clamp(wait_us[i]);
            }
        }

        if (sum >= w) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }

    slack_us = omni_slo_clamp(slack_us);
    s = lo > slack_us ? (lo - slack_us + 999999) / 1000000 : 0;

    *seconds = s < 1 ? 1 : s > OMNI_POLICY_RETRY_MAX_S
                           ? OMNI_POLICY_RETRY_MAX_S : (uint32_t) s;

    return OMNI_OK;
}


int
omni_policy_slo_admit(const omni_slo_item_t *req, const omni_slo_item_t *q,
    size_t n, const uint64_t *wait_us, size_t m, uint64_t now_us,
    uint64_t queued_work_us, uint32_t *retry_after_s)
{
    uint64_t  start, slo;
    size_t    i;

    if (req == NULL || retry_after_s == NULL || (n > 0 && q == NULL)
        || wait_us == NULL || m == 0 || req->deadline_us == 0)
    {
        return OMNI_EINVAL;
    }

    *retry_after_s = 0;

    start = OMNI_SLO_MAX_US;
    for (i = 0; i < m; i++) {
        if (omni_slo_clamp(wait_us[i]) < start) {
            start = omni_slo_clamp(wait_us[i]);
        }
    }
    start += omni_slo_clamp(now_us);

    slo = req->deadline_us > req->arrival_us
          ? req->deadline_us - req->arrival_us : 0;

    /* too long for its SLO even alone, or it can still make it: admit */

    if (omni_slo_clamp(req->work_us) > slo
        || start + omni_slo_clamp(req->work_us) <= req->deadline_us)
    {
        return 0;
    }

    /* some queued request can still meet its own: the queue is useful */

    for (i = 0; i < n; i++) {
        if (q[i].deadline_us == 0
            || start + omni_slo_clamp(q[i].work_us) <= q[i].deadline_us)
        {
            return 0;
        }
    }

    (void) omni_policy_retry_after(wait_us, m, queued_work_us,
                                   slo - omni_slo_clamp(req->work_us),
                                   retry_after_s);

    return 1;
}
