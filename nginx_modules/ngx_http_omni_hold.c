/*
 * Omni Proxy nginx module: holding requests and waking their owners.
 *
 * With `omni_schedule_policy omni`, a request does not go to an engine when
 * it arrives: it waits in a queue (ngx_http_omni_queue.c) until the release
 * loop (ngx_http_omni_schedule(), here) finds an instance that can take it
 * (the decisions: ngx_http_omni_sched.c), and is bound to it only then.
 *
 * Any worker may release any worker's request.  The releasing worker charges
 * the chosen instance for the request's owner (the ledger) and marks the
 * entry released under the zone lock; the owner is woken by its eventfd (one
 * per worker, created by the master before the fork) or, for its own
 * requests, by posting the request's write event, and adopts the charges.
 * Nothing polls while idle: a worker that holds requests keeps one timer, at
 * the scheduler's predicted instant or a 250 ms safety tick, whichever comes
 * first.  Nothing here answers a client: the request flow does, from the
 * codes these functions return.
 */


#include <sys/eventfd.h>

#include <ngx_channel.h>

#include "ngx_http_omni.h"


#define NGX_HTTP_OMNI_SAFETY_TICK    250
/* released per pass of the loop before owners are told */
#define NGX_HTTP_OMNI_BATCH          64


static void ngx_http_omni_arm_timer(ngx_msec_t after);
static void ngx_http_omni_notify(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_qentry_t *e);
static void ngx_http_omni_adopt(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_qentry_t *en);
static void ngx_http_omni_post_released(void);
static void ngx_http_omni_wake_handler(ngx_event_t *ev);
static void ngx_http_omni_timer_handler(ngx_event_t *ev);
static void ngx_http_omni_reaper_handler(ngx_event_t *ev);


/* how often a worker looks for processes that died with no successor */
#define NGX_HTTP_OMNI_REAP_TICK  1000
static void ngx_http_omni_schedule_pass(ngx_http_omni_main_conf_t *mcf,
    ngx_uint_t changed);


/* per worker process */
static ngx_queue_t                 ngx_http_omni_held_list;
static ngx_event_t                 ngx_http_omni_timer;
static ngx_event_t                 ngx_http_omni_reaper;
static ngx_http_omni_main_conf_t  *ngx_http_omni_worker_mcf;
static uint64_t                    ngx_http_omni_generation;


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


/*
 * Hold a request in `queue`.  NGX_DONE: held (its write event wakes it);
 * NGX_DECLINED: the queues are full, NGX_BUSY: refused early, the queue
 * cannot meet any SLO (the flow answers 429; ctx->retry_after_s set).
 */
ngx_int_t
ngx_http_omni_hold(ngx_http_omni_ctx_t *ctx, ngx_uint_t queue)
{
    uint32_t                 e;
    ngx_slab_pool_t         *shpool;
    ngx_http_request_t      *r;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t  *en;

    r = ctx->request;
    sh = ngx_http_omni_shm(ctx->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    e = ngx_http_omni_entry_alloc_locked(sh, ctx->mcf->queue_max);

    if (e == NGX_HTTP_OMNI_NONE) {
        sh->rejected_full++;
        ctx->retry_after_s = ngx_http_omni_retry_after_locked(ctx->mcf, sh,
                                                              ngx_current_msec);
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_DECLINED;
    }

    en = &sh->entries[e];

    en->state = NGX_HTTP_OMNI_QE_WAITING;
    en->queue = (uint8_t) queue;
    en->route = (uint8_t) ctx->route;
    en->mode = (uint8_t) ctx->mode;
    en->worker = (uint32_t) ngx_worker;
    en->pid = ngx_pid;
    en->generation = ngx_http_omni_generation;
    en->ctx = ctx;
    en->arrival = ngx_current_msec;
    en->prompt_tokens = ctx->prompt_tokens;
    en->output_tokens = ctx->output_tokens;
    en->front_us = ngx_http_omni_front_us(ctx);
    en->deadline_us = ctx->slo_ttft_us && queue == NGX_HTTP_OMNI_Q_PREFILL
                      ? (uint64_t) en->arrival * 1000 + ctx->slo_ttft_us : 0;
    en->tpot_us = ctx->slo_tpot_us;

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

    ngx_http_omni_queue_key_locked(ctx->mcf, sh, en);

    if (queue == NGX_HTTP_OMNI_Q_PREFILL
        && ngx_http_omni_slo_admit_locked(ctx->mcf, sh, en, en->arrival,
                                          &ctx->retry_after_s)
           == NGX_DECLINED)
    {
        /* the early 429: the queue cannot meet any SLO */
        ngx_http_omni_entry_free_locked(sh, shpool, e);
        sh->rejected_slo++;
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_BUSY;
    }

    ngx_http_omni_queue_insert_locked(sh, e);

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

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni hold: entry %uD in queue %ui", e, queue);

    /* an arrival: only the new entry (and a new head) need a decision */
    ngx_http_omni_schedule_pass(ctx->mcf, 0);

    return NGX_DONE;
}


/*
 * Copy a released entry's binding into the request's legs: the load was
 * charged by whoever released it, the legs now own it.
 */
static void
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
        ctx->release_reason = en->reason;
    }
}


/*
 * The owner's side of a wake-up.  NGX_OK: released, ctx->legs carry the
 * binding; NGX_AGAIN: still waiting; NGX_HTTP_SERVICE_UNAVAILABLE: it will
 * not be (ctx->error says why: queue_timeout, no_instance, stale_binding);
 * NGX_HTTP_INTERNAL_SERVER_ERROR: its entry was lost.  The flow answers.
 */
ngx_int_t
ngx_http_omni_held_wake(ngx_http_omni_ctx_t *ctx)
{
    uint32_t                 e, t;
    ngx_int_t                timedout;
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
        ctx->retry_after_s = ngx_http_omni_retry_after_locked(ctx->mcf, sh,
                                                              ngx_current_msec);

        ngx_shmtx_unlock(&shpool->mutex);

        ctx->qentry = NGX_HTTP_OMNI_NONE;
        ngx_queue_remove(&ctx->held);

        ctx->error = "queue_timeout";
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    if (en->rejected) {
        ngx_http_omni_entry_free_locked(sh, shpool, e);
        ngx_shmtx_unlock(&shpool->mutex);

        ctx->qentry = NGX_HTTP_OMNI_NONE;
        ngx_queue_remove(&ctx->held);

        if (wev->timer_set) {
            ngx_del_timer(wev);
        }

        ctx->error = "no_instance";
        return NGX_HTTP_SERVICE_UNAVAILABLE;
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
            return NGX_HTTP_SERVICE_UNAVAILABLE;
        }
    }

    return NGX_OK;
}


/* The request ends while held: take it out, give back what it was given. */
void
ngx_http_omni_unhold(ngx_http_omni_ctx_t *ctx)
{
    uint32_t                 e;
    ngx_uint_t               changed;
    ngx_slab_pool_t         *shpool;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t  *en;

    e = ctx->qentry;

    if (e == NGX_HTTP_OMNI_NONE) {
        return;
    }

    changed = 0;

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);
    en = &sh->entries[e];

    ngx_shmtx_lock(&shpool->mutex);

    if (en->seq == ctx->qseq) {
        if (en->state == NGX_HTTP_OMNI_QE_WAITING) {
            ngx_http_omni_queue_remove_locked(sh, shpool, e);

        } else if (en->state == NGX_HTTP_OMNI_QE_RELEASED) {
            ngx_http_omni_uncharge_locked(sh, shpool, en);
            changed = 1;
        }

        ngx_http_omni_entry_free_locked(sh, shpool, e);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ctx->qentry = NGX_HTTP_OMNI_NONE;
    ngx_queue_remove(&ctx->held);

    /* the load it gave back may let someone else go; a waiting one gave
     * back nothing (the queue's own change is seen by the decisions) */
    ngx_http_omni_schedule_pass(ctx->mcf, changed);
}


/* After the zone is unlocked: tell the owner of a released entry. */
static void
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
    uint64_t                 n;
    ngx_int_t                i, k;
    ngx_slab_pool_t         *shpool;
    ngx_connection_t        *c;
    ngx_http_omni_ctx_t     *ctx;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t  *en;
    uint32_t                 entries[NGX_HTTP_OMNI_WAKE_RING];
    uint32_t                 seqs[NGX_HTTP_OMNI_WAKE_RING];

    c = ev->data;

    while (read(c->fd, &n, sizeof(n)) == sizeof(n)) {
        /* drain */
    }

    if (ngx_http_omni_worker_mcf == NULL) {
        return;
    }

    sh = ngx_http_omni_shm(ngx_http_omni_worker_mcf, &shpool);

    /* notes are by worker number: an older configuration's looks at all */
    k = ngx_http_omni_generation == sh->generation
        ? ngx_http_omni_wake_take(sh, shpool, ngx_worker, entries, seqs)
        : NGX_ERROR;

    if (k == NGX_ERROR) {
        ngx_http_omni_post_released();
        return;
    }

    /* the entries released for it (only this process frees them) */
    for (i = 0; i < k; i++) {
        en = &sh->entries[entries[i]];

        if (en->pid != ngx_pid || (uint32_t) en->seq != seqs[i]
            || en->state != NGX_HTTP_OMNI_QE_RELEASED)
        {
            continue;
        }

        ctx = en->ctx;

        if (ctx->qentry == entries[i] && ctx->qseq == en->seq) {
            ngx_post_event(ctx->request->connection->write,
                           &ngx_posted_events);
        }
    }
}


static void
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

    /* the clock: decisions past their retry instant are made again */
    ngx_http_omni_schedule_pass(ngx_http_omni_worker_mcf, 0);

    /* held requests are looked after even when nothing else happens */
    if (!ngx_queue_empty(&ngx_http_omni_held_list)) {
        ngx_http_omni_post_released();
        ngx_http_omni_arm_timer(NGX_HTTP_OMNI_SAFETY_TICK);
    }
}


ngx_int_t
ngx_http_omni_init_process(ngx_cycle_t *cycle)
{
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh;
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

    if (ngx_http_omni_slo_init(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_omni_timer.handler = ngx_http_omni_timer_handler;
    ngx_http_omni_timer.log = cycle->log;
    ngx_http_omni_timer.data = mcf;
    ngx_http_omni_timer.cancelable = 1;

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    ngx_http_omni_generation = sh->generation;

    /*
     * What processes that died (a crashed worker, respawned as this one)
     * held is given back: their entries, then their charges and requests.
     */

    (void) ngx_http_omni_queue_reap_locked(sh, shpool, 1);
    (void) ngx_http_omni_ledger_start_locked(sh, shpool);

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_http_omni_reaper.handler = ngx_http_omni_reaper_handler;
    ngx_http_omni_reaper.log = cycle->log;
    ngx_http_omni_reaper.data = mcf;
    ngx_http_omni_reaper.cancelable = 1;
    ngx_add_timer(&ngx_http_omni_reaper, NGX_HTTP_OMNI_REAP_TICK);

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


/*
 * The fast path of holding: nobody waits in `queue` and an instance can
 * take the request now, so it is bound at once, without a queue entry or a
 * wake-up.  NGX_OK: bound (the legs carry it); NGX_DECLINED: hold it.
 */
ngx_int_t
ngx_http_omni_start_now(ngx_http_omni_ctx_t *ctx, ngx_uint_t queue)
{
    uint64_t                 now_us, retry_us;
    ngx_int_t                rc;
    ngx_msec_t               now;
    ngx_slab_pool_t         *shpool;
    ngx_http_omni_shctx_t   *sh;
    ngx_http_omni_qentry_t   en;

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);

    /* an unlocked look first; a request to start is counted as an arrival
     * under the lock below either way */
    if (queue == NGX_HTTP_OMNI_Q_DECODE && sh->queues[queue].n) {
        return NGX_DECLINED;
    }

    ngx_memzero(&en, sizeof(ngx_http_omni_qentry_t));

    now = ngx_current_msec;
    en.queue = (uint8_t) queue;
    en.arrival = now;
    en.released = now;
    en.prompt_tokens = ctx->prompt_tokens;
    en.output_tokens = ctx->output_tokens;
    en.front_us = ngx_http_omni_front_us(ctx);
    en.hashes = ctx->hashes;            /* this process's memory: used */
    en.n_hashes = (uint32_t) ctx->n_hashes;     /* only under this lock */
    en.slot[0] = NGX_HTTP_OMNI_NONE;
    en.slot[1] = NGX_HTTP_OMNI_NONE;
    en.pid = ngx_pid;
    en.deadline_us = ctx->slo_ttft_us && queue == NGX_HTTP_OMNI_Q_PREFILL
                     ? (uint64_t) now * 1000 + ctx->slo_ttft_us : 0;
    en.tpot_us = ctx->slo_tpot_us;
    en.reason = NGX_HTTP_OMNI_REL_NOW;

    retry_us = 0;
    rc = NGX_DECLINED;

    ngx_shmtx_lock(&shpool->mutex);

    now_us = ngx_http_omni_now_us();

    if (queue == NGX_HTTP_OMNI_Q_PREFILL) {
        ngx_http_omni_arrived(sh, now_us);
    }

    /* the order of arrival holds: only when nobody is waiting */

    if (queue == NGX_HTTP_OMNI_Q_DECODE) {
        if (sh->queues[queue].n == 0
            && ngx_http_omni_bind_decode(ctx->mcf, sh, shpool, &en, now)
               == NGX_OK)
        {
            rc = NGX_OK;
        }

    } else if (sh->queues[queue].n == 0
        && ngx_http_omni_tier_usable(ctx->mcf, sh,
                                     ngx_http_omni_start_tier(ctx->mcf), now)
        && (ctx->mode != NGX_HTTP_OMNI_PARALLEL
            || ngx_http_omni_tier_usable(ctx->mcf, sh, NGX_HTTP_OMNI_DECODE,
                                         now)))
    {
        if (ngx_http_omni_bind_start(ctx->mcf, sh, shpool, &en, now, now_us,
                                     &retry_us, 1, 1)
            == NGX_OK)
        {
            sh->decisions++;
            sh->decision_us += ngx_http_omni_now_us() - now_us;
            sh->released[NGX_HTTP_OMNI_REL_NOW]++;
            sh->sched_epoch++;
            rc = NGX_OK;
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (rc == NGX_OK) {
        ngx_http_omni_adopt(ctx, &en);
    }

    return rc;
}


/*
 * Something a held request's decision depends on changed (an instance's
 * load, health or predicted work; the caller changed it): decide again.
 */
void
ngx_http_omni_schedule(ngx_http_omni_main_conf_t *mcf)
{
    ngx_http_omni_schedule_pass(mcf, 1);
}


static void
ngx_http_omni_schedule_pass(ngx_http_omni_main_conf_t *mcf,
    ngx_uint_t changed)
{
    uint32_t                 e, cand;
    uint64_t                 t0, now_us, retry_us;
    ngx_int_t                rc;
    uint32_t                 firsts[OMNI_POLICY_LOOKAHEAD];
    ngx_uint_t               q, n, i, k, m, more, attempts;
    ngx_msec_t               now;
    ngx_slab_pool_t         *shpool;
    ngx_http_omni_queue_t   *queue;
    ngx_http_omni_shctx_t   *sh;
    ngx_uint_t               slo;
    omni_slo_item_t          item;
    omni_queue_opts_t        qo;
    ngx_http_omni_qentry_t  *en, out[NGX_HTTP_OMNI_BATCH];

    if (mcf->schedule_policy != NGX_HTTP_OMNI_SCHED_OMNI) {
        return;
    }

    sh = ngx_http_omni_shm(mcf, &shpool);

    do {
        /* an unlocked look first: most calls find nothing waiting */
        if (sh->queues[NGX_HTTP_OMNI_Q_PREFILL].n == 0
            && sh->queues[NGX_HTTP_OMNI_Q_DECODE].n == 0)
        {
            return;
        }

        n = 0;
        more = 0;
        attempts = 0;
        retry_us = 0;

        ngx_shmtx_lock(&shpool->mutex);

        t0 = ngx_http_omni_now_us();
        now_us = t0;
        now = ngx_current_msec;

        if (changed) {
            sh->sched_epoch++;
            changed = 0;
        }

        if (sh->queues[NGX_HTTP_OMNI_Q_PREFILL].n
            && now_us >= sh->rekey_us + NGX_HTTP_OMNI_REKEY_US)
        {
            ngx_http_omni_queue_rekey_locked(mcf, sh, now_us);
        }

        for (q = 0; q < NGX_HTTP_OMNI_QUEUES && n < NGX_HTTP_OMNI_BATCH; q++) {
            queue = &sh->queues[q];

            while (n < NGX_HTTP_OMNI_BATCH) {
                e = ngx_http_omni_release_next_locked(mcf, sh, q, now);
                if (e == NGX_HTTP_OMNI_NONE) {
                    break;
                }

                if (q == NGX_HTTP_OMNI_Q_PREFILL
                    && sh->entries[e].mode != mcf->pd_policy)
                {
                    /*
                     * Held under another P/D policy (a reload changed it):
                     * no binding this worker makes fits it.  One of the
                     * newest configuration is left to its workers; an
                     * older one is answered 503 with Retry-After by its
                     * owner (never bound for the wrong tier).
                     */
                    if (sh->entries[e].generation == sh->generation) {
                        break;
                    }

                    sh->entries[e].rejected = 1;
                    sh->sched_epoch++;
                    rc = NGX_OK;

                } else if (!ngx_http_omni_tier_usable(mcf, sh,
                        q == NGX_HTTP_OMNI_Q_DECODE
                        ? NGX_HTTP_OMNI_DECODE
                        : ngx_http_omni_start_tier(mcf), now)
                    || (q == NGX_HTTP_OMNI_Q_PREFILL
                        && mcf->pd_policy == NGX_HTTP_OMNI_PARALLEL
                        && !ngx_http_omni_tier_usable(mcf, sh,
                                                      NGX_HTTP_OMNI_DECODE,
                                                      now)))
                {
                    /* nothing could take it: the owner answers 503 */
                    sh->entries[e].rejected = 1;
                    sh->sched_epoch++;
                    rc = NGX_OK;

                } else if (q == NGX_HTTP_OMNI_Q_DECODE) {
                    rc = ngx_http_omni_decide_decode(mcf, sh, shpool, e,
                                                     now, now_us, &attempts);

                } else {
                    rc = ngx_http_omni_decide_start(mcf, sh, shpool, e,
                                                    now, now_us, &retry_us,
                                                    queue->n, 0, &attempts);

                    /*
                     * The head waits for a busy instance that will serve it
                     * best: a few entries behind it may use what is free;
                     * if none does, the head takes it.  From heap[0]: the
                     * entry deciding may be a starved one, and then the
                     * shortest is among the others.
                     */
                    slo = queue->n_slo != 0;
                    cand = e;
                    m = (rc == NGX_BUSY && !slo)
                        ? ngx_http_omni_queue_firsts_locked(sh, q, firsts,
                                                      OMNI_POLICY_LOOKAHEAD)
                        : 0;

                    for (k = slo ? 1 : 0;
                         rc == NGX_BUSY && k < OMNI_POLICY_LOOKAHEAD
                         && k < (slo ? queue->n : m);
                         k++)
                    {
                        /* in the queue's order (the heap's array is not:
                         * a long request deep in it was offered a free
                         * instance before shorter ones); with SLOs, the
                         * next by the same rule: the order would offer the
                         * free instance to a lost request before one that
                         * can still make it */
                        cand = slo ? ngx_http_omni_slo_again_locked(mcf, sh,
                                                                    cand, now)
                                   : firsts[k];

                        if (cand == NGX_HTTP_OMNI_NONE) {
                            break;
                        }

                        if (cand == e) {
                            continue;
                        }

                        if (!slo) {
                            sh->entries[cand].reason =
                                                    NGX_HTTP_OMNI_REL_ORDER;
                        }

                        rc = ngx_http_omni_decide_start(mcf, sh, shpool,
                                                        cand, now, now_us,
                                                        &retry_us, queue->n,
                                                        0, &attempts);
                        if (rc == NGX_OK) {
                            e = cand;
                        } else if (rc == NGX_AGAIN) {
                            rc = NGX_BUSY;
                        }
                    }

                    if (rc == NGX_BUSY) {
                        rc = ngx_http_omni_decide_start(mcf, sh, shpool, e,
                                                        now, now_us,
                                                        &retry_us, queue->n,
                                                        1, &attempts);
                    }
                }

                if (rc != NGX_OK) {
                    break;
                }

                en = &sh->entries[e];

                ngx_http_omni_queue_opts(mcf, sh, q, &qo);

                if (q == NGX_HTTP_OMNI_Q_PREFILL && en->deadline_us) {
                    item.arrival_us = (uint64_t) en->arrival * 1000;
                    item.work_us = en->work_us;
                    item.deadline_us = en->deadline_us;
                    item.seq = en->seq;

                    if (omni_policy_slo_starved(&qo, &item,
                                                (uint64_t) now * 1000))
                    {
                        sh->starved++;
                    }

                } else if (queue->n && e != queue->heap[0]
                    && omni_policy_starved(&qo, (uint64_t) en->arrival * 1000,
                                           en->starve_us,
                                           (uint64_t) now * 1000))
                {
                    sh->starved++;
                }

                if (q == NGX_HTTP_OMNI_Q_PREFILL
                    && en->reason < NGX_HTTP_OMNI_RELEASE_REASONS)
                {
                    sh->released[en->reason]++;
                }

                ngx_http_omni_queue_remove_locked(sh, shpool, e);
                en->state = NGX_HTTP_OMNI_QE_RELEASED;
                en->released = now;

                if (en->pid != ngx_pid && en->generation == sh->generation) {
                    ngx_http_omni_wake_push_locked(sh, e);  /* for its owner */
                }

                out[n++] = *en;
            }

            if (n == NGX_HTTP_OMNI_BATCH) {
                more = 1;
            }
        }

        sh->decisions += attempts;
        sh->decision_us += ngx_http_omni_now_us() - t0;

        ngx_shmtx_unlock(&shpool->mutex);

        for (i = 0; i < n; i++) {
            ngx_http_omni_notify(mcf, &out[i]);
        }

        if (retry_us) {
            ngx_http_omni_arm_timer((ngx_msec_t) (retry_us / 1000) + 1);
        }

    } while (more);
}


/*
 * A worker killed after a reload (an old worker finishing its requests) or
 * one the master does not respawn has no successor whose start would give
 * back what it held: every worker looks for such processes once a second.
 */
static void
ngx_http_omni_reaper_handler(ngx_event_t *ev)
{
    ngx_uint_t                  dead;
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh;
    ngx_http_omni_main_conf_t  *mcf;

    mcf = ev->data;
    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    dead = ngx_http_omni_queue_reap_locked(sh, shpool, 0);
    ngx_shmtx_unlock(&shpool->mutex);

    if (dead) {
        /* what they held may let a held request go */
        ngx_http_omni_schedule(mcf);
    }

    if (!ngx_exiting && !ngx_quit && !ngx_terminate) {
        ngx_add_timer(ev, NGX_HTTP_OMNI_REAP_TICK);
    }
}
