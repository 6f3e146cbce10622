/*
 * Omni Proxy scoring library: scheduling policies (see omni_policy.h).
 */

#include <string.h>

#include "omni_policy.h"


typedef int (*omni_policy_before_pt)(const void *ctx, uint32_t a, uint32_t b);


/*
 * Heapsort of indices: in place, O(n log n) worst case, no allocation, no
 * recursion.  `before` is a strict total order, so stability is not needed.
 */
static void
omni_policy_sort(uint32_t *a, size_t n, omni_policy_before_pt before,
    const void *ctx)
{
    size_t    start, end, root, child;
    uint32_t  t;

    if (n < 2) {
        return;
    }

    /* Max-heap under "before" reversed: the root is the last in order. */
    for (start = n / 2; start-- > 0; ) {
        for (root = start; (child = 2 * root + 1) < n; root = child) {
            if (child + 1 < n && before(ctx, a[child], a[child + 1])) {
                child++;
            }
            if (!before(ctx, a[root], a[child])) {
                break;
            }
            t = a[root]; a[root] = a[child]; a[child] = t;
        }
    }

    for (end = n - 1; end > 0; end--) {
        t = a[0]; a[0] = a[end]; a[end] = t;
        for (root = 0; (child = 2 * root + 1) < end; root = child) {
            if (child + 1 < end && before(ctx, a[child], a[child + 1])) {
                child++;
            }
            if (!before(ctx, a[root], a[child])) {
                break;
            }
            t = a[root]; a[root] = a[child]; a[child] = t;
        }
    }
}


/* ---- prefill ------------------------------------------------------------- */

static inline uint32_t
omni_policy_new_tokens(uint32_t prompt_tokens, uint32_t cached_tokens)
{
    if (cached_tokens >= prompt_tokens) {
        return prompt_tokens ? 1 : 0;
    }

    return prompt_tokens - cached_tokens;
}


int
omni_policy_prefill_prepare(const omni_predict_t *p,
    const uint32_t *cached_blocks, size_t n_cached, uint32_t block_size,
    uint32_t prompt_tokens, uint64_t now_us, omni_prefill_cand_t *c,
    size_t n)
{
    uint64_t  cached;
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

    if (c[best].wait_us > hold_slack_us) {
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


/* ---- decode -------------------------------------------------------------- */

static inline uint64_t
omni_policy_work(const omni_decode_job_t *j)
{
    return (uint64_t) j->prompt_tokens + j->output_tokens;
}


static int
omni_policy_lpt_before(const void *ctx, uint32_t a, uint32_t b)
{
    const omni_decode_job_t  *j = ctx;
    uint64_t                  wa = omni_policy_work(&j[a]);
    uint64_t                  wb = omni_policy_work(&j[b]);

    if (wa != wb) {
        return wa > wb;
    }
    if (j[a].arrival_us != j[b].arrival_us) {
        return j[a].arrival_us < j[b].arrival_us;
    }

    return a < b;
}


int
omni_policy_lpt_order(const omni_decode_job_t *jobs, size_t n,
    uint32_t *order)
{
    size_t  i;

    if (n > 0 && (jobs == NULL || order == NULL)) {
        return OMNI_EINVAL;
    }
    if (n > INT32_MAX) {
        return OMNI_EINVAL;
    }

    for (i = 0; i < n; i++) {
        order[i] = (uint32_t) i;
    }
    omni_policy_sort(order, n, omni_policy_lpt_before, jobs);

    return OMNI_OK;
}


int
omni_policy_decode_place(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, omni_decision_t *out)
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
omni_policy_decode_assign(omni_decode_inst_t *d, size_t n_inst,
    const omni_decode_job_t *jobs, size_t n_jobs, int strict,
    uint32_t *order, int32_t *assign)
{
    omni_decision_t  dec;
    size_t           k;
    uint32_t         j;
    int              rc, placed = 0, stop = 0;

    if (n_jobs > 0 && (jobs == NULL || order == NULL || assign == NULL)) {
        return OMNI_EINVAL;
    }
    if (n_inst > 0 && d == NULL) {
        return OMNI_EINVAL;
    }

    rc = omni_policy_lpt_order(jobs, n_jobs, order);
    if (rc != OMNI_OK) {
        return rc;
    }

    for (k = 0; k < n_jobs; k++) {
        j = order[k];
        assign[j] = -1;

        if (stop) {
            continue;
        }

        rc = omni_policy_decode_place(d, n_inst, &jobs[j], &dec);
        if (rc == OMNI_EHOLD) {
            stop = strict;
            continue;
        }
        if (rc != OMNI_OK) {
            return rc;
        }

        assign[j] = dec.choice;
        d[dec.choice].load_tokens += omni_policy_work(&jobs[j]);
        d[dec.choice].running++;
        placed++;
    }

    return placed;
}


/* ---- prefill queue ------------------------------------------------------- */

typedef struct {
    const omni_queue_item_t  *q;
    const omni_queue_opts_t  *o;
    uint64_t                  now;
} omni_policy_queue_ctx_t;


static inline uint64_t
omni_policy_waited(uint64_t now, uint64_t arrival)
{
    return now > arrival ? now - arrival : 0;
}


static int
omni_policy_queue_before(const void *ctx, uint32_t a, uint32_t b)
{
    const omni_policy_queue_ctx_t  *x = ctx;
    const omni_queue_item_t        *qa = &x->q[a], *qb = &x->q[b];
    uint64_t                        wa, wb;
    double                          sa, sb;
    int                             starved_a, starved_b;

    if (x->o->order == OMNI_QUEUE_SJF) {
        wa = omni_policy_waited(x->now, qa->arrival_us);
        wb = omni_policy_waited(x->now, qb->arrival_us);

        starved_a = x->o->starvation_us && wa >= x->o->starvation_us;
        starved_b = x->o->starvation_us && wb >= x->o->starvation_us;

        if (starved_a != starved_b) {
            return starved_a;
        }

        if (!starved_a) {
            sa = (double) qa->work_us - x->o->aging * (double) wa;
            sb = (double) qb->work_us - x->o->aging * (double) wb;
            if (sa != sb) {
                return sa < sb;
            }
        }
    }

    if (qa->arrival_us != qb->arrival_us) {
        return qa->arrival_us < qb->arrival_us;
    }

    return a < b;
}


static int
omni_policy_queue_check(const omni_queue_item_t *q, size_t n,
    const omni_queue_opts_t *opts)
{
    if (opts == NULL || (n > 0 && q == NULL) || n > INT32_MAX
        || (opts->order != OMNI_QUEUE_FCFS && opts->order != OMNI_QUEUE_SJF)
        || !(opts->aging >= 0) || opts->aging > 1e12)
    {
        return OMNI_EINVAL;
    }

    return OMNI_OK;
}


int
omni_policy_queue_pick(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts)
{
    omni_policy_queue_ctx_t  ctx;
    uint32_t                 best = 0, i;
    int                      rc;

    rc = omni_policy_queue_check(q, n, opts);
    if (rc != OMNI_OK) {
        return rc;
    }
    if (n == 0) {
        return OMNI_ENOTFOUND;
    }

    ctx.q = q;
    ctx.o = opts;
    ctx.now = now_us;

    for (i = 1; i < n; i++) {
        if (omni_policy_queue_before(&ctx, i, best)) {
            best = i;
        }
    }

    return (int) best;
}


int
omni_policy_queue_order(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts, uint32_t *order)
{
    omni_policy_queue_ctx_t  ctx;
    size_t                   i;
    int                      rc;

    rc = omni_policy_queue_check(q, n, opts);
    if (rc != OMNI_OK) {
        return rc;
    }
    if (n > 0 && order == NULL) {
        return OMNI_EINVAL;
    }

    ctx.q = q;
    ctx.o = opts;
    ctx.now = now_us;

    for (i = 0; i < n; i++) {
        order[i] = (uint32_t) i;
    }
    omni_policy_sort(order, n, omni_policy_queue_before, &ctx);

    return OMNI_OK;
}
