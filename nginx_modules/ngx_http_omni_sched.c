/*
 * Omni Proxy nginx module: the choice of instances.
 *
 * A choice and the charge of its load happen in one critical section of the
 * zone lock, so two workers deciding at the same moment see each other's
 * decision.  Policies: round robin over usable instances, or the instance
 * with the least outstanding tokens, ties broken round robin.
 */


#include "ngx_http_omni.h"


/*
 * The best usable instance of a tier, or ucf->n when none is.  `tried` (may
 * be NULL) is round robin's bitmap of instances already tried by this leg.
 */
static ngx_uint_t
ngx_http_omni_pick(ngx_http_omni_shctx_t *sh, ngx_http_omni_upstream_conf_t *ucf,
    ngx_uint_t policy, uintptr_t *tried)
{
    uint64_t               load, best_load;
    ngx_uint_t             i, k, start, best, slot;
    ngx_msec_t             now;
    ngx_http_omni_inst_t  *in;

    now = ngx_current_msec;
    best = ucf->n;
    best_load = 0;
    start = ucf->n ? sh->rr[ucf->role] % ucf->n : 0;

    for (k = 0; k < ucf->n; k++) {
        i = (start + k) % ucf->n;

        if (tried
            && (tried[i / (8 * sizeof(uintptr_t))]
                & ((uintptr_t) 1 << i % (8 * sizeof(uintptr_t)))))
        {
            continue;
        }

        slot = ucf->slots[i];

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
            continue;
        }

        in = &sh->inst[slot];

        if (!ngx_http_omni_inst_usable(in, now) || ucf->peers[i]->down) {
            continue;
        }

        if (ucf->peers[i]->max_conns
            && in->inflight_requests >= ucf->peers[i]->max_conns)
        {
            continue;
        }

        if (policy == NGX_HTTP_OMNI_SCHED_ROUND_ROBIN) {
            best = i;
            break;
        }

        load = in->inflight_tokens;

        if (best == ucf->n || load < best_load) {
            best = i;
            best_load = load;
        }
    }

    if (best < ucf->n) {
        sh->rr[ucf->role] = (uint32_t) (best + 1);
    }

    return best;
}


ngx_int_t
ngx_http_omni_choose(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier,
    uint64_t tokens)
{
    ngx_uint_t                      best;
    ngx_slab_pool_t                *shpool;
    ngx_http_omni_shctx_t          *sh;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = ctx->mcf->tiers[tier];
    if (ucf == NULL) {
        return NGX_DECLINED;
    }

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    best = ngx_http_omni_pick(sh, ucf, ctx->mcf->schedule_policy, NULL);

    if (best < ucf->n) {
        ngx_http_omni_charge(sh, ucf, &ctx->legs[tier], best, tokens);
    }

    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ctx->request->connection->log, 0,
                   "omni choose tier %ui: instance %ui of %ui",
                   tier, best, ucf->n);

    return best < ucf->n ? NGX_OK : NGX_DECLINED;
}


ngx_int_t
ngx_http_omni_choose_retry(ngx_http_request_t *r,
    ngx_http_omni_upstream_conf_t *ucf, uintptr_t *tried, ngx_uint_t *index)
{
    ngx_uint_t              best;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(ucf->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    best = ngx_http_omni_pick(sh, ucf, ucf->mcf->schedule_policy, tried);
    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni choose again: instance %ui of %ui", best, ucf->n);

    if (best >= ucf->n) {
        return NGX_DECLINED;
    }

    *index = best;

    return NGX_OK;
}
