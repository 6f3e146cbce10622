/*
 * Omni Proxy nginx module: the load ledger.
 *
 * One charge and one release for every way a leg can end.  A charge is a
 * record in the shared zone that holds, for one leg on one instance:
 *
 *   - its load (inflight_requests, inflight_tokens),
 *   - for the leg that carries the request's prefill, the predictor's job
 *     (prefills in flight, predicted pending work) and, in aggregated mode,
 *     the instance's `prefilling` count.
 *
 * All of it is added by ngx_http_omni_ledger_bind_locked() and removed by
 * ngx_http_omni_ledger_unbind_locked(), together, so it follows the instance
 * the leg really uses: a retry to another instance unbinds and binds anew.
 * The prefill part may end earlier (the first byte of an aggregated leg:
 * ngx_http_omni_ledger_prefill_end_locked()); the rest waits for the leg.
 *
 * Every record belongs to a process (its owner: the process whose request
 * it is) and is linked into that owner's list in the zone, as are the
 * owner's main requests in flight.  When a process dies without giving back
 * what it held, the next process that starts (the respawned worker, or the
 * workers of a reload) finds the dead owner and gives it all back; so does
 * every worker once a second (an old worker killed after a reload has no
 * successor).
 *
 * Callers hold the zone lock for the _locked functions; the others take it.
 * This file calls only the zone (ngx_http_omni_shm.c) and the library.
 */


#include <signal.h>

#include "ngx_http_omni.h"


/* this process's record in the zone's owner table, NULL: none */
static ngx_http_omni_owner_t  *ngx_http_omni_me;


static ngx_uint_t
ngx_http_omni_pid_dead(ngx_pid_t pid)
{
    if (pid == ngx_pid) {
        return 0;
    }

    /* EPERM: alive, just not ours to signal */
    return kill(pid, 0) == -1 && ngx_errno == NGX_ESRCH;
}


/* The owner table's record of pid, or NULL. */
static ngx_http_omni_owner_t *
ngx_http_omni_owner(ngx_http_omni_shctx_t *sh, ngx_pid_t pid)
{
    ngx_uint_t  i;

    for (i = 0; i < NGX_HTTP_OMNI_OWNERS; i++) {
        if (sh->owners[i].pid == pid) {
            return &sh->owners[i];
        }
    }

    return NULL;
}


/*
 * Give back everything a dead owner held: each charge (load, predictor job,
 * prefilling) and its main requests in flight.  Its queue entries are the
 * queue's to free (ngx_http_omni_queue_reap_locked()).
 */
static void
ngx_http_omni_reap_owner_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_omni_owner_t *o)
{
    ngx_uint_t               n;
    ngx_queue_t             *q;
    ngx_http_omni_charge_t  *ch;

    n = 0;

    while (!ngx_queue_empty(&o->charges)) {
        q = ngx_queue_head(&o->charges);
        ch = ngx_queue_data(q, ngx_http_omni_charge_t, link);
        ngx_http_omni_ledger_unbind_locked(sh, shpool, ch);
        n++;
    }

    sh->inflight_requests -= ngx_min(sh->inflight_requests, o->requests);

    if (n || o->requests) {
        /* (an old worker that finished its requests and exited: quiet) */
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "omni: process %P exited holding %ui charges and %uL "
                      "requests: given back", o->pid, n, o->requests);
    }

    sh->reaped_total += n;

    o->pid = 0;
    o->requests = 0;
}


/*
 * Whether the process `pid` of an owner record or a queue entry is gone.
 * `starting`: this process is starting, so a record with its own pid is a
 * dead predecessor's (the pid was reused); otherwise it is this process's.
 */
ngx_uint_t
ngx_http_omni_ledger_dead(ngx_pid_t pid, ngx_uint_t starting)
{
    if (pid == 0) {
        return 0;
    }

    if (pid == ngx_pid) {
        return starting;
    }

    return ngx_http_omni_pid_dead(pid);
}


/*
 * Give back what dead owners held (see ngx_http_omni_ledger_dead() for
 * `starting`).  Returns the number of dead owners found.  Their queue
 * entries are the queue's to free first (ngx_http_omni_queue_reap_locked()).
 */
ngx_uint_t
ngx_http_omni_ledger_reap_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_uint_t starting)
{
    ngx_uint_t              i, dead;
    ngx_http_omni_owner_t  *o;

    dead = 0;

    for (i = 0; i < NGX_HTTP_OMNI_OWNERS; i++) {
        o = &sh->owners[i];

        if (o == ngx_http_omni_me
            || !ngx_http_omni_ledger_dead(o->pid, starting))
        {
            continue;
        }

        if (o->charges.next == NULL) {
            ngx_queue_init(&o->charges);
        }

        ngx_http_omni_reap_owner_locked(sh, shpool, o);
        dead++;
    }

    return dead;
}


/*
 * This process starts: give back what dead processes held, then take a
 * record in the owner table.  Returns the number of dead owners found.
 */
ngx_uint_t
ngx_http_omni_ledger_start_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool)
{
    ngx_uint_t              i, dead;
    ngx_http_omni_owner_t  *o, *free_o;

    ngx_http_omni_me = NULL;

    dead = ngx_http_omni_ledger_reap_locked(sh, shpool, 1);

    free_o = NULL;

    for (i = 0; i < NGX_HTTP_OMNI_OWNERS; i++) {
        o = &sh->owners[i];

        if (o->pid == 0) {
            free_o = o;
            break;
        }
    }

    ngx_http_omni_me = free_o;

    if (free_o == NULL) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "omni: more than %d processes use the zone: what "
                      "this one holds is not given back if it crashes",
                      NGX_HTTP_OMNI_OWNERS);
        return dead;
    }

    free_o->pid = ngx_pid;
    free_o->requests = 0;
    ngx_queue_init(&free_o->charges);

    return dead;
}


ngx_pid_t
ngx_http_omni_ledger_self(void)
{
    return ngx_http_omni_me ? ngx_pid : 0;
}


/*
 * Charge instance `slot` with what `spec` says, for a request of process
 * `pid`.  NULL: the zone has no memory for the record (nothing charged).
 */
ngx_http_omni_charge_t *
ngx_http_omni_ledger_bind_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_pid_t pid, uint32_t slot,
    ngx_http_omni_spec_t *spec, uint64_t now_us)
{
    ngx_http_omni_inst_t    *in;
    ngx_http_omni_owner_t   *o;
    ngx_http_omni_charge_t  *ch;

    if (slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
        return NULL;
    }

    ch = ngx_slab_calloc_locked(shpool, sizeof(ngx_http_omni_charge_t));
    if (ch == NULL) {
        return NULL;
    }

    ch->pid = pid;
    ch->slot = slot;
    ch->spec = *spec;

    o = pid ? ngx_http_omni_owner(sh, pid) : NULL;

    if (o) {
        ngx_queue_insert_tail(&o->charges, &ch->link);

    } else {
        ngx_queue_init(&ch->link);
    }

    in = &sh->inst[slot];

    in->inflight_requests++;
    in->inflight_tokens += spec->tokens;
    in->requests_total++;
    in->tokens_total += spec->tokens;
    in->last_seen = ngx_current_msec;

    if ((spec->flags & NGX_HTTP_OMNI_CHARGE_JOB)
        && omni_predict_prefill_dispatch(sh->predict, slot, spec->uncached,
                                         spec->cached, now_us, &ch->job)
           == OMNI_OK)
    {
        ch->flags |= NGX_HTTP_OMNI_CHARGE_JOB;

        if (spec->end_hash) {
            (void) omni_predict_prefill_expect(sh->predict, slot, &ch->job,
                                               spec->end_hash);
        }

        /* what holding compares the next binding with */
        in->last_service_us = ch->job.service_us;
        in->last_done_us = ch->job.done_us - ch->job.tail_us;
        in->last_start_us = ch->job.start_us;
    }

    if (spec->flags & NGX_HTTP_OMNI_CHARGE_PREFILLING) {
        ch->flags |= NGX_HTTP_OMNI_CHARGE_PREFILLING;
        in->prefilling++;
        in->prefilling_tokens += spec->uncached;
    }

    return ch;
}


/* The prefill part of a charge is over (ok: it succeeded, learn from it). */
void
ngx_http_omni_ledger_prefill_end_locked(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_charge_t *ch, ngx_uint_t ok)
{
    ngx_http_omni_inst_t  *in;

    in = &sh->inst[ch->slot];

    if (ch->flags & NGX_HTTP_OMNI_CHARGE_JOB) {
        (void) omni_predict_prefill_done(sh->predict, ch->slot, &ch->job,
                                         ngx_http_omni_now_us(), ok ? 1 : 0);
    }

    if (ch->flags & NGX_HTTP_OMNI_CHARGE_PREFILLING) {
        in->prefilling -= ngx_min(in->prefilling, 1);
        in->prefilling_tokens -= ngx_min(in->prefilling_tokens,
                                         ch->spec.uncached);
    }

    ch->flags &= ~(NGX_HTTP_OMNI_CHARGE_JOB|NGX_HTTP_OMNI_CHARGE_PREFILLING);
}


/* Give back all a charge still holds and free its record. */
void
ngx_http_omni_ledger_unbind_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_omni_charge_t *ch)
{
    ngx_http_omni_inst_t  *in;

    ngx_http_omni_ledger_prefill_end_locked(sh, ch, 0);

    in = &sh->inst[ch->slot];

    in->inflight_requests -= ngx_min(in->inflight_requests, 1);
    in->inflight_tokens -= ngx_min(in->inflight_tokens, ch->spec.tokens);
    in->last_seen = ngx_current_msec;

    ngx_queue_remove(&ch->link);
    ngx_slab_free_locked(shpool, ch);
}


/* ------------------------------------------------------------------------ */
/* legs                                                                     */


/* A leg takes a charge made for its request (by whichever process bound
 * it): the leg is reserved on that instance. */
void
ngx_http_omni_ledger_adopt(ngx_http_omni_leg_t *leg, ngx_uint_t index,
    ngx_http_omni_charge_t *ch)
{
    leg->charge = ch;
    leg->spec = ch->spec;
    leg->slot = ch->slot;
    leg->index = index;
    leg->tokens = ch->spec.tokens;
    leg->dispatched = ngx_current_msec;
    leg->state = NGX_HTTP_OMNI_LEG_RESERVED;

    if (ch->flags & NGX_HTTP_OMNI_CHARGE_JOB) {
        leg->predicted_us = ch->job.done_us - ch->job.dispatch_us;
        leg->predicted_wait_us = ch->job.start_us
                                 - ngx_min(ch->job.start_us,
                                           ch->job.dispatch_us);
    }
}


/*
 * Bind a leg of this process to instance `index` of its tier with `spec`;
 * the zone is locked.  NGX_ERROR: no record could be made.
 */
ngx_int_t
ngx_http_omni_ledger_leg_bind_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_omni_upstream_conf_t *ucf,
    ngx_http_omni_leg_t *leg, ngx_uint_t index, ngx_http_omni_spec_t *spec,
    uint64_t now_us)
{
    ngx_http_omni_charge_t  *ch;

    ch = ngx_http_omni_ledger_bind_locked(sh, shpool,
                                          ngx_http_omni_ledger_self(),
                                          (uint32_t) ucf->slots[index], spec,
                                          now_us);
    if (ch == NULL) {
        return NGX_ERROR;
    }

    leg->tier = ucf->role;
    ngx_http_omni_ledger_adopt(leg, index, ch);

    return NGX_OK;
}


/* The same, taking the lock: a retry, or a request nginx balances. */
ngx_int_t
ngx_http_omni_ledger_leg_bind(ngx_http_omni_upstream_conf_t *ucf,
    ngx_http_omni_leg_t *leg, ngx_uint_t index)
{
    ngx_int_t               rc;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(ucf->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    rc = ngx_http_omni_ledger_leg_bind_locked(sh, shpool, ucf, leg, index,
                                              &leg->spec,
                                              ngx_http_omni_now_us());
    ngx_shmtx_unlock(&shpool->mutex);

    return rc;
}


/* The prefill of a leg is over before the leg (aggregated: first byte). */
void
ngx_http_omni_ledger_prefill_end(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_leg_t *leg, ngx_uint_t ok)
{
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    if (leg->charge == NULL
        || !(leg->charge->flags & (NGX_HTTP_OMNI_CHARGE_JOB
                                   |NGX_HTTP_OMNI_CHARGE_PREFILLING)))
    {
        return;
    }

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    ngx_http_omni_ledger_prefill_end_locked(sh, leg->charge, ok);
    ngx_shmtx_unlock(&shpool->mutex);
}


/*
 * The one release of a leg, whatever ended it.  `outcome`: what the
 * instance's health learns (NONE: nothing, e.g. the request went away
 * before the upstream started); `prefill_ok`: the prefill it carried
 * succeeded (the predictor learns from it).  Safe to call again.
 */
void
ngx_http_omni_ledger_release(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_leg_t *leg, ngx_uint_t outcome, ngx_uint_t prefill_ok)
{
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_inst_t   *in;
    ngx_http_omni_shctx_t  *sh;

    if (leg->state != NGX_HTTP_OMNI_LEG_RESERVED
        && leg->state != NGX_HTTP_OMNI_LEG_ACTIVE)
    {
        return;
    }

    leg->state = NGX_HTTP_OMNI_LEG_DONE;
    leg->finished = ngx_current_msec;

    if (leg->charge == NULL) {
        return;
    }

    sh = ngx_http_omni_shm(mcf, &shpool);
    in = &sh->inst[leg->charge->slot];

    ngx_shmtx_lock(&shpool->mutex);

    if (prefill_ok) {
        ngx_http_omni_ledger_prefill_end_locked(sh, leg->charge, 1);
    }

    ngx_http_omni_ledger_unbind_locked(sh, shpool, leg->charge);
    leg->charge = NULL;

    if (outcome != NGX_HTTP_OMNI_OUTCOME_NONE) {
        in->last_latency_ms = leg->finished - leg->dispatched;
    }

    if (outcome == NGX_HTTP_OMNI_OUTCOME_FAILED) {
        in->errors_total++;
        ngx_http_omni_health_report_locked(in, 0, NGX_HTTP_OMNI_HEALTH_PASSIVE,
                                           ngx_current_msec);

    } else if (outcome == NGX_HTTP_OMNI_OUTCOME_OK) {
        ngx_http_omni_health_report_locked(in, 1, NGX_HTTP_OMNI_HEALTH_PASSIVE,
                                           ngx_current_msec);
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


/*
 * The ONE health state of an instance (fails, down_until), fed by every
 * source: the legs' outcomes (passive) and the agent's /health probes
 * (active).  A failure counts towards max_fails and, once reached, rests
 * the instance for fail_timeout; a success clears the count.  The caller
 * holds the zone's mutex.
 */
void
ngx_http_omni_health_report_locked(ngx_http_omni_inst_t *in, ngx_uint_t ok,
    ngx_uint_t source, ngx_msec_t now)
{
    if (ok) {
        in->fails = 0;
        return;
    }

    in->fails++;

    if (in->max_fails && in->fails >= in->max_fails) {
        in->down_until = now + in->fail_timeout;
    }
}


/* The same, taking the zone's mutex: for callers outside the ledger. */
void
ngx_http_omni_health_report(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_inst_t *in, ngx_uint_t ok, ngx_uint_t source,
    ngx_msec_t now)
{
    ngx_slab_pool_t  *shpool;

    (void) ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    ngx_http_omni_health_report_locked(in, ok, source, now);
    ngx_shmtx_unlock(&shpool->mutex);
}


/* A leg the proxy cancelled (fail-fast P/D): counted apart from errors. */
void
ngx_http_omni_ledger_cancelled(ngx_http_omni_main_conf_t *mcf)
{
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    sh->legs_cancelled++;
    ngx_shmtx_unlock(&shpool->mutex);
}


/* ------------------------------------------------------------------------ */
/* main requests in flight                                                  */


void
ngx_http_omni_ledger_request_begin(ngx_http_omni_main_conf_t *mcf)
{
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    sh->requests_total++;
    sh->inflight_requests++;

    if (ngx_http_omni_me) {
        ngx_http_omni_me->requests++;
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


/* The request's end: no longer in flight, and its metrics recorded. */
void
ngx_http_omni_ledger_request_end(ngx_http_omni_main_conf_t *mcf,
    ngx_uint_t route, ngx_uint_t mode, ngx_uint_t status,
    ngx_http_omni_ctx_t *ctx)
{
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    sh->inflight_requests -= ngx_min(sh->inflight_requests, 1);

    if (ngx_http_omni_me && ngx_http_omni_me->requests) {
        ngx_http_omni_me->requests--;
    }

    ngx_http_omni_metrics_locked(sh, route, mode, status, ctx);

    ngx_shmtx_unlock(&shpool->mutex);
}
