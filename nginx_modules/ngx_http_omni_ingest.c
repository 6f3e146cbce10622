/*
 * Omni Proxy nginx module: the KV-event agent's batches (`omni_ingest;`).
 *
 * `omni-ctl agent` POSTs binary batches (docs/agent.md) to a loopback-only
 * location with this handler.  The whole body is read first, then applied
 * with one call of the scoring library's omni_ingest_apply() under the zone
 * lock, by whichever worker got it.  Nothing in the request path waits for
 * the agent: a worker that received batches keeps a timer that turns the
 * instances of a silent agent approximate after a TTL and forgets the health
 * it reported.  With a status token the location requires it (the access
 * module's 401); such refusals are counted here, from the log phase.
 */


#include "ngx_http_omni.h"
#include "omni_ingest.h"


#define NGX_HTTP_OMNI_INGEST_TICK     1000
/* the agent's batches stay under 256 KiB plus one record */
#define NGX_HTTP_OMNI_INGEST_MAX      (4 * 1024 * 1024)


static void ngx_http_omni_ingest_body(ngx_http_request_t *r);
static void ngx_http_omni_ingest_tick(ngx_event_t *ev);
static ngx_int_t ngx_http_omni_ingest_log(ngx_http_request_t *r);


static ngx_event_t  ngx_http_omni_ingest_timer;


/*
 * A load report just applied counts our own legs as they were at the
 * scrape, a moment ago: note our figure now, so that scheduling adds only
 * what the engine reports beyond it (omni_ingest_blend_running).  Locked.
 */
static void
ngx_http_omni_ingest_ours_locked(ngx_http_omni_shctx_t *sh)
{
    uint32_t    ours[NGX_HTTP_OMNI_MAX_SLOTS];
    ngx_uint_t  i;

    for (i = 0; i < sh->n_slots && i < NGX_HTTP_OMNI_MAX_SLOTS; i++) {
        ours[i] = (uint32_t) sh->inst[i].inflight_requests;
    }

    (void) omni_ingest_note_ours(sh->ingest, i, ours);
}


/*
 * The health the agent reported goes into the instance's own flag, which
 * ngx_http_omni_inst_usable() checks; an expired agent's report is
 * forgotten.  Returns 1 when an instance became usable again.  Locked.
 */
static ngx_uint_t
ngx_http_omni_ingest_health_locked(ngx_http_omni_shctx_t *sh)
{
    uint8_t              down;
    ngx_uint_t           s, up;
    omni_ingest_inst_t  *ii;

    up = 0;

    for (s = 0; s < sh->n_slots; s++) {
        ii = &sh->ingest[s];
        down = (ii->health == OMNI_INGEST_HEALTH_DOWN);

        if (sh->inst[s].agent_down && !down) {
            up = 1;
        }

        sh->inst[s].agent_down = down;
    }

    return up;
}


/* Records older than the TTL: approximate, health unknown.  Locked. */
static ngx_uint_t
ngx_http_omni_ingest_expire_locked(ngx_http_omni_shctx_t *sh,
    uint64_t now_us)
{
    ngx_uint_t           s;
    uint64_t             ttl_us;
    omni_ingest_inst_t  *ii;

    ttl_us = NGX_HTTP_OMNI_INGEST_TTL_US;

    (void) omni_ingest_expire(sh->index, sh->ingest, sh->n_slots, now_us,
                              ttl_us);

    for (s = 0; s < sh->n_slots; s++) {
        ii = &sh->ingest[s];

        if (ii->health != OMNI_INGEST_HEALTH_UNKNOWN
            && now_us - ii->last_update_us > ttl_us)
        {
            ii->health = OMNI_INGEST_HEALTH_UNKNOWN;
        }
    }

    return ngx_http_omni_ingest_health_locked(sh);
}


static void
ngx_http_omni_ingest_tick(ngx_event_t *ev)
{
    ngx_uint_t                  up;
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh;
    ngx_http_omni_main_conf_t  *mcf;

    mcf = ev->data;
    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    up = ngx_http_omni_ingest_expire_locked(sh, ngx_http_omni_now_us());
    ngx_shmtx_unlock(&shpool->mutex);

    if (up) {
        ngx_http_omni_schedule(mcf);
    }

    if (!ngx_exiting && !ngx_terminate && !ngx_quit) {
        ngx_add_timer(ev, NGX_HTTP_OMNI_INGEST_TICK);
    }
}


ngx_int_t
ngx_http_omni_ingest_handler(ngx_http_request_t *r)
{
    ngx_int_t                   rc;
    ngx_http_omni_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_omni_module);

    if (mcf->shm_zone == NULL) {
        return NGX_HTTP_NOT_FOUND;
    }

    if (r->method != NGX_HTTP_POST) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    if (r->headers_in.content_length_n > NGX_HTTP_OMNI_INGEST_MAX) {
        return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
    }

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_omni_ingest_body);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


ngx_int_t
ngx_http_omni_ingest_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_omni_ingest_log;

    return NGX_OK;
}


/*
 * A batch the access phase refused (401: no or a wrong status token) never
 * reaches the handler, and the access checks are a module of their own that
 * knows nothing of the zone: count and log it here, once the answer is out.
 */
static ngx_int_t
ngx_http_omni_ingest_log(ngx_http_request_t *r)
{
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh;
    ngx_http_core_loc_conf_t   *clcf;
    ngx_http_omni_main_conf_t  *mcf;

    if (r != r->main || r->headers_out.status != NGX_HTTP_UNAUTHORIZED) {
        return NGX_OK;
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);
    mcf = ngx_http_get_module_main_conf(r, ngx_http_omni_module);

    if (clcf->handler != ngx_http_omni_ingest_handler
        || mcf->shm_zone == NULL)
    {
        return NGX_OK;
    }

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    sh->ingest_unauthorized++;
    ngx_shmtx_unlock(&shpool->mutex);

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "omni: ingest batch refused: no or a wrong status token");

    return NGX_OK;
}


/* The body in one buffer (memory or the temporary file nginx wrote). */
static u_char *
ngx_http_omni_ingest_collect(ngx_http_request_t *r, size_t *plen)
{
    off_t         size;
    u_char       *buf, *p;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    size = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    if (size > NGX_HTTP_OMNI_INGEST_MAX) {
        return NULL;
    }

    buf = ngx_palloc(r->pool, size ? (size_t) size : 1);
    if (buf == NULL) {
        return NULL;
    }

    p = buf;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            n = ngx_read_file(b->file, p, (size_t) (b->file_last - b->file_pos),
                              b->file_pos);
            if (n != b->file_last - b->file_pos) {
                return NULL;
            }

            p += n;
            continue;
        }

        p = ngx_cpymem(p, b->pos, b->last - b->pos);
    }

    *plen = p - buf;

    return buf;
}


static void
ngx_http_omni_ingest_body(ngx_http_request_t *r)
{
    int                             rc;
    u_char                         *buf, *msg;
    uint32_t                        reason;
    uint64_t                        offset, ends;
    size_t                          len, n_names;
    ngx_str_t                       type;
    ngx_uint_t                      t, i, up;
    ngx_slab_pool_t                *shpool;
    omni_ingest_name_t             *names;
    ngx_http_omni_shctx_t          *sh;
    ngx_http_omni_main_conf_t      *mcf;
    ngx_http_omni_upstream_conf_t  *ucf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_omni_module);

    if (r->request_body == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_BAD_REQUEST);
        return;
    }

    len = 0;
    buf = ngx_http_omni_ingest_collect(r, &len);
    if (buf == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    /* the agent names instances as the upstreams' server lines do */

    n_names = 0;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        if (mcf->tiers[t]) {
            n_names += mcf->tiers[t]->n;
        }
    }

    names = ngx_palloc(r->pool,
                       (n_names ? n_names : 1) * sizeof(omni_ingest_name_t));
    if (names == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    n_names = 0;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        ucf = mcf->tiers[t];
        if (ucf == NULL) {
            continue;
        }

        for (i = 0; i < ucf->n; i++) {
            if (ucf->slots[i] >= NGX_HTTP_OMNI_MAX_SLOTS) {
                continue;
            }

            names[n_names].name = (const char *) ucf->peers[i]->name.data;
            names[n_names].len = ucf->peers[i]->name.len;
            names[n_names].inst = (uint32_t) ucf->slots[i];
            n_names++;
        }
    }

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);

    ends = sh->ingest_stats.engine_ends;

    /* the predictor hears the ends of prefills in flight too */
    rc = omni_ingest_apply_to(sh->index, sh->predict, sh->ingest, sh->n_slots,
                              names, n_names, buf, len,
                              ngx_http_omni_now_us(), &sh->ingest_stats);
    ngx_http_omni_ingest_ours_locked(sh);
    up = ngx_http_omni_ingest_health_locked(sh);
    ends = sh->ingest_stats.engine_ends != ends;
    reason = sh->ingest_stats.last_reason;
    offset = sh->ingest_stats.last_offset;

    ngx_shmtx_unlock(&shpool->mutex);

    if (ngx_http_omni_ingest_timer.handler == NULL) {
        ngx_http_omni_ingest_timer.handler = ngx_http_omni_ingest_tick;
        ngx_http_omni_ingest_timer.log = ngx_cycle->log;
        ngx_http_omni_ingest_timer.data = mcf;
        ngx_http_omni_ingest_timer.cancelable = 1;
        ngx_add_timer(&ngx_http_omni_ingest_timer, NGX_HTTP_OMNI_INGEST_TICK);
    }

    /* an instance back up, or one whose prefills ended sooner than
     * predicted: held requests may go */
    if (up || ends) {
        ngx_http_omni_schedule(mcf);
    }

    if (rc >= 0) {
        r->headers_out.status = NGX_HTTP_NO_CONTENT;
        r->header_only = 1;
        r->headers_out.content_length_n = 0;
        ngx_http_finalize_request(r, ngx_http_send_header(r));
        return;
    }

    msg = (u_char *) omni_ingest_strreason(reason);

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "omni: ingest batch rejected: %s at byte %uL", msg,
                  offset);

    ngx_str_set(&type, "text/plain");

    ngx_http_finalize_request(r, ngx_http_omni_send(r, NGX_HTTP_BAD_REQUEST,
                              &type, msg, ngx_strlen(msg)));
}
