/*
 * Omni Proxy nginx module: the order of the holding queues.
 *
 * A held request's key (smaller leaves first), the scoring library's queue
 * options under this configuration (the order, the aging, the starvation
 * timeout and the backlog the bound follows), the keys made again as they
 * go stale, and the entry to release next.  The policy itself is the
 * library's (omni_policy_queue_key, _starved, _queue_next, _queue_aging,
 * _queue_rekey); this file gives it the queue's state.  Callers hold the
 * zone lock.
 */


#include "ngx_http_omni.h"


/* per worker scratch: the start tier's instance slots */
static uint32_t  ngx_http_omni_start_slots[NGX_HTTP_OMNI_MAX_SLOTS];


/*
 * The order of a held request (smaller keys leave first), under the lock:
 * omni_policy_queue_key() with the queue's options: the decode queue longest
 * first (LPT), the prefill queue first come first served or shortest
 * predicted work first with aging (the work: omni_policy_queue_work(), the
 * uncached prefill on the instance holding the longest prefix).
 */
void
ngx_http_omni_queue_key_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en)
{
    uint32_t                       *matched;
    uint64_t                        work;
    ngx_uint_t                      i;
    omni_queue_opts_t               o;
    ngx_http_omni_upstream_conf_t  *ucf;

    ngx_http_omni_queue_key_opts(mcf, sh, en->queue, &o);
    work = 0;

    if (en->queue == NGX_HTTP_OMNI_Q_DECODE) {
        work = en->prompt_tokens + en->output_tokens;

    } else {
        /* FCFS too: the drain (Retry-After) and the SLO plan need it */
        ucf = mcf->tiers[ngx_http_omni_start_tier(mcf)];

        for (i = 0; ucf && i < ucf->n; i++) {
            ngx_http_omni_start_slots[i] = ucf->slots[i]
                                           < NGX_HTTP_OMNI_MAX_SLOTS
                                           ? (uint32_t) ucf->slots[i]
                                           : NGX_HTTP_OMNI_NONE;
        }

        matched = ngx_http_omni_match(sh, en->hashes, en->n_hashes,
                                      ngx_http_omni_now_us());

        (void) omni_policy_queue_work(sh->predict, matched,
                                      matched ? sh->n_slots : 0,
                                      sh->block_size,
                                      ngx_http_omni_start_slots,
                                      ucf ? ucf->n : 0,
                                      (uint32_t) ngx_min(en->prompt_tokens,
                                                         UINT32_MAX),
                                      &en->work_us, &en->starve_us);
        work = o.order == OMNI_QUEUE_SJF ? en->work_us : 0;
    }

    en->key = omni_policy_queue_key(&o, (uint64_t) en->arrival * 1000, work);
}


/*
 * The library's options of queue q under this configuration; with sh (the
 * zone locked), the backlog the starvation bound (and the SJF aging)
 * follows: the queue's predicted work per usable instance of the tier it
 * starts on.
 */
void
ngx_http_omni_queue_opts(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, omni_queue_opts_t *o)
{
    ngx_uint_t  n;

    ngx_memzero(o, sizeof(omni_queue_opts_t));

    o->order = (q == NGX_HTTP_OMNI_Q_DECODE) ? OMNI_QUEUE_LPT
               : (mcf->queue_order == NGX_HTTP_OMNI_ORDER_SJF)
                 ? OMNI_QUEUE_SJF : OMNI_QUEUE_FCFS;
    o->aging = OMNI_POLICY_AGING;
    o->starvation_us = (uint64_t) mcf->starvation_timeout * 1000;

    /* a request starves before its queue or request timeout strikes */
    o->bound_max_us = (uint64_t) mcf->queue_timeout * 1000 / 2;

    if (mcf->request_timeout
        && (uint64_t) mcf->request_timeout * 1000 / 2 < o->bound_max_us)
    {
        o->bound_max_us = (uint64_t) mcf->request_timeout * 1000 / 2;
    }

    if (sh == NULL || o->order != OMNI_QUEUE_SJF
        || sh->queues[q].work_us == 0)
    {
        return;
    }

    n = ngx_http_omni_tier_usable(mcf, sh, ngx_http_omni_start_tier(mcf),
                                  ngx_current_msec);

    o->backlog_us = sh->queues[q].work_us / ngx_max(n, 1);
}


/*
 * The options queue q's keys are made with: every key of a queue uses one
 * aging, that of the backlog the keys were made at (key_backlog_us, moved
 * by ngx_http_omni_queue_rekey_locked()).
 */
void
ngx_http_omni_queue_key_opts(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, omni_queue_opts_t *o)
{
    ngx_http_omni_queue_opts(mcf, NULL, q, o);
    o->backlog_us = sh->queues[q].key_backlog_us;
}


/*
 * The entry to release next from queue q, or NGX_HTTP_OMNI_NONE: the least
 * key, unless requests are starved (omni_policy_starved: waited, plus
 * their predicted work in the SJF order, reached the starvation timeout);
 * of the starved among the oldest omni_policy_late_scan() entries of the
 * arrival list, omni_policy_queue_next() says which goes first, or that
 * the least key goes all the same (a short request in the SJF order).
 */
uint32_t
ngx_http_omni_queue_next_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, ngx_msec_t now)
{
    int                      k;
    size_t                   i, n, max;
    uint32_t                 e;
    omni_queue_opts_t        o;
    ngx_http_omni_queue_t   *queue;
    ngx_http_omni_qentry_t  *en;
    omni_queue_item_t        head, late[OMNI_POLICY_LATE_SCAN];
    uint32_t                 ids[OMNI_POLICY_LATE_SCAN];

    queue = &sh->queues[q];

    if (queue->n == 0) {
        return NGX_HTTP_OMNI_NONE;
    }

    ngx_http_omni_queue_opts(mcf, sh, q, &o);

    max = ngx_min(omni_policy_late_scan(&o), OMNI_POLICY_LATE_SCAN);

    for (i = 0, n = 0, e = queue->head; e != NGX_HTTP_OMNI_NONE && i < max;
         e = en->next, i++)
    {
        en = &sh->entries[e];

        if (!omni_policy_starved(&o, (uint64_t) en->arrival * 1000,
                                 en->starve_us, (uint64_t) now * 1000))
        {
            continue;
        }

        late[n].arrival_us = (uint64_t) en->arrival * 1000;
        late[n].work_us = en->starve_us;
        ids[n++] = e;
    }

    en = &sh->entries[queue->heap[0]];
    head.arrival_us = (uint64_t) en->arrival * 1000;
    head.work_us = en->starve_us;

    k = omni_policy_queue_next(&o, late, n, &head, (uint64_t) now * 1000);

    e = k >= 0 ? ids[k] : queue->heap[0];

    if (q == NGX_HTTP_OMNI_Q_PREFILL) {
        sh->entries[e].reason = k >= 0 ? NGX_HTTP_OMNI_REL_STARVED
                                       : NGX_HTTP_OMNI_REL_ORDER;
    }

    return e;
}


/*
 * Compute the prefill queue's keys again and restore its order: a key goes
 * stale while its request waits, as the predictor learns and as requests
 * sharing its prefix are sent (then the order, the starvation rule and the
 * drain saw a wrong work), and in the SJF order when the aging the keys
 * were made with moved with the backlog (omni_policy_queue_rekey: the keys
 * are then made with the backlog of now).  FCFS: the work changes, never
 * the order.
 */
void
ngx_http_omni_queue_rekey_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, uint64_t now_us)
{
    uint32_t                 e;
    uint64_t                 work;
    ngx_uint_t               changed;
    omni_queue_opts_t        keyed, now;
    ngx_http_omni_queue_t   *q;
    ngx_http_omni_qentry_t  *en;

    q = &sh->queues[NGX_HTTP_OMNI_Q_PREFILL];
    sh->rekey_us = now_us;

    ngx_http_omni_queue_opts(mcf, sh, NGX_HTTP_OMNI_Q_PREFILL, &now);
    ngx_http_omni_queue_key_opts(mcf, sh, NGX_HTTP_OMNI_Q_PREFILL, &keyed);

    changed = omni_policy_queue_rekey(&keyed, &now);

    if (changed) {
        q->key_backlog_us = now.backlog_us;
        sh->aging_rekeys++;
    }

    for (e = q->head; e != NGX_HTTP_OMNI_NONE; e = en->next) {
        en = &sh->entries[e];
        work = en->work_us;

        ngx_http_omni_queue_key_locked(mcf, sh, en);

        if (en->work_us != work) {
            q->work_us = q->work_us - work + en->work_us;
            changed = 1;
        }
    }

    if (changed) {
        if (mcf->queue_order == NGX_HTTP_OMNI_ORDER_SJF) {
            ngx_http_omni_queue_reorder_locked(sh, NGX_HTTP_OMNI_Q_PREFILL);
        }

        sh->rekeys++;
        sh->sched_epoch++;
    }
}
