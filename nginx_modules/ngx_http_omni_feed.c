/*
 * Omni Proxy nginx module: what the proxy observes, fed to the predictor.
 *
 * The end of a leg's prefill (its answer, or an aggregated leg's first
 * byte), the gaps between a decode stream's events (the decode step model)
 * and the length of finished streams (the typical output of a route).
 */


#include "ngx_http_omni.h"


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
    uint64_t                now_us, step;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_inst_t   *in;
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
        step = (now_us - leg->last_chunk_us) / events;

        ngx_shmtx_lock(&shpool->mutex);
        (void) omni_predict_observe_decode(sh->predict, (uint32_t) leg->slot,
                                           (uint32_t) in->inflight_requests,
                                           in->inflight_tokens, step);
        ngx_shmtx_unlock(&shpool->mutex);
    }

    leg->last_chunk_us = now_us;
    leg->events += events;
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
