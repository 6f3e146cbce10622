/*
 * Omni Proxy nginx module: the shared zone.
 *
 * One slab zone holds what every worker must agree on: the instances of both
 * tiers with their load, health and totals, the queues' entries, the prefix
 * index and the predictor, and the metrics.  Any worker reads and updates it
 * under the zone's mutex; there is no elected worker.  Here: its creation,
 * what a reload may change in it, the instance slots, the clock.
 *
 * Instances keep their slot across reloads (matched by role and address), so
 * workers of the old configuration that still finish requests release the
 * load on the same records the new workers charge.
 */


#include "ngx_http_omni.h"

#include <sys/eventfd.h>
#if (defined __GLIBC__)
#include <malloc.h>
#endif


static void ngx_http_omni_close_fds(void *data);


static ngx_int_t ngx_http_omni_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static uint32_t ngx_http_omni_predict_flags(ngx_http_omni_main_conf_t *mcf);
static void ngx_http_omni_map_slots(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_log_t *log);
static ngx_int_t ngx_http_omni_zone_agrees(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_log_t *log);
static void ngx_http_omni_zone_apply(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh);
static ngx_int_t ngx_http_omni_zone_build(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, size_t zone_size);


const double  ngx_http_omni_bucket_bounds[NGX_HTTP_OMNI_BUCKETS] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 600
};


/* index 0 counts every status not listed */
const ngx_uint_t  ngx_http_omni_status_codes[NGX_HTTP_OMNI_STATUSES] = {
    0, 200, 400, 404, 405, 413, 429, 499, 500, 502, 503, 504
};


static ngx_str_t  ngx_http_omni_zone_name = ngx_string("omni_proxy");


/* the zone's pool and state, set by the zone's init in every cycle */
typedef struct {
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh;
    ngx_http_omni_main_conf_t  *mcf;
} ngx_http_omni_zone_t;


ngx_int_t
ngx_http_omni_shm_add(ngx_conf_t *cf, ngx_http_omni_main_conf_t *mcf)
{
    ngx_http_omni_zone_t  *zone;

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_omni_zone_t));
    if (zone == NULL) {
        return NGX_ERROR;
    }

    zone->mcf = mcf;

    mcf->shm_zone = ngx_shared_memory_add(cf, &ngx_http_omni_zone_name,
                                          mcf->zone_size,
                                          &ngx_http_omni_module);
    if (mcf->shm_zone == NULL) {
        return NGX_ERROR;
    }

    if (mcf->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &ngx_http_omni_zone_name);
        return NGX_ERROR;
    }

    mcf->shm_zone->init = ngx_http_omni_init_zone;
    mcf->shm_zone->data = zone;

    return NGX_OK;
}


static ngx_int_t
ngx_http_omni_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_omni_zone_t  *ozone = data;

    size_t                  len;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_zone_t   *zone;
    ngx_http_omni_shctx_t  *sh;

    zone = shm_zone->data;

    if (ozone) {
        /*
         * reload: the zone kept its size, keep its state, if the new
         * configuration agrees with what the zone was built with; if not,
         * the reload is refused and the old configuration keeps serving.
         */
        zone->shpool = ozone->shpool;
        zone->sh = ozone->sh;

        ngx_shmtx_lock(&zone->shpool->mutex);

        if (ngx_http_omni_zone_agrees(zone->mcf, zone->sh, shm_zone->shm.log)
            != NGX_OK)
        {
            ngx_shmtx_unlock(&zone->shpool->mutex);
            return NGX_ERROR;
        }

        ngx_http_omni_zone_apply(zone->mcf, zone->sh);
        zone->sh->generation++;
        ngx_http_omni_map_slots(zone->mcf, zone->sh, shm_zone->shm.log);
        ngx_shmtx_unlock(&zone->shpool->mutex);

        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        zone->shpool = shpool;
        zone->sh = shpool->data;

        ngx_shmtx_lock(&shpool->mutex);
        ngx_http_omni_map_slots(zone->mcf, zone->sh, shm_zone->shm.log);
        ngx_shmtx_unlock(&shpool->mutex);

        return NGX_OK;
    }

    sh = ngx_slab_calloc(shpool, sizeof(ngx_http_omni_shctx_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    shpool->data = sh;
    sh->started = ngx_current_msec;
    sh->generation = 1;

    len = sizeof(" in omni_proxy zone \"\"") + shm_zone->shm.name.len;

    shpool->log_ctx = ngx_slab_alloc(shpool, len);
    if (shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(shpool->log_ctx, " in omni_proxy zone \"%V\"%Z",
                &shm_zone->shm.name);

    zone->shpool = shpool;
    zone->sh = sh;

    if (ngx_http_omni_zone_build(zone->mcf, sh, shpool, shm_zone->shm.size)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_omni_map_slots(zone->mcf, sh, shm_zone->shm.log);

    return NGX_OK;
}


/*
 * What a reload cannot change in a zone that keeps its state (each refusal
 * names the directive and both values, as limit_req does):
 *
 *   omni_block_size   the index holds hashes of blocks of the old size, and
 *                     workers of both configurations would share it
 *   omni_queue_max    above the capacity the queues were allocated with
 *   omni_cache_ttl    the index's expiry is fixed when it is built
 *   instances         more than the index was sized for
 *
 * omni_zone_size is nginx's: another size is another zone, built afresh.
 * Everything else is applied (ngx_http_omni_zone_apply(), or read from the
 * configuration by each worker).
 */
static ngx_int_t
ngx_http_omni_zone_agrees(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_log_t *log)
{
    ngx_uint_t  t, n;

    if (mcf->block_size != sh->block_size) {
        ngx_log_error(NGX_LOG_EMERG, log, 0,
                      "\"omni_block_size\" is %ui, the zone \"%V\" was built "
                      "with %uD: restart nginx to change it",
                      mcf->block_size, &ngx_http_omni_zone_name,
                      sh->block_size);
        return NGX_ERROR;
    }

    if (mcf->queue_max > sh->q_cap) {
        ngx_log_error(NGX_LOG_EMERG, log, 0,
                      "\"omni_queue_max\" is %ui, the zone \"%V\" was built "
                      "with %uD: restart nginx to raise it",
                      mcf->queue_max, &ngx_http_omni_zone_name, sh->q_cap);
        return NGX_ERROR;
    }

    if (mcf->cache_ttl != sh->cache_ttl) {
        ngx_log_error(NGX_LOG_EMERG, log, 0,
                      "\"omni_cache_ttl\" is %Mms, the zone \"%V\" was built "
                      "with %Mms: restart nginx to change it",
                      mcf->cache_ttl, &ngx_http_omni_zone_name,
                      sh->cache_ttl);
        return NGX_ERROR;
    }

    n = 0;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        if (mcf->tiers[t]) {
            n += mcf->tiers[t]->n;
        }
    }

    if (n > sh->index_instances) {
        ngx_log_error(NGX_LOG_EMERG, log, 0,
                      "%ui instances are configured, the prefix index of "
                      "zone \"%V\" was built for %uD: restart nginx to "
                      "add more", n, &ngx_http_omni_zone_name,
                      sh->index_instances);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* What a reload changes in a zone that keeps its state; locked. */
static void
ngx_http_omni_zone_apply(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh)
{
    uint32_t  s, cap;

    if (mcf->cache_blocks != sh->cache_blocks) {
        /* 0: as many as the index holds; a smaller capacity evicts now */
        cap = (mcf->cache_blocks == 0 || mcf->cache_blocks > sh->index_entries)
              ? sh->index_entries : (uint32_t) mcf->cache_blocks;

        for (s = 0; s < sh->index_instances; s++) {
            (void) omni_index_set_capacity(sh->index, s, cap);
        }

        sh->cache_blocks = (uint32_t) mcf->cache_blocks;
    }

    /* requests held under the old policy are answered, never rebound for
     * the other tier (ngx_http_omni_schedule()) */
    sh->pd_policy = (uint32_t) mcf->pd_policy;
    (void) omni_predict_set_flags(sh->predict,
                                  ngx_http_omni_predict_flags(mcf));
}


/* parallel P/D: a prefill leg answers after its KV transfer */
static uint32_t
ngx_http_omni_predict_flags(ngx_http_omni_main_conf_t *mcf)
{
    return mcf->pd_policy == NGX_HTTP_OMNI_PARALLEL ? OMNI_PREDICT_TRANSFER
                                                    : 0;
}


static void
ngx_http_omni_map_slots(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_log_t *log)
{
    ngx_str_t                      *name;
    ngx_uint_t                      t, i, s, free_slot;
    ngx_http_omni_inst_t           *in;
    ngx_http_upstream_rr_peer_t    *peer;
    ngx_http_omni_upstream_conf_t  *ucf;

    for (s = 0; s < sh->n_slots; s++) {
        sh->inst[s].configured = 0;
    }

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        ucf = mcf->tiers[t];
        if (ucf == NULL) {
            continue;
        }

        for (i = 0; i < ucf->n; i++) {
            peer = ucf->peers[i];
            name = &peer->name;

            free_slot = NGX_HTTP_OMNI_MAX_SLOTS;

            for (s = 0; s < sh->n_slots; s++) {
                in = &sh->inst[s];

                if (!in->used) {
                    if (free_slot == NGX_HTTP_OMNI_MAX_SLOTS) {
                        free_slot = s;
                    }
                    continue;
                }

                if (in->role == t && !in->configured
                    && in->addr_len == name->len
                    && ngx_memcmp(in->addr, name->data, name->len) == 0)
                {
                    break;
                }
            }

            if (s == sh->n_slots) {
                /* a new instance: an unused slot, else a retired idle one */

                s = free_slot;

                if (s == NGX_HTTP_OMNI_MAX_SLOTS
                    && sh->n_slots < NGX_HTTP_OMNI_MAX_SLOTS)
                {
                    s = sh->n_slots++;
                }

                if (s == NGX_HTTP_OMNI_MAX_SLOTS) {
                    for (s = 0; s < sh->n_slots; s++) {
                        if (!sh->inst[s].configured
                            && sh->inst[s].inflight_requests == 0)
                        {
                            break;
                        }
                    }
                }

                if (s == sh->n_slots || s == NGX_HTTP_OMNI_MAX_SLOTS) {
                    ngx_log_error(NGX_LOG_ALERT, log, 0,
                                  "omni: more than %d instances, \"%V\" "
                                  "is not tracked", NGX_HTTP_OMNI_MAX_SLOTS,
                                  name);
                    ucf->slots[i] = NGX_HTTP_OMNI_MAX_SLOTS;
                    continue;
                }

                in = &sh->inst[s];
                ngx_memzero(in, sizeof(ngx_http_omni_inst_t));

                /* a new instance: nothing learned or cached about the one
                 * that had the slot before */
                if (sh->predict) {
                    (void) omni_predict_reset(sh->predict, (uint32_t) s);
                }

                if (sh->index && s < sh->index_instances) {
                    (void) omni_index_clear(sh->index, (uint32_t) s);
                }

                ngx_memzero(&sh->ingest[s], sizeof(omni_ingest_inst_t));
                in->used = 1;
                in->role = (uint8_t) t;
                in->addr_len = (uint16_t) ngx_min(name->len,
                                                  NGX_HTTP_OMNI_ADDR_LEN);
                ngx_memcpy(in->addr, name->data, in->addr_len);
            }

            in = &sh->inst[s];
            in->configured = 1;
            in->max_fails = (uint32_t) peer->max_fails;
            in->fail_timeout = (ngx_msec_t) peer->fail_timeout * 1000;
            in->bootstrap_port = ucf->bootstrap_ports[i];
            ucf->slots[i] = s;
        }
    }
}


ngx_http_omni_shctx_t *
ngx_http_omni_shm(ngx_http_omni_main_conf_t *mcf, ngx_slab_pool_t **shpool)
{
    ngx_http_omni_zone_t  *zone;

    zone = mcf->shm_zone->data;

    if (shpool) {
        *shpool = zone->shpool;
    }

    return zone->sh;
}


/*
 * One outcome counted in the zone: reason < 0 bumps the uint64_t at offset
 * `done` of the shared context, otherwise element `reason` of the uint64_t
 * array at offset `failed` (the tokenizer's and answer learning's counters).
 */
void
ngx_http_omni_zone_count(ngx_http_omni_main_conf_t *mcf, size_t done,
    size_t failed, ngx_int_t reason)
{
    u_char           *base;
    ngx_slab_pool_t  *shpool;

    base = (u_char *) ngx_http_omni_shm(mcf, &shpool);
    if (base == NULL) {
        return;
    }

    ngx_shmtx_lock(&shpool->mutex);

    if (reason < 0) {
        (*(uint64_t *) (base + done))++;

    } else {
        ((uint64_t *) (base + failed))[reason]++;
    }

    ngx_shmtx_unlock(&shpool->mutex);
}


ngx_uint_t
ngx_http_omni_inst_usable(ngx_http_omni_inst_t *in, ngx_msec_t now)
{
    if (!in->used || !in->configured) {
        return 0;
    }

    /* the KV-event agent's /health probes (ngx_http_omni_ingest.c) */
    if (in->agent_down) {
        return 0;
    }

    if (in->max_fails && in->fails >= in->max_fails
        && (ngx_msec_int_t) (in->down_until - now) > 0)
    {
        return 0;
    }

    return 1;
}


static void
ngx_http_omni_observe_locked(ngx_http_omni_shctx_t *sh, ngx_uint_t hist,
    ngx_msec_t from, ngx_msec_t to)
{
    ngx_uint_t             i;
    ngx_msec_t             ms;
    ngx_http_omni_hist_t  *h;

    if (from == 0 || to == 0 || to < from) {
        return;
    }

    ms = to - from;
    h = &sh->hists[hist];

    for (i = 0; i < NGX_HTTP_OMNI_BUCKETS; i++) {
        if ((double) ms <= ngx_http_omni_bucket_bounds[i] * 1000) {
            h->buckets[i]++;
            break;
        }
    }

    h->count++;
    h->sum_ms += ms;
}


/* What a finished request adds to the metrics; the zone is locked. */
void
ngx_http_omni_metrics_locked(ngx_http_omni_shctx_t *sh, ngx_uint_t route,
    ngx_uint_t mode, ngx_uint_t status, ngx_http_omni_ctx_t *ctx)
{
    ngx_uint_t            i;
    ngx_http_omni_leg_t  *p;

    for (i = 1; i < NGX_HTTP_OMNI_STATUSES; i++) {
        if (ngx_http_omni_status_codes[i] == status) {
            break;
        }
    }

    if (i == NGX_HTTP_OMNI_STATUSES) {
        i = 0;
    }

    p = &ctx->legs[NGX_HTTP_OMNI_PREFILL];

    sh->requests[route][mode][i]++;

    if (status >= 500 || status == 499) {
        sh->errors_total++;
    }

    ngx_http_omni_observe_locked(sh, NGX_HTTP_OMNI_HIST_QUEUE,
                                 ctx->t_start, ctx->t_released);
    ngx_http_omni_observe_locked(sh, NGX_HTTP_OMNI_HIST_PREFILL,
                                 p->dispatched, p->finished);
    ngx_http_omni_observe_locked(sh, NGX_HTTP_OMNI_HIST_TTFT,
                                 ctx->t_start, ctx->t_first_byte);
    ngx_http_omni_observe_locked(sh, NGX_HTTP_OMNI_HIST_TOTAL,
                                 ctx->t_start, ctx->t_end);
}


uint64_t
ngx_http_omni_now_us(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}


static ngx_int_t
ngx_http_omni_zone_build(ngx_http_omni_main_conf_t *mcf,
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
    pcfg.flags = ngx_http_omni_predict_flags(mcf);

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


/*
 * glibc's malloc, left to itself, gives the top of the heap back to the
 * kernel once more than twice its largest recent mmap()ed block lies free
 * there (about 400 KB after one 200 KB request body).  A worker with a few
 * dozen large bodies in flight, held or proxied, then shrinks its heap after
 * each burst and grows it again for the next: every body's pages are
 * faulted in and zeroed anew (brk() hundreds of times a second, page faults
 * and unmapping a tenth of the worker's time at 200 KB prompts;
 * docs/internals.md).
 * Fixing the thresholds at the largest values glibc's own adaptation
 * reaches (a block up to 32 MiB comes from the heap, up to 64 MiB free at
 * its top is kept) keeps such a heap in place.  An operator's own
 * thresholds in GLIBC_TUNABLES are left to rule.  The master sets them before
 * the workers fork, since a worker's environment is cleared.
 */
#define NGX_HTTP_OMNI_MMAP_THRESHOLD  (32 * 1024 * 1024)
#define NGX_HTTP_OMNI_TRIM_THRESHOLD  (64 * 1024 * 1024)


static void
ngx_http_omni_tune_malloc(ngx_cycle_t *cycle)
{
#if (defined __GLIBC__)
    char  *tunables;

    tunables = getenv("GLIBC_TUNABLES");

    if (tunables != NULL
        && (ngx_strstr(tunables, "glibc.malloc.mmap_threshold") != NULL
            || ngx_strstr(tunables, "glibc.malloc.trim_threshold") != NULL))
    {
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "omni: malloc thresholds left to GLIBC_TUNABLES");
        return;
    }

    if (mallopt(M_MMAP_THRESHOLD, NGX_HTTP_OMNI_MMAP_THRESHOLD) != 1
        || mallopt(M_TRIM_THRESHOLD, NGX_HTTP_OMNI_TRIM_THRESHOLD) != 1)
    {
        /* a sanitizer's allocator, which glibc's thresholds do not govern */
        ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                      "omni: mallopt() refused the heap thresholds");
    }
#endif
}


/*
 * At module init (in the master, before the workers fork): the heap's
 * thresholds (above), and one eventfd per worker, through which the others
 * wake it for a request released for it (ngx_http_omni_hold.c).
 */
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

    ngx_http_omni_tune_malloc(cycle);

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
