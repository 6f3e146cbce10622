/*
 * Omni Proxy nginx module: the choice of instances.
 *
 * Two ways to decide, per `omni_schedule_policy`:
 *
 * - at once, when a request arrives (round-robin, least-loaded,
 *   cache-aware): ngx_http_omni_choose();
 * - held and released (omni): the release loop (ngx_http_omni_hold.c)
 *   asks, for the next request in queue order (ngx_http_omni_order.c),
 *   ngx_http_omni_bind_start() or
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


/* a kept decision is made again after this long at most (us): what only
 * time changes (an instance back from its fail timeout, the index's and
 * the agent's expiry) is seen by then */
#define NGX_HTTP_OMNI_DECISION_TTL   1000000





/* per worker scratch, sized for every slot */
static uint32_t             ngx_http_omni_matched[NGX_HTTP_OMNI_MAX_SLOTS];
static omni_prefill_cand_t  ngx_http_omni_pcands[NGX_HTTP_OMNI_MAX_SLOTS];
static omni_decode_inst_t   ngx_http_omni_dcands[NGX_HTTP_OMNI_MAX_SLOTS];
/* each decode candidate's predicted step with the job (TPOT placement) */
static uint64_t             ngx_http_omni_dstep[NGX_HTTP_OMNI_MAX_SLOTS];
static omni_pick_cand_t     ngx_http_omni_picks[NGX_HTTP_OMNI_MAX_SLOTS];

/* released for having waited past the starvation bound (the last-step rule
 * does not bind it early: omni_prefill_opts_t.starved) */
#define ngx_http_omni_starved(en)  ((en)->reason == NGX_HTTP_OMNI_REL_STARVED)

/* the last hold decided in this process: a request with the same inputs,
 * decided in the same pass, is held the same way */
static struct {
    uint64_t                    epoch;      /* sched_epoch + 1; 0: none */
    uint64_t                    now_us;
    uint64_t                    prompt_tokens;
    uint64_t                    output_tokens;  /* parallel: decode too */
    uint64_t                    seq;        /* the entry, while it waits */
    uint32_t                    entry;
    uint32_t                    n_hashes;
    uint32_t                    waiting;
    ngx_uint_t                  force;
    ngx_uint_t                  starved;
    ngx_int_t                   rc;
    uint64_t                    retry_us;
} ngx_http_omni_last;


/*
 * The prefill engine's own work on a request before it can start: its
 * tokenization when the prompt goes to it as text (not as ids).  The
 * policy lets such a request go that much before its instance frees
 * (omni_prefill_opts_t.front_us); 10 s at most.
 */
uint32_t
ngx_http_omni_front_us(ngx_http_omni_ctx_t *ctx)
{
    uint64_t  us;

    if (ctx->ids_sent) {
        return 0;
    }

    us = ctx->prompt_tokens * (uint64_t) ctx->mcf->engine_tokenize_ns / 1000;

    return (uint32_t) ngx_min(us, 10000000);
}


ngx_uint_t
ngx_http_omni_start_tier(ngx_http_omni_main_conf_t *mcf)
{
    return mcf->pd_policy == NGX_HTTP_OMNI_AGGREGATED ? NGX_HTTP_OMNI_DECODE
                                                      : NGX_HTTP_OMNI_PREFILL;
}


ngx_uint_t
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


/* The prefix match of hashes on every slot, into this process's scratch
 * (valid until the next call). */
uint32_t *
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

    /* what the KV-event agent says: approximate instances weigh less */
    (void) omni_ingest_discount(sh->ingest, sh->n_slots,
                                ngx_http_omni_matched, sh->n_slots);

    return ngx_http_omni_matched;
}


/*
 * The block the engine stores last for a prompt of prompt_tokens whose
 * first `cached` tokens it holds: its last full block, when every block of
 * the prompt is hashed (omni_index_max_tokens) and that one is not cached;
 * else 0.  Its KV event tells the prefill's end, before the answer
 * (omni_predict_prefill_expect).
 */
static uint64_t
ngx_http_omni_end_hash(ngx_http_omni_shctx_t *sh, uint64_t *hashes, size_t n,
    uint64_t prompt_tokens, uint32_t cached)
{
    if (n == 0 || hashes == NULL || sh->block_size == 0
        || prompt_tokens / sh->block_size != n
        || (uint64_t) cached >= (uint64_t) n * sh->block_size)
    {
        return 0;
    }

    return hashes[n - 1];
}


/* ------------------------------------------------------------------------ */
/* at once                                                                  */


/*
 * The best usable instance of a tier, or ucf->n when none is
 * (omni_policy_pick_now(): round robin, least loaded or cache-aware).
 * `tried` (may be NULL) is the bitmap of instances this leg tried already.
 */
static ngx_uint_t
ngx_http_omni_pick(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_upstream_conf_t *ucf, ngx_uint_t policy, uintptr_t *tried,
    uint32_t *matched)
{
    int                    k;
    uint32_t               how;
    ngx_uint_t             i, slot;
    ngx_msec_t             now;
    omni_pick_cand_t      *pc;
    ngx_http_omni_inst_t  *in;

    now = ngx_current_msec;
    pc = ngx_http_omni_picks;

    for (i = 0; i < ucf->n; i++) {
        ngx_memzero(&pc[i], sizeof(omni_pick_cand_t));
        slot = ucf->slots[i];

        if (tried
            && (tried[i / (8 * sizeof(uintptr_t))]
                & ((uintptr_t) 1 << i % (8 * sizeof(uintptr_t)))))
        {
            pc[i].flags |= OMNI_POLICY_TRIED;
        }

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
            pc[i].flags |= OMNI_POLICY_UNHEALTHY;
            continue;
        }

        in = &sh->inst[slot];

        if (!ngx_http_omni_usable(ucf, i, in, now)) {
            pc[i].flags |= OMNI_POLICY_UNHEALTHY;
        }

        pc[i].running = in->inflight_requests;
        pc[i].load_tokens = in->inflight_tokens;

        if (matched && slot < sh->n_slots) {
            pc[i].matched = matched[slot];
        }
    }

    how = policy == NGX_HTTP_OMNI_SCHED_ROUND_ROBIN ? OMNI_PICK_ROUND_ROBIN
          : matched ? OMNI_PICK_CACHE_AWARE : OMNI_PICK_LEAST_LOADED;

    k = omni_policy_pick_now(pc, ucf->n, how, sh->rr[ucf->role]);

    if (k < 0) {
        return ucf->n;
    }

    sh->rr[ucf->role] = (uint32_t) (k + 1);

    return (ngx_uint_t) k;
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
            spec.end_hash = ngx_http_omni_end_hash(sh, ctx->hashes,
                                                   ctx->n_hashes,
                                                   ctx->prompt_tokens, cached);

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


/*
 * The engine did not take the prefill this request's dispatch marked as
 * held on `slot` (an error answer, a failed connection): drop those marks
 * (approximate entries; the engine's own, precise ones stay), from the
 * first block that was not cached there already.  Left in place they would
 * predict hits that never come and, with KV events, where the index is as
 * large as the engine's cache, push out blocks the engine still holds.
 */
void
ngx_http_omni_unmark(ngx_http_omni_ctx_t *ctx, ngx_uint_t slot)
{
    size_t                  from;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;

    if (ctx->n_hashes == 0) {
        return;
    }

    sh = ngx_http_omni_shm(ctx->mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    if (sh->index && slot < sh->n_slots && sh->block_size) {
        from = (size_t) (ctx->cached_tokens / sh->block_size);

        if (from < ctx->n_hashes) {
            (void) omni_index_withdraw(sh->index, (uint32_t) slot,
                                       ctx->hashes + from,
                                       ctx->n_hashes - from);
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);
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


/* How many instances of the tier could be chosen now (0: none at all). */
ngx_uint_t
ngx_http_omni_tier_usable(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t tier, ngx_msec_t now)
{
    ngx_uint_t                      i, n;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = mcf->tiers[tier];

    for (i = 0, n = 0; ucf && i < ucf->n; i++) {
        if (ucf->slots[i] < NGX_HTTP_OMNI_MAX_SLOTS
            && ngx_http_omni_usable(ucf, i, &sh->inst[ucf->slots[i]], now))
        {
            n++;
        }
    }

    return n;
}


/* A request to start arrived: the mean gap between arrivals (under the
 * zone lock). */
void
ngx_http_omni_arrived(ngx_http_omni_shctx_t *sh, uint64_t now_us)
{
    omni_policy_arrived(&sh->arrivals, now_us);
}


/* Decode placement for entry en: a slot, or NGX_HTTP_OMNI_NONE to hold. */
static uint32_t
ngx_http_omni_place_decode(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en, ngx_msec_t now)
{
    int                             rc;
    int64_t                         w;
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
        ngx_http_omni_dstep[i] = 0;

        if (slot >= NGX_HTTP_OMNI_MAX_SLOTS) {
            d[i].flags = OMNI_POLICY_UNHEALTHY;
            continue;
        }

        in = &sh->inst[slot];
        d[i].flags = ngx_http_omni_usable(ucf, i, in, now)
                     ? 0 : OMNI_POLICY_UNHEALTHY;
        d[i].running = omni_ingest_blend_running(&sh->ingest[slot],
                           (uint32_t) in->inflight_requests,
                           ngx_http_omni_now_us(),
                           NGX_HTTP_OMNI_INGEST_TTL_US);
        d[i].max_running = (uint32_t) mcf->decode_max_num_seqs;
        d[i].load_tokens = in->inflight_tokens;
        d[i].max_tokens = mcf->decode_max_tokens;

        if (en->tpot_us) {
            w = omni_predict_decode_step_us(sh->predict, (uint32_t) slot,
                    d[i].running + 1,
                    in->inflight_tokens + en->prompt_tokens
                    + en->output_tokens);
            ngx_http_omni_dstep[i] = w > 0 ? (uint64_t) w : 0;
        }
    }

    job.prompt_tokens = (uint32_t) ngx_min(en->prompt_tokens, UINT32_MAX);
    job.output_tokens = (uint32_t) ngx_min(en->output_tokens, UINT32_MAX);
    job.arrival_us = (uint64_t) en->arrival * 1000;

    /* with a TPOT target, the least loaded instance that meets it */
    rc = en->tpot_us
         ? omni_policy_decode_place_tpot(d, ucf->n, &job, ngx_http_omni_dstep,
                                         en->tpot_us, &dec)
         : omni_policy_decode_place(d, ucf->n, &job, &dec);

    if (rc != OMNI_OK || dec.choice < 0) {
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
    ngx_uint_t                      i, tier;
    omni_decision_t                 dec;
    omni_prefill_opts_t             po;
    ngx_http_omni_spec_t            spec;
    ngx_http_omni_charge_t         *ch;
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

        /* work other proxies sent, as the engine reports it */
        c[i].running = omni_ingest_blend_running(&sh->ingest[slot],
                                                 c[i].running, now_us,
                                                 NGX_HTTP_OMNI_INGEST_TTL_US);

        c[i].max_running = (uint32_t) mcf->prefill_max_num_seqs;
        c[i].max_tokens = mcf->max_batch_num_token;
        c[i].step_start_us = in->last_start_us;
        c[i].step_done_us = in->last_done_us;
        c[i].step_service_us = in->last_service_us;
    }

    matched = ngx_http_omni_match(sh, en->hashes, en->n_hashes, now_us);

    /* the library decides (omni_policy_prefill_decide(), tested there) */

    po.hold_slack_us = (uint64_t) mcf->hold_slack * 1000;
    po.arrival_gap_us = sh->arrivals.gap_us;
    po.waiting = (uint32_t) waiting;
    po.force = (uint32_t) force;
    po.deadline_us = en->deadline_us;   /* 0 without SLO: unchanged */
    po.front_us = en->front_us;
    po.step_tokens = (uint32_t) mcf->prefill_step_tokens;
    po.starved = ngx_http_omni_starved(en);

    rc = omni_policy_prefill_decide(sh->predict, matched,
                                    matched ? sh->n_slots : 0,
                                    sh->block_size,
                                    (uint32_t) ngx_min(en->prompt_tokens,
                                                       UINT32_MAX),
                                    now_us, &po, c, ucf->n, &dec);

    if (dec.retry_us && (*retry_us == 0 || dec.retry_us < *retry_us)) {
        *retry_us = dec.retry_us;
    }

    if (rc == OMNI_EHOLD && dec.reason == OMNI_POLICY_HOLD_BUSY) {
        return NGX_BUSY;
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
    spec.end_hash = ngx_http_omni_end_hash(sh, en->hashes, en->n_hashes,
                                           en->prompt_tokens, cached);

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


/*
 * Whether bind_start() of en now would see exactly what it saw for the
 * last hold decided: the same pass (zone unchanged, same instant), the
 * same prompt (its blocks' hashes) and length, starved or not, no SLO.
 */
static ngx_uint_t
ngx_http_omni_same_inputs(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_qentry_t *en, uint64_t now_us, ngx_uint_t waiting,
    ngx_uint_t force)
{
    ngx_http_omni_qentry_t  *last;

    if (ngx_http_omni_last.epoch != sh->sched_epoch + 1
        || ngx_http_omni_last.now_us != now_us
        || ngx_http_omni_last.force != force
        || ngx_http_omni_last.starved
           != ngx_http_omni_starved(en)
        || ngx_http_omni_last.waiting != waiting
        || ngx_http_omni_last.prompt_tokens != en->prompt_tokens
        || ngx_http_omni_last.output_tokens != en->output_tokens
        || ngx_http_omni_last.n_hashes != en->n_hashes
        || en->deadline_us || en->tpot_us)
    {
        return 0;
    }

    last = &sh->entries[ngx_http_omni_last.entry];

    if (last->seq != ngx_http_omni_last.seq
        || last->state != NGX_HTTP_OMNI_QE_WAITING
        || last->front_us != en->front_us
        || (last->hashes == NULL) != (en->hashes == NULL))
    {
        return 0;
    }

    return en->hashes == NULL
           || ngx_memcmp(last->hashes, en->hashes,
                         en->n_hashes * sizeof(uint64_t)) == 0;
}


/*
 * One decision about a held request to start, through
 * ngx_http_omni_bind_start() (codes as there), or the one made last if
 * nothing it depends on changed since: the same epoch (no change of load,
 * health, predictor or queue head), the same `force` and starvation (the
 * last-step rule leaves a starved request out), no fewer waiting, no
 * longer gap between arrivals (both only make waiting more attractive: a
 * hold stays a hold), before its retry instant and its TTL.  A request
 * with an SLO is always decided again: its deadline moves the choice.
 */
ngx_int_t
ngx_http_omni_decide_start(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, uint32_t e,
    ngx_msec_t now, uint64_t now_us, uint64_t *retry_us, ngx_uint_t waiting,
    ngx_uint_t force, ngx_uint_t *attempts)
{
    uint64_t                 r;
    ngx_int_t                rc;
    ngx_uint_t               f;
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];
    f = force ? 1 : 0;

    if (en->deadline_us == 0 && en->tpot_us == 0
        && en->dec_epoch[f] == sh->sched_epoch + 1
        && en->dec_starved[f] == ngx_http_omni_starved(en)
        && now_us < en->dec_until_us[f]
        && waiting >= en->dec_waiting[f]
        && sh->arrivals.gap_us <= en->dec_gap[f])
    {
        sh->decisions_reused++;

        if (en->dec_retry_at_us[f] > now_us) {
            r = en->dec_retry_at_us[f] - now_us;

            if (*retry_us == 0 || r < *retry_us) {
                *retry_us = r;
            }
        }

        return en->dec_rc[f];
    }

    r = 0;

    if (ngx_http_omni_same_inputs(sh, en, now_us, waiting, force)) {
        /* the same function of the same inputs: the same hold (the look
         * ahead of identical prompts behind the head) */
        sh->decisions_reused++;
        rc = ngx_http_omni_last.rc;
        r = ngx_http_omni_last.retry_us;

    } else {
        (*attempts)++;
        en->decided++;

        rc = ngx_http_omni_bind_start(mcf, sh, shpool, en, now, now_us, &r,
                                      waiting, force);
    }

    if (r && (*retry_us == 0 || r < *retry_us)) {
        *retry_us = r;
    }

    if (rc == NGX_OK) {
        /* an instance took it: every other decision is stale */
        sh->sched_epoch++;
        return rc;
    }

    if (en->deadline_us == 0 && en->tpot_us == 0) {
        ngx_http_omni_last.epoch = sh->sched_epoch + 1;
        ngx_http_omni_last.now_us = now_us;
        ngx_http_omni_last.prompt_tokens = en->prompt_tokens;
        ngx_http_omni_last.output_tokens = en->output_tokens;
        ngx_http_omni_last.entry = e;
        ngx_http_omni_last.seq = en->seq;
        ngx_http_omni_last.n_hashes = en->n_hashes;
        ngx_http_omni_last.waiting = (uint32_t) waiting;
        ngx_http_omni_last.force = force;
        ngx_http_omni_last.starved = ngx_http_omni_starved(en);
        ngx_http_omni_last.rc = rc;
        ngx_http_omni_last.retry_us = r;
    }

    en->dec_epoch[f] = sh->sched_epoch + 1;
    en->dec_starved[f] = ngx_http_omni_starved(en);
    en->dec_rc[f] = rc;
    en->dec_waiting[f] = (uint32_t) waiting;
    en->dec_gap[f] = sh->arrivals.gap_us;
    en->dec_retry_at_us[f] = r ? now_us + r : 0;
    en->dec_until_us[f] = now_us + (r && r < NGX_HTTP_OMNI_DECISION_TTL
                                    ? r : NGX_HTTP_OMNI_DECISION_TTL);

    return rc;
}


/* The same for the decode placement of a held request (sequential mode);
 * it depends on the decode instances alone. */
ngx_int_t
ngx_http_omni_decide_decode(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, uint32_t e,
    ngx_msec_t now, uint64_t now_us, ngx_uint_t *attempts)
{
    ngx_int_t                rc;
    ngx_http_omni_qentry_t  *en;

    en = &sh->entries[e];

    if (en->tpot_us == 0
        && en->dec_epoch[0] == sh->sched_epoch + 1
        && now_us < en->dec_until_us[0])
    {
        sh->decisions_reused++;
        return en->dec_rc[0];
    }

    (*attempts)++;
    en->decided++;

    rc = ngx_http_omni_bind_decode(mcf, sh, shpool, en, now);

    if (rc == NGX_OK) {
        sh->sched_epoch++;
        return rc;
    }

    en->dec_epoch[0] = sh->sched_epoch + 1;
    en->dec_rc[0] = rc;
    en->dec_until_us[0] = now_us + NGX_HTTP_OMNI_DECISION_TTL;

    return rc;
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
