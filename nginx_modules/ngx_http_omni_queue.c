/*
 * Omni Proxy nginx module: holding requests in the proxy.
 *
 * With `omni_schedule_policy omni`, a request does not go to an engine when
 * it arrives: it waits in one of two ordered queues in the shared zone
 * (prefill: every mode; decode: sequential mode after its prefill) until the
 * scheduler (ngx_http_omni_sched.c) finds an instance that can take it, and
 * is bound to that instance only then.
 *
 * Any worker may release any worker's request.  The releasing worker charges
 * the chosen instance and marks the entry released under the zone lock; the
 * owner is woken by its eventfd (one per worker, created by the master before
 * the fork) or, for its own requests, by posting the request's write event.
 * Nothing polls while idle: a worker that holds requests keeps one timer, at
 * the scheduler's predicted instant or a 250 ms safety tick, whichever comes
 * first.
 *
 * A queue is a binary heap of entry numbers ordered by `key` (shortest work
 * first with aging, FCFS, or longest work first for decode) plus a list in
 * arrival order, so the oldest request is found at once when it has waited
 * past the starvation timeout.
 */


#include <sys/eventfd.h>

#include <ngx_channel.h>

#include "ngx_http_omni.h"


#define NGX_HTTP_OMNI_SAFETY_TICK   250

/* a microsecond waited forgives this much predicted work (SJF aging) */
#define NGX_HTTP_OMNI_AGING         1.0
/* requests past the starvation timeout looked at for the most late one */
#define NGX_HTTP_OMNI_LATE_SCAN     64


static uint32_t ngx_http_omni_most_late_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_queue_t *queue, ngx_msec_t now);
static void ngx_http_omni_heap_push(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_queue_t *q, uint32_t e);
static void ngx_http_omni_heap_remove(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_queue_t *q, uint32_t pos);
static void ngx_http_omni_entry_free_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e);
static void ngx_http_omni_post_released(void);
static void ngx_http_omni_wake_handler(ngx_event_t *ev);
static void ngx_http_omni_timer_handler(ngx_event_t *ev);
static void ngx_http_omni_close_fds(void *data);


/* per worker process */
static ngx_queue_t                 ngx_http_omni_held_list;
static ngx_event_t                 ngx_http_omni_timer;
static ngx_http_omni_main_conf_t  *ngx_http_omni_worker_mcf;
static uint64_t                    ngx_http_omni_generation;


uint64_t
ngx_http_omni_now_us(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}


ngx_int_t
ngx_http_omni_queue_init_zone(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, size_t zone_size)
{
    int                  rc;
    void                *mem;
    size_t               size, budget;
    uint32_t             i, n, cap;
    omni_index_cfg_t     icfg;
    omni_predict_cfg_t   pcfg;

    cap = (uint32_t) ngx_max(mcf->queue_max, 1);

    sh->q_cap = cap;
    sh->entries = ngx_slab_calloc(shpool,
                                  cap * sizeof(ngx_http_omni_qentry_t));
    if (sh->entries == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < cap; i++) {
        sh->entries[i].next = (i + 1 < cap) ? i + 1 : NGX_HTTP_OMNI_NONE;
    }

    sh->q_free = 0;

    for (i = 0; i < NGX_HTTP_OMNI_QUEUES; i++) {
        sh->queues[i].head = NGX_HTTP_OMNI_NONE;
        sh->queues[i].tail = NGX_HTTP_OMNI_NONE;
        sh->queues[i].heap = ngx_slab_alloc(shpool, cap * sizeof(uint32_t));
        if (sh->queues[i].heap == NULL) {
            return NGX_ERROR;
        }
    }

    ngx_memzero(&pcfg, sizeof(omni_predict_cfg_t));
    pcfg.max_instances = NGX_HTTP_OMNI_MAX_SLOTS;

    size = omni_predict_size(&pcfg);
    mem = ngx_slab_alloc(shpool, size);
    if (mem == NULL) {
        return NGX_ERROR;
    }

    rc = omni_predict_init(mem, size, &pcfg, &sh->predict);
    if (rc != OMNI_OK) {
        ngx_log_error(NGX_LOG_EMERG, ngx_cycle->log, 0,
                      "omni: predictor: %s", omni_strerror(rc));
        return NGX_ERROR;
    }

    /*
     * The prefix index gets about half the zone; the rest is for the zone's
     * own state and the block hashes of held requests.
     */

    budget = zone_size / 2;

    /*
     * The index keeps one bit per instance for every block, and a match
     * reads all of them: size it for the instances configured (with room
     * for as many more to come with reloads), not for every possible slot.
     * Instances past it are scheduled without cache knowledge.
     */

    n = 0;

    for (i = 0; i < NGX_HTTP_OMNI_TIERS; i++) {
        if (mcf->tiers[i]) {
            n += (uint32_t) mcf->tiers[i]->n;
        }
    }

    n = ngx_align(ngx_max(2 * n, 64), 64);

    ngx_memzero(&icfg, sizeof(omni_index_cfg_t));
    icfg.max_instances = ngx_min(n, NGX_HTTP_OMNI_MAX_SLOTS);
    icfg.block_size = (uint32_t) mcf->block_size;
    icfg.instance_capacity = (uint32_t) mcf->cache_blocks;
    icfg.approx_ttl_us = (uint64_t) mcf->cache_ttl * 1000;
    icfg.max_entries = (uint32_t) ngx_min(budget / 32, OMNI_INDEX_MAX_ENTRIES);

    for ( ;; ) {
        size = omni_index_size(&icfg);

        if (size && size <= budget) {
            break;
        }

        if (icfg.max_entries < 1024) {
            ngx_log_error(NGX_LOG_EMERG, ngx_cycle->log, 0,
                          "omni: the zone is too small for the prefix "
                          "index, raise \"omni_zone_size\"");
            return NGX_ERROR;
        }

        icfg.max_entries -= icfg.max_entries / 8;
    }

    mem = ngx_slab_alloc(shpool, size);
    if (mem == NULL) {
        return NGX_ERROR;
    }

    rc = omni_index_init(mem, size, &icfg, &sh->index);
    if (rc != OMNI_OK) {
        ngx_log_error(NGX_LOG_EMERG, ngx_cycle->log, 0,
                      "omni: prefix index: %s", omni_strerror(rc));
        return NGX_ERROR;
    }

    sh->block_size = icfg.block_size;
    sh->index_instances = icfg.max_instances;
    sh->index_entries = icfg.max_entries;
    sh->cache_blocks = (uint32_t) mcf->cache_blocks;
    sh->cache_ttl = mcf->cache_ttl;
    sh->pd_policy = (uint32_t) mcf->pd_policy;

    ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                  "omni: prefix index of %uD (block, instance) entries "
                  "for %uD instances, %uz bytes; queues of %uD requests",
                  icfg.max_entries, icfg.max_instances, size, cap);

    return NGX_OK;
}


/* the entry to release next from queue q, or NGX_HTTP_OMNI_NONE */
uint32_t
ngx_http_omni_queue_next_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, ngx_msec_t now)
{
    ngx_http_omni_queue_t  *queue;

    queue = &sh->queues[q];

    if (queue->n == 0) {
        return NGX_HTTP_OMNI_NONE;
    }

    /* a request that waited past the starvation timeout goes first */

    if (mcf->starvation_timeout
        && now - sh->entries[queue->head].arrival >= mcf->starvation_timeout)
    {
        if (q != NGX_HTTP_OMNI_Q_PREFILL
            || mcf->queue_order != NGX_HTTP_OMNI_ORDER_SJF)
        {
            return queue->head;
        }

        return ngx_http_omni_most_late_locked(mcf, sh, queue, now);
    }

    return queue->heap[0];
}


/*
 * Of the prefill requests that waited past the starvation timeout (the
 * oldest ones, at the front of the arrival list), the one whose TTFT will
 * be the largest: the time it waited plus its predicted work.  Under a
 * backlog every request is past the timeout; the oldest first would leave
 * the long prompts that came last to the end of the drain, which is the
 * tail; this way the wait is shared out by what it will cost.
 */
static uint32_t
ngx_http_omni_most_late_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_queue_t *queue, ngx_msec_t now)
{
    double                   late, most;
    uint32_t                 e, best;
    ngx_uint_t               k;
    ngx_http_omni_qentry_t  *en;

    best = queue->head;
    most = -1;

    for (e = queue->head, k = 0;
         e != NGX_HTTP_OMNI_NONE && k < NGX_HTTP_OMNI_LATE_SCAN;
         e = en->next, k++)
    {
        en = &sh->entries[e];

        if (now - en->arrival < mcf->starvation_timeout) {
            break;
        }

        late = (double) (now - en->arrival) * 1000 + (double) en->work_us;

        if (late > most) {
            most = late;
            best = e;
        }
    }

    return best;
}


static ngx_inline ngx_uint_t
ngx_http_omni_before(ngx_http_omni_shctx_t *sh, uint32_t a, uint32_t b)
{
    ngx_http_omni_qentry_t  *ea, *eb;

    ea = &sh->entries[a];
    eb = &sh->entries[b];

    if (ea->key != eb->key) {
        return ea->key < eb->key;
    }

    return ea->seq < eb->seq;
}


static void
ngx_http_omni_heap_push(ngx_http_omni_shctx_t *sh, ngx_http_omni_queue_t *q,
    uint32_t e)
{
    uint32_t  pos, parent;

    pos = q->n;

    while (pos > 0) {
        parent = (pos - 1) / 2;

        if (!ngx_http_omni_before(sh, e, q->heap[parent])) {
            break;
        }

        q->heap[pos] = q->heap[parent];
        sh->entries[q->heap[pos]].heap_pos = pos;
        pos = parent;
    }

    q->heap[pos] = e;
    sh->entries[e].heap_pos = pos;
}


/* remove heap[pos]; q->n already counts one less */
static void
ngx_http_omni_heap_remove(ngx_http_omni_shctx_t *sh, ngx_http_omni_queue_t *q,
    uint32_t pos)
{
    uint32_t  last, child, parent;

    if (pos == q->n) {
        return;
    }

    last = q->heap[q->n];

    /* sift up */

    while (pos > 0) {
        parent = (pos - 1) / 2;

        if (!ngx_http_omni_before(sh, last, q->heap[parent])) {
            break;
        }

        q->heap[pos] = q->heap[parent];
        sh->entries[q->heap[pos]].heap_pos = pos;
        pos = parent;
    }

    /* sift down */

    for ( ;; ) {
        child = 2 * pos + 1;

        if (child >= q->n) {
            break;
        }

        if (child + 1 < q->n
            && ngx_http_omni_before(sh, q->heap[child + 1], q->heap[child]))
        {
            child++;
        }

        if (!ngx_http_omni_before(sh, q->heap[child], last)) {
            break;
        }

        q->heap[pos] = q->heap[child];
        sh->entries[q->heap[pos]].heap_pos = pos;
        pos = child;
    }

    q->heap[pos] = last;
    sh->entries[last].heap_pos = pos;
}


/* Take a waiting entry out of its queue (it stays allocated). */
void
ngx_http_omni_queue_remove_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e)
{
    ngx_http_omni_queue_t   *q;
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];
    q = &sh->queues[en->queue];

    q->n--;
    ngx_http_omni_heap_remove(sh, q, en->heap_pos);

    if (en->prev != NGX_HTTP_OMNI_NONE) {
        sh->entries[en->prev].next = en->next;
    } else {
        q->head = en->next;
    }

    if (en->next != NGX_HTTP_OMNI_NONE) {
        sh->entries[en->next].prev = en->prev;
    } else {
        q->tail = en->prev;
    }

    en->prev = NGX_HTTP_OMNI_NONE;
    en->next = NGX_HTTP_OMNI_NONE;
}


static void
ngx_http_omni_entry_free_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e)
{
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];

    if (en->hashes) {
        ngx_slab_free_locked(shpool, en->hashes);
    }

    ngx_memzero(en, sizeof(ngx_http_omni_qentry_t));
    en->state = NGX_HTTP_OMNI_QE_FREE;
    en->next = sh->q_free;
    sh->q_free = e;
}


/* What a released-but-unused binding charged, given back. */
static void
ngx_http_omni_uncharge_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_omni_qentry_t *en)
{
    ngx_uint_t  t;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        if (en->charge[t]) {
            ngx_http_omni_ledger_unbind_locked(sh, shpool, en->charge[t]);
            en->charge[t] = NULL;
        }
    }
}


ngx_int_t
ngx_http_omni_hold(ngx_http_omni_ctx_t *ctx, ngx_uint_t queue)
{
    size_t                   i;
    int64_t                  work;
    uint32_t                 e;
    uint64_t                 best;
    ngx_msec_t               now;
    ngx_slab_pool_t         *shpool;
    ngx_http_request_t      *r;
    ngx_http_omni_queue_t   *q;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t  *en;

    r = ctx->request;
    sh = ngx_http_omni_shm(ctx->mcf, &shpool);
    now = ngx_current_msec;

    ngx_shmtx_lock(&shpool->mutex);

    e = sh->q_free;

    if (e == NGX_HTTP_OMNI_NONE
        || sh->queues[NGX_HTTP_OMNI_Q_PREFILL].n
           + sh->queues[NGX_HTTP_OMNI_Q_DECODE].n >= ctx->mcf->queue_max)
    {
        sh->rejected_full++;
        ngx_shmtx_unlock(&shpool->mutex);

        ngx_http_omni_retry_after(r);

        ctx->error = "queue_full";
        return ngx_http_omni_send_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                        "rate_limit_error",
                                        "the proxy's queue is full (%ui "
                                        "requests waiting), retry later",
                                        ctx->mcf->queue_max);
    }

    en = &sh->entries[e];
    sh->q_free = en->next;

    ngx_memzero(en, sizeof(ngx_http_omni_qentry_t));

    en->state = NGX_HTTP_OMNI_QE_WAITING;
    en->queue = (uint8_t) queue;
    en->route = (uint8_t) ctx->route;
    en->mode = (uint8_t) ctx->mode;
    en->worker = (uint32_t) ngx_worker;
    en->pid = ngx_pid;
    en->generation = ngx_http_omni_generation;
    en->seq = ++sh->q_seq;
    en->ctx = ctx;
    en->arrival = now;
    en->prompt_tokens = ctx->prompt_tokens;
    en->output_tokens = ctx->output_tokens;
    en->slot[0] = NGX_HTTP_OMNI_NONE;
    en->slot[1] = NGX_HTTP_OMNI_NONE;

    if (queue == NGX_HTTP_OMNI_Q_PREFILL && ctx->n_hashes) {
        en->hashes = ngx_slab_alloc_locked(shpool,
                                           ctx->n_hashes * sizeof(uint64_t));
        if (en->hashes) {
            ngx_memcpy(en->hashes, ctx->hashes,
                       ctx->n_hashes * sizeof(uint64_t));
            en->n_hashes = (uint32_t) ctx->n_hashes;

        } else {
            /* scheduled without cache knowledge rather than refused */
            sh->hash_copy_failed++;
        }
    }

    /* the order */

    if (queue == NGX_HTTP_OMNI_Q_DECODE) {
        /* longest processing time first */
        en->key = -(double) (en->prompt_tokens + en->output_tokens);

    } else if (ctx->mcf->queue_order == NGX_HTTP_OMNI_ORDER_FCFS) {
        en->key = (double) now;

    } else {
        /*
         * Shortest predicted work first, with aging: a request's priority
         * is its work minus AGING times the time it waited, i.e. work +
         * AGING * arrival minus a term that is the same for everyone, so the
         * order never needs re-sorting.  Work is the prefill time of the
         * tokens the best instance does not hold yet.
         */
        best = ngx_http_omni_best_uncached(ctx->mcf, sh, en->hashes,
                                           en->n_hashes, ctx->prompt_tokens,
                                           &i);

        work = omni_predict_prefill_us(sh->predict, (uint32_t) i,
                                       (uint32_t) best,
                                       (uint32_t) (ctx->prompt_tokens - best));
        en->work_us = work > 0 ? (uint64_t) work : 0;
        en->key = (double) en->work_us
                  + NGX_HTTP_OMNI_AGING * (double) now * 1000;
    }

    q = &sh->queues[queue];

    ngx_http_omni_heap_push(sh, q, e);
    q->n++;

    en->prev = q->tail;
    en->next = NGX_HTTP_OMNI_NONE;

    if (q->tail != NGX_HTTP_OMNI_NONE) {
        sh->entries[q->tail].next = e;
    } else {
        q->head = e;
    }

    q->tail = e;

    sh->held_total++;

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->qentry = e;
    ctx->qseq = en->seq;
    ctx->qstage = queue;

    ngx_queue_insert_tail(&ngx_http_omni_held_list, &ctx->held);

    /* a worker that holds requests keeps the safety tick: a releaser of
     * another configuration cannot reach its eventfd */
    ngx_http_omni_arm_timer(NGX_HTTP_OMNI_SAFETY_TICK);

    /* a client that goes away is noticed; the write event is our wake-up */
    r->read_event_handler = ngx_http_test_reading;
    ngx_add_timer(r->connection->write, ctx->mcf->queue_timeout);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni hold: entry %uD in queue %ui, key %.0f",
                   e, queue, en->key);

    ngx_http_omni_schedule(ctx->mcf);

    return NGX_DONE;
}


/*
 * Copy a released entry's binding into the request's legs: the load was
 * charged by whoever released it, the legs now own it.
 */
void
ngx_http_omni_adopt(ngx_http_omni_ctx_t *ctx, ngx_http_omni_qentry_t *en)
{
    ngx_uint_t                      t, i;
    ngx_http_omni_leg_t            *leg;
    ngx_http_omni_upstream_conf_t  *ucf;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        if (en->charge[t] == NULL) {
            continue;
        }

        ucf = ctx->mcf->tiers[t];
        leg = &ctx->legs[t];

        for (i = 0; ucf && i < ucf->n; i++) {
            if (ucf->slots[i] == en->slot[t]) {
                break;
            }
        }

        leg->tier = t;
        ngx_http_omni_ledger_adopt(leg, (ucf && i < ucf->n)
                                        ? i : NGX_HTTP_OMNI_NONE,
                                   en->charge[t]);
        en->charge[t] = NULL;
    }

    if (en->queue == NGX_HTTP_OMNI_Q_PREFILL) {
        ctx->t_released = en->released;
        ctx->cached_tokens = en->cached_tokens;
    }
}


/*
 * The owner's side of a wake-up.  NGX_OK: released, ctx->legs carry the
 * binding; NGX_AGAIN: still waiting; otherwise an answer went out (timeout).
 */
ngx_int_t
ngx_http_omni_held_wake(ngx_http_omni_ctx_t *ctx)
{
    uint32_t                 e, t;
    ngx_int_t                timedout;
    ngx_msec_t               waited;
    ngx_event_t             *wev;
    ngx_slab_pool_t         *shpool;
    ngx_http_request_t      *r;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t  *en;

    r = ctx->request;
    wev = r->connection->write;
    e = ctx->qentry;

    timedout = wev->timedout;
    wev->timedout = 0;

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);
    en = &sh->entries[e];

    ngx_shmtx_lock(&shpool->mutex);

    if (en->seq != ctx->qseq || en->state == NGX_HTTP_OMNI_QE_FREE) {
        ngx_shmtx_unlock(&shpool->mutex);
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "omni: queue entry %uD of request %*s was lost",
                      e, ctx->request_id_len, ctx->request_id);
        ctx->qentry = NGX_HTTP_OMNI_NONE;
        ngx_queue_remove(&ctx->held);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (en->state == NGX_HTTP_OMNI_QE_WAITING) {

        if (!timedout) {
            ngx_shmtx_unlock(&shpool->mutex);
            return NGX_AGAIN;
        }

        ngx_http_omni_queue_remove_locked(sh, shpool, e);
        ngx_http_omni_entry_free_locked(sh, shpool, e);
        sh->timed_out++;

        ngx_shmtx_unlock(&shpool->mutex);

        ctx->qentry = NGX_HTTP_OMNI_NONE;
        ngx_queue_remove(&ctx->held);

        waited = ngx_current_msec - ctx->t_start;

        ngx_http_omni_retry_after(r);

        ctx->error = "queue_timeout";
        return ngx_http_omni_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "server_error",
                                        "no instance could take the request "
                                        "within %M ms (omni_queue_timeout)",
                                        waited);
    }

    if (en->rejected) {
        ngx_http_omni_entry_free_locked(sh, shpool, e);
        ngx_shmtx_unlock(&shpool->mutex);

        ctx->qentry = NGX_HTTP_OMNI_NONE;
        ngx_queue_remove(&ctx->held);

        if (wev->timer_set) {
            ngx_del_timer(wev);
        }

        ngx_http_omni_retry_after(r);

        ctx->error = "no_instance";
        return ngx_http_omni_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "server_error",
                                        "no usable %s instance",
                                        ctx->qstage == NGX_HTTP_OMNI_Q_DECODE
                                        || ctx->mode
                                           == NGX_HTTP_OMNI_AGGREGATED
                                        ? "decode" : "prefill");
    }

    /* released: adopt the binding, charged by whoever released it */

    ngx_http_omni_adopt(ctx, en);

    ngx_http_omni_entry_free_locked(sh, shpool, e);

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->qentry = NGX_HTTP_OMNI_NONE;
    ngx_queue_remove(&ctx->held);

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        if (ctx->legs[t].state == NGX_HTTP_OMNI_LEG_RESERVED
            && ctx->legs[t].index == NGX_HTTP_OMNI_NONE)
        {
            /* bound by a worker of another configuration to an instance
             * this one does not have */
            ctx->legs[t].index = 0;
            ngx_http_omni_ledger_release(ctx->mcf, &ctx->legs[t],
                                         NGX_HTTP_OMNI_OUTCOME_NONE, 0);
            ctx->error = "stale_binding";
            return ngx_http_omni_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                            "server_error",
                                            "the instance chosen for the "
                                            "request left the configuration");
        }
    }

    return NGX_OK;
}


/* The request ends while held: take it out, give back what it was given. */
void
ngx_http_omni_unhold(ngx_http_omni_ctx_t *ctx)
{
    uint32_t                 e;
    ngx_slab_pool_t         *shpool;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t  *en;

    e = ctx->qentry;

    if (e == NGX_HTTP_OMNI_NONE) {
        return;
    }

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);
    en = &sh->entries[e];

    ngx_shmtx_lock(&shpool->mutex);

    if (en->seq == ctx->qseq) {
        if (en->state == NGX_HTTP_OMNI_QE_WAITING) {
            ngx_http_omni_queue_remove_locked(sh, shpool, e);

        } else if (en->state == NGX_HTTP_OMNI_QE_RELEASED) {
            ngx_http_omni_uncharge_locked(sh, shpool, en);
        }

        ngx_http_omni_entry_free_locked(sh, shpool, e);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->qentry = NGX_HTTP_OMNI_NONE;
    ngx_queue_remove(&ctx->held);

    /* the load it gave back may let someone else go */
    ngx_http_omni_schedule(ctx->mcf);
}


/* After the zone is unlocked: tell the owner of a released entry. */
void
ngx_http_omni_notify(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_qentry_t *e)
{
    uint64_t              one;
    ngx_http_omni_ctx_t  *ctx;

    if (e->pid == ngx_pid) {
        ctx = e->ctx;

        if (ctx->qentry != NGX_HTTP_OMNI_NONE && ctx->qseq == e->seq) {
            ngx_post_event(ctx->request->connection->write,
                           &ngx_posted_events);
        }

        return;
    }

    if (e->generation != ngx_http_omni_generation
        || e->worker >= mcf->n_wake_fds)
    {
        /* a worker of another configuration: its safety tick finds it */
        return;
    }

    one = 1;

    if (write(mcf->wake_fds[e->worker], &one, sizeof(one)) != sizeof(one)
        && ngx_errno != NGX_EAGAIN)
    {
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, ngx_errno,
                      "omni: could not wake worker %uD", e->worker);
    }
}


/* Wake this worker's held requests whose entries were released. */
static void
ngx_http_omni_post_released(void)
{
    ngx_queue_t            *q;
    ngx_http_omni_ctx_t    *ctx;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(ngx_http_omni_worker_mcf, NULL);

    for (q = ngx_queue_head(&ngx_http_omni_held_list);
         q != ngx_queue_sentinel(&ngx_http_omni_held_list);
         q = ngx_queue_next(q))
    {
        ctx = ngx_queue_data(q, ngx_http_omni_ctx_t, held);

        /* an unlocked peek; the owner looks again under the lock */
        if (sh->entries[ctx->qentry].state == NGX_HTTP_OMNI_QE_RELEASED) {
            ngx_post_event(ctx->request->connection->write,
                           &ngx_posted_events);
        }
    }
}


/* This worker's eventfd: some of its held requests were released. */
static void
ngx_http_omni_wake_handler(ngx_event_t *ev)
{
    uint64_t           n;
    ngx_connection_t  *c;

    c = ev->data;

    while (read(c->fd, &n, sizeof(n)) == sizeof(n)) {
        /* drain */
    }

    if (ngx_http_omni_worker_mcf != NULL) {
        ngx_http_omni_post_released();
    }
}


void
ngx_http_omni_arm_timer(ngx_msec_t after)
{
    ngx_msec_t  at;

    if (ngx_http_omni_timer.handler == NULL) {
        return;
    }

    at = ngx_current_msec + after;

    if (ngx_http_omni_timer.timer_set) {
        if ((ngx_msec_int_t) (ngx_http_omni_timer.timer.key - at) <= 0) {
            return;
        }

        ngx_del_timer(&ngx_http_omni_timer);
    }

    ngx_add_timer(&ngx_http_omni_timer, after);
}


static void
ngx_http_omni_timer_handler(ngx_event_t *ev)
{
    if (ngx_http_omni_worker_mcf == NULL) {
        return;
    }

    ngx_http_omni_schedule(ngx_http_omni_worker_mcf);

    /* held requests are looked after even when nothing else happens */
    if (!ngx_queue_empty(&ngx_http_omni_held_list)) {
        ngx_http_omni_post_released();
        ngx_http_omni_arm_timer(NGX_HTTP_OMNI_SAFETY_TICK);
    }
}


ngx_int_t
ngx_http_omni_init_module(ngx_cycle_t *cycle)
{
    ngx_uint_t                  i, n;
    ngx_core_conf_t            *ccf;
    ngx_pool_cleanup_t         *cln;
    ngx_http_omni_main_conf_t  *mcf;

    if (ngx_http_cycle_get_module_main_conf(cycle, ngx_http_core_module)
        == NULL)
    {
        return NGX_OK;
    }

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_omni_module);

    if (mcf == NULL || mcf->shm_zone == NULL) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    n = ngx_min((ngx_uint_t) ngx_max(ccf->worker_processes, 1),
                NGX_HTTP_OMNI_MAX_WORKERS);

    mcf->wake_fds = ngx_pcalloc(cycle->pool, n * sizeof(ngx_fd_t));
    if (mcf->wake_fds == NULL) {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(cycle->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_omni_close_fds;
    cln->data = mcf;

    for (i = 0; i < n; i++) {
        mcf->wake_fds[i] = eventfd(0, EFD_NONBLOCK);

        if (mcf->wake_fds[i] == -1) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "omni: eventfd() failed");
            return NGX_ERROR;
        }

        mcf->n_wake_fds = i + 1;
    }

    return NGX_OK;
}


static void
ngx_http_omni_close_fds(void *data)
{
    ngx_http_omni_main_conf_t  *mcf = data;

    ngx_uint_t  i;

    for (i = 0; i < mcf->n_wake_fds; i++) {
        (void) close(mcf->wake_fds[i]);
    }

    mcf->n_wake_fds = 0;
}


ngx_int_t
ngx_http_omni_init_process(ngx_cycle_t *cycle)
{
    uint32_t                    e, t;
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh;
    ngx_http_omni_qentry_t     *en;
    ngx_http_omni_main_conf_t  *mcf;

    ngx_queue_init(&ngx_http_omni_held_list);

    if (ngx_http_cycle_get_module_main_conf(cycle, ngx_http_core_module)
        == NULL)
    {
        return NGX_OK;
    }

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_omni_module);

    if (mcf == NULL || mcf->shm_zone == NULL) {
        return NGX_OK;
    }

    ngx_http_omni_worker_mcf = mcf;

    ngx_http_omni_timer.handler = ngx_http_omni_timer_handler;
    ngx_http_omni_timer.log = cycle->log;
    ngx_http_omni_timer.data = mcf;
    ngx_http_omni_timer.cancelable = 1;

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    ngx_http_omni_generation = sh->generation;

    /*
     * What processes that died (a crashed worker, respawned as this one)
     * held is given back: their charges and requests by the ledger, their
     * entries here.  The charges of their released entries were theirs.
     */

    (void) ngx_http_omni_ledger_start_locked(sh, shpool);

    for (e = 0; e < sh->q_cap; e++) {
        en = &sh->entries[e];

        if (en->state == NGX_HTTP_OMNI_QE_FREE
            || !ngx_http_omni_ledger_gone_locked(sh, en->pid))
        {
            continue;
        }

        if (en->state == NGX_HTTP_OMNI_QE_WAITING) {
            ngx_http_omni_queue_remove_locked(sh, shpool, e);
        }

        for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
            /* bound after its owner was reaped: in no owner's list */
            if (en->charge[t] && ngx_queue_next(&en->charge[t]->link)
                                 == &en->charge[t]->link)
            {
                ngx_http_omni_ledger_unbind_locked(sh, shpool,
                                                   en->charge[t]);
            }
        }

        ngx_http_omni_entry_free_locked(sh, shpool, e);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (ngx_worker < mcf->n_wake_fds
        && ngx_add_channel_event(cycle, mcf->wake_fds[ngx_worker],
                                 NGX_READ_EVENT, ngx_http_omni_wake_handler)
           != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "omni: could not watch the wake-up eventfd");
        return NGX_ERROR;
    }

    return NGX_OK;
}
