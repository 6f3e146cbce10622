/*
 * Omni Proxy nginx module: the choice of instances.
 *
 * Two ways to decide, per `omni_schedule_policy`:
 *
 * - at once, when a request arrives (round-robin, least-loaded,
 *   cache-aware): ngx_http_omni_choose();
 * - held and released (omni): the release loop (ngx_http_omni_hold.c)
 *   asks, for the next request in queue order (its key is made here,
 *   ngx_http_omni_queue_key_locked()), ngx_http_omni_bind_start() or
 *   ngx_http_omni_bind_decode().  A request is bound to the instance with
 *   the least predicted
 *   TTFT (expected wait + prefill of the tokens it does not hold), if one can
 *   take it within its limits and soon enough; decode work is placed longest
 *   first on the least-loaded decode instance.
 *
 * Every choice and the charge of its load happen in one critical section of
 * the zone lock, so workers deciding at the same moment see each other's
 * decisions.  The prefix index and the predictor (scoring library) live in
 * the zone and are addressed by instance slot.
 */


#include "ngx_http_omni.h"


/* a microsecond waited forgives this much predicted work (SJF aging) */
#define NGX_HTTP_OMNI_AGING          1.0
/* cache-aware: leave the best-matching instance when it has this many
 * more requests in flight than the least loaded one */
#define NGX_HTTP_OMNI_BALANCE        8
/* the mean gap between arrivals: weight of the newest, and the longest gap
 * counted (an idle proxy is not a slow one forever) */
#define NGX_HTTP_OMNI_GAP_ALPHA      0.05
#define NGX_HTTP_OMNI_MAX_GAP_US     10000000


/* per worker scratch, sized for every slot */
static uint32_t             ngx_http_omni_matched[NGX_HTTP_OMNI_MAX_SLOTS];
static omni_prefill_cand_t  ngx_http_omni_pcands[NGX_HTTP_OMNI_MAX_SLOTS];
static omni_decode_inst_t   ngx_http_omni_dcands[NGX_HTTP_OMNI_MAX_SLOTS];


ngx_uint_t
ngx_http_omni_start_tier(ngx_http_omni_main_conf_t *mcf)
{
    return mcf->pd_policy == NGX_HTTP_OMNI_AGGREGATED ? NGX_HTTP_OMNI_DECODE
                                                      : NGX_HTTP_OMNI_PREFILL;
}


static ngx_uint_t
ngx_http_omni_usable(ngx_http_omni_upstream_conf_t *ucf, ngx_uint_t i,
    ngx_http_omni_inst_t *in, ngx_msec_t now)
{
    if (!ngx_http_omni_inst_usable(in, now) || ucf->peers[i]->down) {
        return 0;
    }

    if (ucf->peers[i]->max_conns
        && in->inflight_requests >= ucf->peers[i]->max_conns)
    {
        return 0;
    }

    return 1;
}


/* The prefix match of hashes on every slot, into ngx_http_omni_matched. */
static uint32_t *
ngx_http_omni_match(ngx_http_omni_shctx_t *sh, uint64_t *hashes, size_t n,
    uint64_t now_us)
{
    if (n == 0 || sh->index == NULL || sh->n_slots == 0) {
        return NULL;
    }

    if (omni_index_match_prefix(sh->index, hashes, n, now_us,
                                ngx_http_omni_matched, sh->n_slots)
        < 0)
    {
        return NULL;
    }

    return ngx_http_omni_matched;
}


uint64_t
ngx_http_omni_best_uncached(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, uint64_t *hashes, size_t n_hashes,
    uint64_t prompt_tokens, size_t *slot)
{
    uint32_t                       *matched;
    uint64_t                        best, cached;
    ngx_uint_t                      i;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = mcf->tiers[ngx_http_omni_start_tier(mcf)];
    best = prompt_tokens;
    *slot = (ucf && ucf->n) ? ucf->slots[0] : 0;

    matched = ngx_http_omni_match(sh, hashes, n_hashes, ngx_http_omni_now_us());

    for (i = 0; matched && ucf && i < ucf->n; i++) {
        if (ucf->slots[i] >= sh->n_slots) {
            continue;
        }

        cached = (uint64_t) matched[ucf->slots[i]] * sh->block_size;
        cached = ngx_min(cached, prompt_tokens ? prompt_tokens - 1 : 0);

        if (prompt_tokens - cached < best) {
            best = prompt_tokens - cached;
            *slot = ucf->slots[i];
        }
    }

    return best;
}


/* ------------------------------------------------------------------------ */
/* at once                                                                  */


/*
 * The best usable instance of a tier, or ucf->n when none is.  `tried` (may
 * be NULL) is round robin's bitmap of instances already tried by this leg.
 */
static ngx_uint_t
ngx_http_omni_pick(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_upstream_conf_t *ucf, ngx_uint_t policy, uintptr_t *tried,
    uint32_t *matched)
{
    uint64_t               load, best_load;
    ngx_uint_t             i, k, start, best, slot, hit, hit_best;
    ngx_uint_t             min_running, best_running;
    ngx_msec_t             now;
    ngx_http_omni_inst_t  *in;

    now = ngx_current_msec;
    best = ucf->n;
    hit = ucf->n;
    hit_best = 0;
    best_load = 0;
    min_running = (ngx_uint_t) -1;
    best_running = 0;
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

        if (!ngx_http_omni_usable(ucf, i, in, now)) {
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

        min_running = ngx_min(min_running, in->inflight_requests);

        if (matched && slot < sh->n_slots && matched[slot] > hit_best) {
            hit = i;
            hit_best = matched[slot];
            best_running = in->inflight_requests;
        }
    }

    /* cache-aware: the longest prefix, unless that piles up load */
    if (hit < ucf->n
        && best_running < min_running + NGX_HTTP_OMNI_BALANCE)
    {
        best = hit;
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
    uint32_t                       *matched, slot, cached, uncached;
    uint64_t                        now_us;
    ngx_uint_t                      best, start;
    ngx_slab_pool_t                *shpool;
    ngx_http_omni_leg_t            *leg;
    ngx_http_omni_spec_t            spec;
    ngx_http_omni_shctx_t          *sh;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = ctx->mcf->tiers[tier];
    if (ucf == NULL) {
        return NGX_DECLINED;
    }

    start = (tier == ngx_http_omni_start_tier(ctx->mcf));
    leg = &ctx->legs[tier];
    now_us = ngx_http_omni_now_us();
    sh = ngx_http_omni_shm(ctx->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    matched = NULL;

    if (start && ctx->mcf->schedule_policy == NGX_HTTP_OMNI_SCHED_CACHE_AWARE)
    {
        matched = ngx_http_omni_match(sh, ctx->hashes, ctx->n_hashes, now_us);
    }

    best = ngx_http_omni_pick(sh, ucf, ctx->mcf->schedule_policy, NULL,
                              matched);

    if (best < ucf->n) {
        slot = (uint32_t) ucf->slots[best];

        ngx_memzero(&spec, sizeof(ngx_http_omni_spec_t));
        spec.tokens = tokens;

        if (start && slot < NGX_HTTP_OMNI_MAX_SLOTS) {
            /* what the prefill of this leg will cost, for the predictor */

            cached = 0;

            if (matched && slot < sh->n_slots) {
                cached = (uint32_t) ngx_min((uint64_t) matched[slot]
                                            * sh->block_size,
                                            ctx->prompt_tokens - 1);
            }

            uncached = (uint32_t) (ctx->prompt_tokens - cached);
            ctx->cached_tokens = cached;

            spec.uncached = uncached;
            spec.cached = cached;
            spec.flags = NGX_HTTP_OMNI_CHARGE_JOB;

            if (ctx->mode == NGX_HTTP_OMNI_AGGREGATED) {
                spec.flags |= NGX_HTTP_OMNI_CHARGE_PREFILLING;
            }
        }

        if (ngx_http_omni_ledger_leg_bind_locked(sh, shpool, ucf, leg, best,
                                                 &spec, now_us)
            != NGX_OK)
        {
            best = ucf->n;

        } else if (start && ctx->n_hashes && sh->index) {
            (void) omni_index_insert(sh->index, slot, ctx->hashes,
                                     ctx->n_hashes, now_us);
        }
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
    ngx_uint_t              best, policy;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    sh = ngx_http_omni_shm(ucf->mcf, &shpool);

    policy = ucf->mcf->schedule_policy == NGX_HTTP_OMNI_SCHED_ROUND_ROBIN
             ? NGX_HTTP_OMNI_SCHED_ROUND_ROBIN
             : NGX_HTTP_OMNI_SCHED_LEAST_LOADED;

    ngx_shmtx_lock(&shpool->mutex);
    best = ngx_http_omni_pick(sh, ucf, policy, tried, NULL);
    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni choose again: instance %ui of %ui", best, ucf->n);

    if (best >= ucf->n) {
        return NGX_DECLINED;
    }

    *index = best;

    return NGX_OK;
}


/* ------------------------------------------------------------------------ */
/* held and released                                                        */


ngx_int_t
ngx_http_omni_uses_queue(ngx_http_omni_main_conf_t *mcf)
{
    return mcf->schedule_policy == NGX_HTTP_OMNI_SCHED_OMNI;
}


/* Whether any instance of the tier could be chosen at all now. */
ngx_uint_t
ngx_http_omni_tier_usable(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t tier, ngx_msec_t now)
{
    ngx_uint_t                      i;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = mcf->tiers[tier];

    for (i = 0; ucf && i < ucf->n; i++) {
        if (ucf->slots[i] < NGX_HTTP_OMNI_MAX_SLOTS
            && ngx_http_omni_usable(ucf, i, &sh->inst[ucf->slots[i]], now))
        {
            return 1;
        }
    }

    return 0;
}


/* A request to start arrived: the mean gap between arrivals (under the
 * zone lock). */
void
ngx_http_omni_arrived(ngx_http_omni_shctx_t *sh, uint64_t now_us)
{
    uint64_t  gap;

    if (sh->last_arrival_us && now_us > sh->last_arrival_us) {
        gap = ngx_min(now_us - sh->last_arrival_us,
                      NGX_HTTP_OMNI_MAX_GAP_US);
        sh->arrival_gap_us = sh->arrival_gap_us
            ? sh->arrival_gap_us
              + NGX_HTTP_OMNI_GAP_ALPHA * ((double) gap - sh->arrival_gap_us)
            : (double) gap;
    }

    sh->last_arrival_us = now_us;
}


/* Decode placement for entry en: a slot, or NGX_HTTP_OMNI_NONE to hold. */
static uint32_t
ngx_http_omni_place_decode(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en, ngx_msec_t now)
{
    ngx_uint_t                      i, slot;
    omni_decision_t                 dec;
    omni_decode_job_t               job;
    omni_decode_inst_t             *d;
    ngx_http_omni_inst_t           *in;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = mcf->tiers[NGX_HTTP_OMNI_DECODE];
    if (ucf == NULL || ucf->n == 0) {
        return NGX_HTTP_OMNI_NONE;
    }

    d = ngx_http_omni_dcands;

    for (i = 0; i < ucf->n; i++) {
        slot = ucf->slots[i];
        ngx_memzero(&d[i], sizeof(omni_decode_inst_t));
        d[i].inst = (uint32_t) i;

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
            d[i].flags = OMNI_POLICY_UNHEALTHY;
            continue;
        }

        in = &sh->inst[slot];
        d[i].flags = ngx_http_omni_usable(ucf, i, in, now)
                     ? 0 : OMNI_POLICY_UNHEALTHY;
        d[i].running = (uint32_t) in->inflight_requests;
        d[i].max_running = (uint32_t) mcf->decode_max_num_seqs;
        d[i].load_tokens = in->inflight_tokens;
        d[i].max_tokens = mcf->decode_max_tokens;
    }

    job.prompt_tokens = (uint32_t) ngx_min(en->prompt_tokens, UINT32_MAX);
    job.output_tokens = (uint32_t) ngx_min(en->output_tokens, UINT32_MAX);
    job.arrival_us = (uint64_t) en->arrival * 1000;

    if (omni_policy_decode_place(d, ucf->n, &job, &dec) != OMNI_OK
        || dec.choice < 0)
    {
        return NGX_HTTP_OMNI_NONE;
    }

    return (uint32_t) ucf->slots[dec.choice];
}


/*
 * Try to bind entry en (prefill queue: the start of a request); `waiting`
 * requests are queued.  NGX_OK: bound and charged; NGX_BUSY: its best
 * instance is busy a while yet (*retry_us says how long) and, without
 * `force`, it does not take a free one: another entry may; NGX_AGAIN:
 * nothing can take it now, nor anything else that needs a free instance
 * (*retry_us may be set).
 */
ngx_int_t
ngx_http_omni_bind_start(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool,
    ngx_http_omni_qentry_t *en, ngx_msec_t now, uint64_t now_us,
    uint64_t *retry_us, ngx_uint_t waiting, ngx_uint_t force)
{
    int                             rc;
    uint32_t                       *matched, slot, dslot, cached, uncached;
    uint64_t                        slack;
    ngx_http_omni_spec_t            spec;
    ngx_http_omni_charge_t         *ch;
    ngx_uint_t                      i, tier, room;
    omni_decision_t                 dec;
    omni_prefill_cand_t            *c;
    ngx_http_omni_inst_t           *in;
    ngx_http_omni_upstream_conf_t  *ucf;

    tier = ngx_http_omni_start_tier(mcf);
    ucf = mcf->tiers[tier];

    if (ucf == NULL || ucf->n == 0) {
        return NGX_AGAIN;
    }

    c = ngx_http_omni_pcands;

    for (i = 0; i < ucf->n; i++) {
        slot = (uint32_t) ucf->slots[i];
        ngx_memzero(&c[i], sizeof(omni_prefill_cand_t));
        c[i].inst = slot < NGX_HTTP_OMNI_MAX_SLOTS ? slot : 0;

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
            c[i].flags = OMNI_POLICY_UNHEALTHY;
            continue;
        }

        in = &sh->inst[slot];
        c[i].flags = ngx_http_omni_usable(ucf, i, in, now)
                     ? 0 : OMNI_POLICY_UNHEALTHY;

        if (mcf->pd_policy == NGX_HTTP_OMNI_AGGREGATED) {
            c[i].running = in->prefilling;
            c[i].inflight_tokens = in->prefilling_tokens;
        } else {
            c[i].running = (uint32_t) in->inflight_requests;
            c[i].inflight_tokens = in->inflight_tokens;
        }

        c[i].max_running = (uint32_t) mcf->prefill_max_num_seqs;
        c[i].max_tokens = mcf->max_batch_num_token;
    }

    matched = ngx_http_omni_match(sh, en->hashes, en->n_hashes, now_us);

    rc = omni_policy_prefill_prepare(sh->predict, matched,
                                     matched ? sh->n_slots : 0,
                                     sh->block_size,
                                     (uint32_t) ngx_min(en->prompt_tokens,
                                                        UINT32_MAX),
                                     now_us, c, ucf->n);
    if (rc != OMNI_OK) {
        return NGX_AGAIN;
    }

    slack = (uint64_t) mcf->hold_slack * 1000;

    /*
     * Whether any instance could start some request now (usable, below its
     * limits, free within the slack, batch budget not used up): when none
     * can, a request that waits here ends the release pass, as nobody
     * behind it can go either.
     */

    room = 0;

    for (i = 0; i < ucf->n && !room; i++) {
        room = !(c[i].flags & OMNI_POLICY_UNHEALTHY)
               && (c[i].max_running == 0 || c[i].running < c[i].max_running)
               && (c[i].max_tokens == 0
                   || c[i].inflight_tokens < c[i].max_tokens)
               && c[i].wait_us <= slack;
    }

    /*
     * Engines batch in steps: what reaches an instance while a step runs
     * waits for the next one, and everything waiting then shares it.  A
     * request that waits there for the next step (or for its first one,
     * just sent) and has less work than this one would finish with this
     * one's first chunk, up to a whole step late, and so would have been
     * mispredicted.  This one waits until that one is done (the slack at
     * most; the engine's next step has it).
     */

    for (i = 0; i < ucf->n; i++) {
        slot = (uint32_t) ucf->slots[i];

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS || c[i].wait_us == 0
            || c[i].wait_us > slack)
        {
            continue;
        }

        in = &sh->inst[slot];

        if (now_us < in->last_start_us + slack
            && now_us < in->last_done_us
            && c[i].prefill_us > in->last_service_us)
        {
            c[i].wait_us = ngx_max(c[i].wait_us,
                                   in->last_done_us - now_us) + slack;
        }
    }

    /*
     * An instance whose batch budget this request does not fit now is not
     * out of the question: it is busy, and may be worth waiting for (it may
     * hold the prompt's prefix, being computed by the request in flight).
     */

    for (i = 0; i < ucf->n; i++) {
        uncached = (uint32_t) ngx_max(en->prompt_tokens
                                      - c[i].cached_tokens, 1);

        if (c[i].inflight_tokens
            && c[i].inflight_tokens + uncached > c[i].max_tokens)
        {
            c[i].wait_us = ngx_max(c[i].wait_us, slack + 1);
        }

        c[i].max_tokens = OMNI_POLICY_UNLIMITED;
    }

    /* the cost of a choice: its own TTFT and what it takes from the others */

    (void) omni_policy_prefill_add_delay(c, ucf->n, (uint32_t) waiting,
                                         sh->arrival_gap_us);

    rc = omni_policy_prefill_choose(c, ucf->n,
                                    (uint32_t) ngx_min(en->prompt_tokens,
                                                       UINT32_MAX),
                                    slack, &dec);

    if (rc == OMNI_EHOLD && dec.reason == OMNI_POLICY_HOLD_BUSY) {
        /*
         * Its best instance is busy a while yet.  The caller first offers
         * the free instances to the requests behind this one; if none of
         * them wants one either (`force`), the request takes the best free
         * one: an instance never idles while requests wait.  Only when
         * none is free soon is the request held for its best one.
         */
        if (dec.retry_us && (*retry_us == 0 || dec.retry_us < *retry_us)) {
            *retry_us = dec.retry_us;
        }

        if (!room) {
            return NGX_AGAIN;
        }

        if (!force) {
            return NGX_BUSY;
        }

        if (dec.best >= 0
            && (uint64_t) c[dec.best].cached_tokens * 2 >= en->prompt_tokens)
        {
            /*
             * Most of its prompt is (or is being) computed there: taking a
             * free instance would redo it.  It waits for that one.
             */
            return NGX_BUSY;
        }

        for (i = 0; i < ucf->n; i++) {
            if (c[i].wait_us > slack) {
                c[i].flags |= OMNI_POLICY_DRAINING;
            }
        }

        rc = omni_policy_prefill_choose(c, ucf->n,
                                        (uint32_t) ngx_min(en->prompt_tokens,
                                                           UINT32_MAX),
                                        UINT64_MAX, &dec);
        if (rc == OMNI_EHOLD) {
            return NGX_BUSY;
        }
    }

    if (rc == OMNI_EHOLD) {
        return NGX_AGAIN;
    }

    if (rc != OMNI_OK || dec.choice < 0) {
        return NGX_AGAIN;
    }

    dslot = NGX_HTTP_OMNI_NONE;

    if (mcf->pd_policy == NGX_HTTP_OMNI_PARALLEL) {
        /* the pair is chosen together: both must be able to take it */
        dslot = ngx_http_omni_place_decode(mcf, sh, en, now);
        if (dslot == NGX_HTTP_OMNI_NONE) {
            return NGX_AGAIN;
        }
    }

    /* bind: the charges belong to the request's owner */

    slot = (uint32_t) ucf->slots[dec.choice];
    cached = c[dec.choice].cached_tokens;
    uncached = (uint32_t) ngx_max(en->prompt_tokens - cached, 1);

    ngx_memzero(&spec, sizeof(ngx_http_omni_spec_t));
    spec.tokens = (mcf->pd_policy == NGX_HTTP_OMNI_AGGREGATED)
                  ? en->prompt_tokens + en->output_tokens : uncached;
    spec.uncached = uncached;
    spec.cached = cached;
    spec.flags = NGX_HTTP_OMNI_CHARGE_JOB;

    if (mcf->pd_policy == NGX_HTTP_OMNI_AGGREGATED) {
        spec.flags |= NGX_HTTP_OMNI_CHARGE_PREFILLING;
    }

    ch = ngx_http_omni_ledger_bind_locked(sh, shpool, en->pid, slot, &spec,
                                          now_us);
    if (ch == NULL) {
        return NGX_AGAIN;
    }

    if (dslot != NGX_HTTP_OMNI_NONE) {
        ngx_memzero(&spec, sizeof(ngx_http_omni_spec_t));
        spec.tokens = en->prompt_tokens + en->output_tokens;

        en->charge[NGX_HTTP_OMNI_DECODE] =
            ngx_http_omni_ledger_bind_locked(sh, shpool, en->pid, dslot,
                                             &spec, now_us);

        if (en->charge[NGX_HTTP_OMNI_DECODE] == NULL) {
            ngx_http_omni_ledger_unbind_locked(sh, shpool, ch);
            return NGX_AGAIN;
        }

        en->slot[NGX_HTTP_OMNI_DECODE] = dslot;
    }

    en->slot[tier] = slot;
    en->charge[tier] = ch;
    en->cached_tokens = cached;

    if (en->n_hashes) {
        (void) omni_index_insert(sh->index, slot, en->hashes, en->n_hashes,
                                 now_us);
    }

    return NGX_OK;
}


/* Sequential mode, prefill done: place the decode work. */
ngx_int_t
ngx_http_omni_bind_decode(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool,
    ngx_http_omni_qentry_t *en, ngx_msec_t now)
{
    uint32_t                 slot;
    ngx_http_omni_spec_t     spec;
    ngx_http_omni_charge_t  *ch;

    slot = ngx_http_omni_place_decode(mcf, sh, en, now);

    if (slot == NGX_HTTP_OMNI_NONE) {
        return NGX_AGAIN;
    }

    ngx_memzero(&spec, sizeof(ngx_http_omni_spec_t));
    spec.tokens = en->prompt_tokens + en->output_tokens;

    ch = ngx_http_omni_ledger_bind_locked(sh, shpool, en->pid, slot, &spec,
                                          ngx_http_omni_now_us());
    if (ch == NULL) {
        return NGX_AGAIN;
    }

    en->slot[NGX_HTTP_OMNI_DECODE] = slot;
    en->charge[NGX_HTTP_OMNI_DECODE] = ch;

    return NGX_OK;
}


/*
 * The order of a held request (smaller keys leave first), under the lock:
 * decode work longest first; prefills first come first served, or shortest
 * predicted work first with aging: a request's priority is its work minus
 * AGING times the time it waited, i.e. work + AGING * arrival minus a term
 * that is the same for everyone, so the order never needs re-sorting.  Work
 * is the prefill time of the tokens the best instance does not hold yet.
 */
void
ngx_http_omni_queue_key_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en)
{
    size_t    i;
    int64_t   work;
    uint64_t  best;

    if (en->queue == NGX_HTTP_OMNI_Q_DECODE) {
        en->key = -(double) (en->prompt_tokens + en->output_tokens);
        return;
    }

    if (mcf->queue_order == NGX_HTTP_OMNI_ORDER_FCFS) {
        en->key = (double) en->arrival;
        return;
    }

    best = ngx_http_omni_best_uncached(mcf, sh, en->hashes, en->n_hashes,
                                       en->prompt_tokens, &i);

    work = omni_predict_prefill_us(sh->predict, (uint32_t) i,
                                   (uint32_t) best,
                                   (uint32_t) (en->prompt_tokens - best));
    en->work_us = work > 0 ? (uint64_t) work : 0;
    en->key = (double) en->work_us
              + NGX_HTTP_OMNI_AGING * (double) en->arrival * 1000;
}
