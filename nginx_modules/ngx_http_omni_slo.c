/*
 * Omni Proxy nginx module: SLO-aware release (docs/scoring.md point 9,
 * docs/scheduler.md "SLO-aware release").  Which held request to start
 * next when some have a TTFT deadline (omni_policy_slo_next()), the early
 * 429 (omni_policy_slo_admit()) and Retry-After from the queue's expected
 * drain (omni_policy_retry_after()).  The rules are the scoring library's;
 * this file gathers what they need from the zone into per-worker buffers,
 * under the zone lock.
 */


#include "ngx_http_omni.h"


static size_t ngx_http_omni_slo_gather(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now, ngx_uint_t tail_only,
    ngx_uint_t *complete);
static uint32_t ngx_http_omni_slo_pick(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now);


/*
 * SLO mode (docs/scoring.md point 9): the per-worker buffers of the
 * entries gathered for omni_policy_slo_next(), filled under the zone lock
 * and used before it is released.
 */

#define NGX_HTTP_OMNI_SLO_ITEMS  (OMNI_POLICY_LATE_SCAN + OMNI_POLICY_SLO_SCAN \
                                  + 1)

static omni_slo_item_t  ngx_http_omni_slo_items[NGX_HTTP_OMNI_SLO_ITEMS];
static size_t           ngx_http_omni_slo_n;        /* entries gathered */
static uint32_t         ngx_http_omni_slo_ids[NGX_HTTP_OMNI_SLO_ITEMS];
static uint64_t         ngx_http_omni_slo_waits[NGX_HTTP_OMNI_MAX_SLOTS];
static size_t           ngx_http_omni_slo_m;
static uint64_t        *ngx_http_omni_slo_scratch;
static size_t           ngx_http_omni_slo_scratch_size;


/* Each usable start instance's predicted time until it is free. */
static size_t
ngx_http_omni_slo_fill_waits(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now)
{
    size_t                          m;
    int64_t                         w;
    uint64_t                        now_us;
    ngx_uint_t                      i, slot;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = mcf->tiers[ngx_http_omni_start_tier(mcf)];
    now_us = ngx_http_omni_now_us();

    for (m = 0, i = 0; ucf && i < ucf->n; i++) {
        slot = ucf->slots[i];

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS
            || !ngx_http_omni_usable(ucf, i, &sh->inst[slot], now))
        {
            continue;
        }

        w = omni_predict_wait_us(sh->predict, (uint32_t) slot, now_us);
        ngx_http_omni_slo_waits[m++] = w > 0 ? (uint64_t) w : 0;
    }

    ngx_http_omni_slo_m = m;

    return m;
}


static void
ngx_http_omni_slo_add(ngx_http_omni_shctx_t *sh, size_t *n, uint32_t e)
{
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];

    ngx_http_omni_slo_items[*n].arrival_us = (uint64_t) en->arrival * 1000;
    ngx_http_omni_slo_items[*n].work_us = en->work_us;
    ngx_http_omni_slo_items[*n].deadline_us = en->deadline_us;
    ngx_http_omni_slo_items[*n].seq = en->seq;
    ngx_http_omni_slo_ids[(*n)++] = e;
}


/*
 * Gather the prefill queue's entries (and the instances' waits): all of
 * them when few; else the oldest (the starvation rule needs them) and the
 * newest back to the first past the largest SLO (it and all older are
 * lost), plus the least key.  `tail_only`: the newest only (the early 429);
 * *complete says whether the walk reached the lost ones.
 */
static size_t
ngx_http_omni_slo_gather(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now, ngx_uint_t tail_only,
    ngx_uint_t *complete)
{
    size_t                   n, k;
    uint32_t                 e, stop;
    uint64_t                 now_us, max_us;
    ngx_http_omni_queue_t   *queue;
    ngx_http_omni_qentry_t  *en;

    queue = &sh->queues[NGX_HTTP_OMNI_Q_PREFILL];
    now_us = (uint64_t) now * 1000;
    max_us = (uint64_t) ngx_max(mcf->slo_ttft, mcf->slo_max) * 1000;

    (void) ngx_http_omni_slo_fill_waits(mcf, sh, now);

    n = 0;
    stop = NGX_HTTP_OMNI_NONE;

    if (complete) {
        *complete = 1;
    }

    if (!tail_only
        && queue->n <= OMNI_POLICY_LATE_SCAN + OMNI_POLICY_SLO_SCAN)
    {
        for (e = queue->head; e != NGX_HTTP_OMNI_NONE; e = en->next) {
            en = &sh->entries[e];
            ngx_http_omni_slo_add(sh, &n, e);
        }

        return n;
    }

    if (!tail_only) {
        for (e = queue->head; e != NGX_HTTP_OMNI_NONE
             && n < OMNI_POLICY_LATE_SCAN; e = en->next)
        {
            en = &sh->entries[e];
            ngx_http_omni_slo_add(sh, &n, e);
        }

        stop = e == NGX_HTTP_OMNI_NONE ? NGX_HTTP_OMNI_NONE
                                       : sh->entries[e].prev;
    }

    for (k = 0, e = queue->tail; e != NGX_HTTP_OMNI_NONE; e = en->prev, k++) {
        en = &sh->entries[e];

        if (e == stop
            || now_us - ngx_min(now_us, (uint64_t) en->arrival * 1000)
               >= max_us)
        {
            break;
        }

        if (k == OMNI_POLICY_SLO_SCAN) {
            if (complete) {
                *complete = 0;
            }

            break;
        }

        ngx_http_omni_slo_add(sh, &n, e);
    }

    if (!tail_only && queue->n) {
        e = queue->heap[0];

        for (k = 0; k < n; k++) {
            if (ngx_http_omni_slo_ids[k] == e) {
                break;
            }
        }

        if (k == n) {
            ngx_http_omni_slo_add(sh, &n, e);
        }
    }

    return n;
}


/* omni_policy_slo_next() on the gathered entries; its reason kept. */
static uint32_t
ngx_http_omni_slo_pick(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now)
{
    int                  rc;
    uint32_t             e;
    omni_slo_pick_t      pick;
    omni_queue_opts_t    o;
    static const uint8_t  reasons[] = {
        NGX_HTTP_OMNI_REL_STARVED, NGX_HTTP_OMNI_REL_ORDER,
        NGX_HTTP_OMNI_REL_PLAN, NGX_HTTP_OMNI_REL_LOST
    };

    if (ngx_http_omni_slo_n == 0) {
        return NGX_HTTP_OMNI_NONE;
    }

    ngx_http_omni_queue_opts(mcf, sh, NGX_HTTP_OMNI_Q_PREFILL, &o);

    rc = omni_policy_slo_next(&o, ngx_http_omni_slo_items,
                              ngx_http_omni_slo_n, ngx_http_omni_slo_waits,
                              ngx_http_omni_slo_m, (uint64_t) now * 1000,
                              ngx_http_omni_slo_scratch,
                              ngx_http_omni_slo_scratch_size, &pick);

    if (rc != OMNI_OK || pick.index < 0) {
        e = sh->queues[NGX_HTTP_OMNI_Q_PREFILL].heap[0];
        sh->entries[e].reason = NGX_HTTP_OMNI_REL_ORDER;
        return e;
    }

    e = ngx_http_omni_slo_ids[pick.index];
    sh->entries[e].reason = pick.reason < sizeof(reasons)
                            ? reasons[pick.reason] : NGX_HTTP_OMNI_REL_ORDER;

    return e;
}


/*
 * The release pass's lookahead in SLO mode: entry `tried` waits for a busy
 * instance; the next by the same rule without it (the held entry occupies
 * no instance: the same waits stand).  NGX_HTTP_OMNI_NONE: no other.
 */
uint32_t
ngx_http_omni_slo_again_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, uint32_t tried, ngx_msec_t now)
{
    size_t  k, n;

    n = ngx_http_omni_slo_n;

    for (k = 0; k < n; k++) {
        if (ngx_http_omni_slo_ids[k] == tried) {
            ngx_http_omni_slo_items[k] = ngx_http_omni_slo_items[n - 1];
            ngx_http_omni_slo_ids[k] = ngx_http_omni_slo_ids[n - 1];
            ngx_http_omni_slo_n = --n;
            break;
        }
    }

    return ngx_http_omni_slo_pick(mcf, sh, now);
}


/* The scratch omni_policy_slo_next() needs, once per worker. */
ngx_int_t
ngx_http_omni_slo_init(ngx_cycle_t *cycle)
{
    ngx_http_omni_slo_scratch_size = omni_policy_slo_scratch_size(
        NGX_HTTP_OMNI_SLO_ITEMS, NGX_HTTP_OMNI_MAX_SLOTS);

    ngx_http_omni_slo_scratch = ngx_alloc(ngx_http_omni_slo_scratch_size + 8,
                                          cycle->log);
    if (ngx_http_omni_slo_scratch == NULL) {
        ngx_http_omni_slo_scratch_size = 0;
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Retry-After, seconds, for a request refused now: the queue's expected
 * drain (omni_policy_retry_after()); 1 when no instance is usable.
 */
uint32_t
ngx_http_omni_retry_after_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now)
{
    size_t    m;
    uint32_t  s;

    m = ngx_http_omni_slo_fill_waits(mcf, sh, now);

    if (m == 0
        || omni_policy_retry_after(ngx_http_omni_slo_waits, m,
                                   sh->queues[NGX_HTTP_OMNI_Q_PREFILL].work_us,
                                   0, &s)
           != OMNI_OK)
    {
        return 1;
    }

    return s;
}


/*
 * The early 429 (omni_slo_reject on): NGX_DECLINED when admitting entry en
 * (its work and deadline set, not yet queued) would only add to a queue
 * that cannot meet any SLO (omni_policy_slo_admit()); *retry_after_s then
 * says when to come back.
 */
ngx_int_t
ngx_http_omni_slo_admit_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en, ngx_msec_t now,
    uint32_t *retry_after_s)
{
    size_t           n;
    ngx_uint_t       complete;
    omni_slo_item_t  req;

    if (!mcf->slo_reject || en->deadline_us == 0) {
        return NGX_OK;
    }

    n = ngx_http_omni_slo_gather(mcf, sh, now, 1, &complete);

    if (!complete || ngx_http_omni_slo_m == 0) {
        return NGX_OK;
    }

    req.arrival_us = (uint64_t) en->arrival * 1000;
    req.work_us = en->work_us;
    req.deadline_us = en->deadline_us;
    req.seq = 0;

    if (omni_policy_slo_admit(&req, ngx_http_omni_slo_items, n,
                              ngx_http_omni_slo_waits, ngx_http_omni_slo_m,
                              (uint64_t) now * 1000,
                              sh->queues[NGX_HTTP_OMNI_Q_PREFILL].work_us,
                              retry_after_s)
        == 1)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}



/*
 * The entry of queue q to release next: with someone waiting with a
 * deadline in the prefill queue, the SLO rule; else the queue's
 * (ngx_http_omni_queue_next_locked()).
 */
uint32_t
ngx_http_omni_release_next_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, ngx_msec_t now)
{
    if (q != NGX_HTTP_OMNI_Q_PREFILL || sh->queues[q].n_slo == 0) {
        return ngx_http_omni_queue_next_locked(mcf, sh, q, now);
    }

    ngx_http_omni_slo_n = ngx_http_omni_slo_gather(mcf, sh, now, 0, NULL);

    return ngx_http_omni_slo_pick(mcf, sh, now);
}
