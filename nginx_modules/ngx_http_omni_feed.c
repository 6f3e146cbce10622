/*
 * Omni Proxy nginx module: what the proxy observes, fed to the predictor.
 *
 * The end of a leg's prefill (its answer, or an aggregated leg's first
 * byte), the gaps between a decode stream's events (the decode step model)
 * and the length of finished streams (the typical output of a route).
 */


#include "ngx_http_omni.h"


/*
 * Decode step samples wait in the worker and go to the shared predictor
 * together.  A streamed answer passes an event per token: taking the zone
 * lock, which every worker's scheduling needs, for each one made the
 * busiest path of the proxy contend with the scheduler.  At most
 * NGX_HTTP_OMNI_STEPS_MAX samples wait, for at most
 * NGX_HTTP_OMNI_STEPS_DELAY ms; a worker that exits drops what waits
 * (a few ms of samples of a model fitted over thousands).
 */
#define NGX_HTTP_OMNI_STEPS_MAX    64
#define NGX_HTTP_OMNI_STEPS_DELAY  10


typedef struct {
    uint32_t    slot;
    uint32_t    batch;       /* requests in flight on the instance */
    uint64_t    kv_tokens;   /* their tokens */
    uint64_t    step_us;
} ngx_http_omni_step_t;


static void ngx_http_omni_steps_flush(ngx_http_omni_main_conf_t *mcf);
static void ngx_http_omni_steps_timer(ngx_event_t *ev);


static ngx_http_omni_step_t  ngx_http_omni_steps[NGX_HTTP_OMNI_STEPS_MAX];
static ngx_uint_t            ngx_http_omni_nsteps;
static ngx_event_t           ngx_http_omni_steps_ev;


/*
 * The prefill of a leg is over: the prefill leg answered (sequential,
 * parallel), or the first byte of an aggregated leg came.  Exactly once.
 */
void
ngx_http_omni_prefill_observed(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_leg_t *leg, ngx_uint_t ok)
{
    if (leg->first) {
        return;
    }

    leg->first = 1;

    if (leg->charge == NULL
        || !(leg->charge->flags & (NGX_HTTP_OMNI_CHARGE_JOB
                                   |NGX_HTTP_OMNI_CHARGE_PREFILLING)))
    {
        return;
    }

    ngx_http_omni_ledger_prefill_end(ctx->mcf, leg, ok);

    /* a prefill slot opened: someone may go */
    ngx_http_omni_schedule(ctx->mcf);
}


/*
 * A decode leg passed `events` SSE events now (done: it ended).  The gaps
 * between them train the decode step model; a finished stream's length
 * trains the typical output length of its route.
 */
void
ngx_http_omni_decode_observed(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_leg_t *leg, ngx_uint_t events, ngx_uint_t done)
{
    double                  out;
    uint64_t                now_us;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_inst_t   *in;
    ngx_http_omni_step_t   *s;
    ngx_http_omni_shctx_t  *sh;

    if (leg->slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
        return;
    }

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);
    in = &sh->inst[leg->slot];
    now_us = ngx_http_omni_now_us();

    if (done) {
        if (!ctx->stream || !leg->complete || leg->events < 2) {
            return;
        }

        /* [DONE] and the usage chunk are not tokens */
        out = (double) (leg->events - 1 - (ctx->include_usage ? 1 : 0));

        ngx_shmtx_lock(&shpool->mutex);
        sh->output_ewma[ctx->route] = sh->output_ewma[ctx->route] == 0
                                      ? out
                                      : 0.9 * sh->output_ewma[ctx->route]
                                        + 0.1 * out;
        ngx_shmtx_unlock(&shpool->mutex);

        return;
    }

    if (events == 0) {
        return;
    }

    if (leg->last_chunk_us && leg->events) {
        /* the instance's load now, read without the lock: a feature of
         * the sample, not a figure anything is charged against */
        s = &ngx_http_omni_steps[ngx_http_omni_nsteps++];
        s->slot = (uint32_t) leg->slot;
        s->batch = (uint32_t) in->inflight_requests;
        s->kv_tokens = in->inflight_tokens;
        s->step_us = (now_us - leg->last_chunk_us) / events;

        if (ngx_http_omni_nsteps == NGX_HTTP_OMNI_STEPS_MAX) {
            ngx_http_omni_steps_flush(ctx->mcf);

        } else if (!ngx_http_omni_steps_ev.timer_set) {
            ngx_http_omni_steps_ev.handler = ngx_http_omni_steps_timer;
            ngx_http_omni_steps_ev.log = ngx_cycle->log;
            ngx_http_omni_steps_ev.data = ctx->mcf;
            /* an exiting worker does not wait for it */
            ngx_http_omni_steps_ev.cancelable = 1;
            ngx_add_timer(&ngx_http_omni_steps_ev, NGX_HTTP_OMNI_STEPS_DELAY);
        }
    }

    leg->last_chunk_us = now_us;
    leg->events += events;
}


/* The waiting decode step samples into the predictor, under one lock. */
static void
ngx_http_omni_steps_flush(ngx_http_omni_main_conf_t *mcf)
{
    ngx_uint_t              i;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_step_t   *s;
    ngx_http_omni_shctx_t  *sh;

    if (ngx_http_omni_steps_ev.timer_set) {
        ngx_del_timer(&ngx_http_omni_steps_ev);
    }

    if (ngx_http_omni_nsteps == 0) {
        return;
    }

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    for (i = 0; i < ngx_http_omni_nsteps; i++) {
        s = &ngx_http_omni_steps[i];
        (void) omni_predict_observe_decode(sh->predict, s->slot, s->batch,
                                           s->kv_tokens, s->step_us);
    }

    sh->decode_step_flushes++;

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "omni: %ui decode step samples to the predictor",
                   ngx_http_omni_nsteps);

    ngx_http_omni_nsteps = 0;
}


static void
ngx_http_omni_steps_timer(ngx_event_t *ev)
{
    ngx_http_omni_steps_flush(ev->data);
}


uint64_t
ngx_http_omni_expected_output(ngx_http_omni_ctx_t *ctx)
{
    double                  typical;
    uint64_t                asked;
    ngx_http_omni_shctx_t  *sh;

    asked = ctx->max_tokens >= 0 ? (uint64_t) ctx->max_tokens : 256;

    if (ctx->ignore_eos) {
        /* it will run to max_tokens */
        return asked;
    }

    sh = ngx_http_omni_shm(ctx->mcf, NULL);
    typical = sh->output_ewma[ctx->route];

    if (typical >= 1 && (uint64_t) typical < asked) {
        return (uint64_t) typical + 1;
    }

    return asked;
}


/*
 * A prefill answer in memory: the cached tokens the engine reports (vLLM
 * usage.prompt_tokens_details.cached_tokens, SGLang meta_info.cached_tokens)
 * next to the proxy's prediction, per request (the access log) and per
 * instance (what was predicted but not found, found but not predicted).
 */
void
ngx_http_omni_cache_observed(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_leg_t *leg, u_char *resp, omni_json_member_t *members,
    size_t n)
{
    int                     type;
    long                    i;
    size_t                  off, len;
    int64_t                 found, pred;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_inst_t   *in;
    ngx_http_omni_shctx_t  *sh;

    i = omni_json_find(resp, members, n, "usage", sizeof("usage") - 1);

    if (i >= 0 && members[i].type == OMNI_JSON_OBJECT
        && omni_json_object_get(resp, members[i].val_off,
                                members[i].val_len, "prompt_tokens_details",
                                sizeof("prompt_tokens_details") - 1,
                                &off, &len, &type)
           == OMNI_OK
        && type == OMNI_JSON_OBJECT
        && omni_json_object_get(resp, off, len, "cached_tokens",
                                sizeof("cached_tokens") - 1,
                                &off, &len, &type)
           == OMNI_OK)
    {
        /* vLLM */

    } else {
        i = omni_json_find(resp, members, n, "meta_info",
                           sizeof("meta_info") - 1);

        if (i < 0 || members[i].type != OMNI_JSON_OBJECT
            || omni_json_object_get(resp, members[i].val_off,
                                    members[i].val_len, "cached_tokens",
                                    sizeof("cached_tokens") - 1,
                                    &off, &len, &type)
               != OMNI_OK)
        {
            return;
        }
    }

    if (omni_json_int64(resp, off, len, &found) != OMNI_OK || found < 0) {
        return;
    }

    ctx->engine_cached = found;

    if (leg->slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
        return;
    }

    pred = (int64_t) ctx->cached_tokens;

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    in = &sh->inst[leg->slot];
    in->cache_checked++;
    in->cache_predicted += (uint64_t) pred;

    if (pred > found) {
        in->cache_missing += (uint64_t) (pred - found);

    } else {
        in->cache_unpredicted += (uint64_t) (found - pred);
    }

    ngx_shmtx_unlock(&shpool->mutex);
}
