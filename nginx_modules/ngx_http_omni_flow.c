/*
 * Omni Proxy nginx module: the request flow of /v1/completions and
 * /v1/chat/completions.
 *
 *   read the body -> validate it (top-level keys only) -> choose instances
 *   -> sequential: prefill leg, then decode leg with its kv_transfer_params
 *      parallel:   both legs at once, paired by a bootstrap room
 *      aggregated: one leg to the decode tier
 *   -> the decode leg streams to the client; the main request ends the
 *      response, or reports a failure as one JSON error (before the first
 *      byte) or one SSE error event (after it).
 *
 * The body and its validation are in ngx_http_omni_request.c, the answers
 * the proxy gives itself in ngx_http_omni_answer.c.  Every request gets
 * exactly one answer; the load each leg was charged is released exactly
 * once (balancer free, or the cleanup for a leg that never reached an
 * upstream).
 */


#include "ngx_http_omni.h"


#define NGX_HTTP_OMNI_MAX_EDITS      8


static void ngx_http_omni_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_omni_dispatch(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_held(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t queue);
static ngx_int_t ngx_http_omni_not_released(ngx_http_omni_ctx_t *ctx,
    ngx_int_t rc);
static ngx_int_t ngx_http_omni_start(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_bootstrap_value(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t which, omni_json_edit_t *e);
static ngx_int_t ngx_http_omni_start_decode_kv(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_start_prefill(ngx_http_omni_ctx_t *ctx,
    omni_json_edit_t *edits, size_t n_edits);
static ngx_int_t ngx_http_omni_start_decode(ngx_http_omni_ctx_t *ctx,
    omni_json_edit_t *edits, size_t n_edits);
static ngx_int_t ngx_http_omni_after_prefill(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_finish(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_advance(ngx_http_omni_ctx_t *ctx);
static void ngx_http_omni_wake(ngx_http_request_t *r);
static ngx_int_t ngx_http_omni_build_body(ngx_http_omni_ctx_t *ctx,
    omni_json_edit_t *edits, size_t n_edits, ngx_chain_t **out, off_t *len);
static void ngx_http_omni_cleanup(void *data);


/* PROTOCOLS.md section 2: what the prefill leg asks of the engine */
static u_char  ngx_http_omni_kv_request[] =
    "{\"do_remote_decode\":true,\"do_remote_prefill\":false,"
    "\"remote_engine_id\":null,\"remote_block_ids\":null,"
    "\"remote_host\":null,\"remote_port\":null}";


#define ngx_http_omni_edit(e, o, k, v, vl)                                   \
    (e)->op = (o); (e)->key = (k); (e)->key_len = sizeof(k) - 1;             \
    (e)->value = (const uint8_t *) (v); (e)->value_len = (vl)


ngx_int_t
ngx_http_omni_handler(ngx_http_request_t *r)
{
    ngx_int_t                   rc;
    ngx_pool_cleanup_t         *cln;
    ngx_http_omni_ctx_t        *ctx;
    ngx_http_omni_main_conf_t  *mcf;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni handler");

    if (r != r->main) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_omni_module);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_omni_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->mcf = mcf;
    ctx->mode = mcf->pd_policy;
    ctx->t_start = ngx_current_msec;
    ctx->max_tokens = -1;
    ctx->engine_cached = -1;
    ctx->qentry = NGX_HTTP_OMNI_NONE;
    ngx_queue_init(&ctx->held);
    ctx->legs[NGX_HTTP_OMNI_PREFILL].tier = NGX_HTTP_OMNI_PREFILL;
    ctx->legs[NGX_HTTP_OMNI_DECODE].tier = NGX_HTTP_OMNI_DECODE;

    if (r->uri.len >= sizeof("/chat/completions") - 1
        && ngx_strncmp(r->uri.data + r->uri.len
                       - (sizeof("/chat/completions") - 1),
                       "/chat/completions",
                       sizeof("/chat/completions") - 1) == 0)
    {
        ctx->route = NGX_HTTP_OMNI_ROUTE_CHAT;

    } else {
        ctx->route = NGX_HTTP_OMNI_ROUTE_COMPLETIONS;
    }

    ngx_http_set_ctx(r, ctx, ngx_http_omni_module);
    ngx_http_omni_read_headers(ctx);

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_omni_cleanup;
    cln->data = ctx;

    ngx_http_omni_ledger_request_begin(mcf);

    if (!(r->method & NGX_HTTP_POST)) {
        return ngx_http_omni_send_error(r, NGX_HTTP_NOT_ALLOWED,
                                        "invalid_request_error",
                                        "method %V is not allowed, use POST",
                                        &r->method_name);
    }

    /* room in the body buffer to join the body in place (request.c) */
    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_omni_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        if (rc == NGX_HTTP_REQUEST_ENTITY_TOO_LARGE) {
            r->keepalive = 0;
            return ngx_http_omni_send_error(r, rc, "invalid_request_error",
                                            "request body is too large");
        }

        ctx->status = rc;
        return rc;
    }

    return NGX_DONE;
}


static void
ngx_http_omni_body_handler(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_http_omni_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_omni_module);

    if (r->connection->error) {
        ngx_http_finalize_request(r, NGX_HTTP_CLIENT_CLOSED_REQUEST);
        return;
    }

    /* NGX_OK with header_sent: an error answer already went out */

    rc = ngx_http_omni_read_body(ctx);

    if (rc == NGX_OK && !ctx->header_sent) {
        rc = ngx_http_omni_parse(ctx);
    }

    if (rc == NGX_OK && !ctx->header_sent) {
        /* from here on a client that goes away is noticed at once */
        r->read_event_handler = ngx_http_test_reading;
        r->write_event_handler = ngx_http_omni_wake;

        rc = ngx_http_omni_deadline_arm(ctx);

        if (rc == NGX_OK) {
            /* NGX_DONE: waiting for the tokenizer, ngx_http_omni_wake()
             * goes on */
            rc = ngx_http_omni_tokenize(ctx);

            if (rc == NGX_DECLINED) {
                rc = ngx_http_omni_dispatch(ctx);

            } else if (rc == NGX_ERROR) {
                rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }
    }

    if (rc == NGX_DONE) {
        /* legs in flight: ngx_http_omni_wake() goes on */
        return;
    }

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_http_omni_no_instance(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier)
{
    ngx_http_omni_retry_after(ctx->request);

    ctx->error = "no_instance";

    return ngx_http_omni_send_error(ctx->request,
                                    NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "server_error",
                                    "no usable %s instance",
                                    tier == NGX_HTTP_OMNI_PREFILL
                                    ? "prefill" : "decode");
}


/* Hold the request; the proxy answers 429 itself when the queues are full. */
static ngx_int_t
ngx_http_omni_held(ngx_http_omni_ctx_t *ctx, ngx_uint_t queue)
{
    ngx_int_t  rc;

    rc = ngx_http_omni_hold(ctx, queue);

    if (rc == NGX_DONE) {
        return NGX_DONE;
    }

    ngx_http_omni_retry_after(ctx->request);

    if (rc == NGX_BUSY) {
        ctx->error = "slo_reject";
        return ngx_http_omni_send_error(ctx->request,
                                        NGX_HTTP_TOO_MANY_REQUESTS,
                                        "rate_limit_error",
                                        "the proxy's queue cannot meet the "
                                        "request's TTFT objective (%M ms), "
                                        "retry later",
                                        (ngx_msec_t) (ctx->slo_ttft_us
                                                      / 1000));
    }

    ctx->error = "queue_full";
    return ngx_http_omni_send_error(ctx->request, NGX_HTTP_TOO_MANY_REQUESTS,
                                    "rate_limit_error",
                                    "the proxy's queue is full (%ui "
                                    "requests waiting), retry later",
                                    ctx->mcf->queue_max);
}


/* A held request that will not be released: its one answer. */
static ngx_int_t
ngx_http_omni_not_released(ngx_http_omni_ctx_t *ctx, ngx_int_t rc)
{
    ngx_http_request_t  *r;

    r = ctx->request;

    if (rc != NGX_HTTP_SERVICE_UNAVAILABLE) {
        return rc;
    }

    if (ngx_strcmp(ctx->error, "stale_binding") == 0) {
        return ngx_http_omni_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "server_error",
                                        "the instance chosen for the "
                                        "request left the configuration");
    }

    ngx_http_omni_retry_after(r);

    if (ngx_strcmp(ctx->error, "queue_timeout") == 0) {
        return ngx_http_omni_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "server_error",
                                        "no instance could take the request "
                                        "within %M ms (omni_queue_timeout)",
                                        ngx_current_msec - ctx->t_start);
    }

    return ngx_http_omni_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "server_error", "no usable %s instance",
                                    ctx->qstage == NGX_HTTP_OMNI_Q_DECODE
                                    || ctx->mode == NGX_HTTP_OMNI_AGGREGATED
                                    ? "decode" : "prefill");
}


/* Choose the instances now, or hold the request until the scheduler does. */
static ngx_int_t
ngx_http_omni_dispatch(ngx_http_omni_ctx_t *ctx)
{
    ngx_http_request_t  *r;

    r = ctx->request;

    if (ctx->mcf->tiers[NGX_HTTP_OMNI_DECODE] == NULL
        || (ctx->mode != NGX_HTTP_OMNI_AGGREGATED
            && ctx->mcf->tiers[NGX_HTTP_OMNI_PREFILL] == NULL))
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "omni: \"omni_pd_policy %s\" needs an upstream with "
                      "\"omni_balance %s\"",
                      ctx->mode == NGX_HTTP_OMNI_AGGREGATED
                      ? "aggregated" : "sequential|parallel",
                      ctx->mcf->tiers[NGX_HTTP_OMNI_DECODE]
                      ? "prefill" : "decode");
        return ngx_http_omni_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                        "server_error",
                                        "the proxy has no instances "
                                        "configured for this mode");
    }

    if (ctx->mcf->max_model_len
        && ctx->longest_exact >= ctx->mcf->max_model_len)
    {
        return ngx_http_omni_too_long(ctx);
    }

    if (ngx_http_omni_hash_prompt(ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->output_tokens = ngx_http_omni_expected_output(ctx);

    if (ngx_http_omni_uses_queue(ctx->mcf)) {
        if (ngx_http_omni_start_now(ctx, NGX_HTTP_OMNI_Q_PREFILL) == NGX_OK) {
            return ngx_http_omni_start(ctx);
        }

        return ngx_http_omni_held(ctx, NGX_HTTP_OMNI_Q_PREFILL);
    }

    switch (ctx->mode) {

    case NGX_HTTP_OMNI_AGGREGATED:
        if (ngx_http_omni_choose(ctx, NGX_HTTP_OMNI_DECODE,
                                 ctx->prompt_tokens + ctx->output_tokens)
            != NGX_OK)
        {
            return ngx_http_omni_no_instance(ctx, NGX_HTTP_OMNI_DECODE);
        }

        break;

    case NGX_HTTP_OMNI_SEQUENTIAL:
        if (ngx_http_omni_choose(ctx, NGX_HTTP_OMNI_PREFILL,
                                 ctx->prompt_tokens)
            != NGX_OK)
        {
            return ngx_http_omni_no_instance(ctx, NGX_HTTP_OMNI_PREFILL);
        }

        break;

    default: /* NGX_HTTP_OMNI_PARALLEL */

        if (ngx_http_omni_choose(ctx, NGX_HTTP_OMNI_PREFILL,
                                 ctx->prompt_tokens)
            != NGX_OK)
        {
            return ngx_http_omni_no_instance(ctx, NGX_HTTP_OMNI_PREFILL);
        }

        if (ngx_http_omni_choose(ctx, NGX_HTTP_OMNI_DECODE,
                                 ctx->prompt_tokens + ctx->output_tokens)
            != NGX_OK)
        {
            return ngx_http_omni_no_instance(ctx, NGX_HTTP_OMNI_DECODE);
        }

        break;
    }

    return ngx_http_omni_start(ctx);
}


/*
 * One of the three SGLang bootstrap fields as an edit: bootstrap_host (the
 * chosen prefill instance's host), bootstrap_port (its bootstrap port) or
 * bootstrap_room (random in [0, 2^63)); a list of them for a batch.
 */
static ngx_int_t
ngx_http_omni_bootstrap_value(ngx_http_omni_ctx_t *ctx, ngx_uint_t which,
    omni_json_edit_t *e)
{
    u_char                         *v, *p;
    size_t                          host_len, k, n;
    uint64_t                        room;
    ngx_str_t                      *name;
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = ctx->mcf->tiers[NGX_HTTP_OMNI_PREFILL];
    name = &ucf->peers[ctx->legs[NGX_HTTP_OMNI_PREFILL].index]->name;

    host_len = name->len;

    while (host_len && name->data[host_len - 1] != ':') {
        host_len--;
    }

    host_len = host_len ? host_len - 1 : name->len;

    n = ctx->batch ? ctx->batch : 1;

    v = ngx_pnalloc(ctx->request->pool,
                    n * (ngx_max(host_len + 3, NGX_INT64_LEN + 1)) + 2);
    if (v == NULL) {
        return NGX_ERROR;
    }

    p = v;

    if (ctx->batch) {
        *p++ = '[';
    }

    for (k = 0; k < n; k++) {
        if (k) {
            *p++ = ',';
        }

        switch (which) {

        case 0:
            *p++ = '"';
            p = ngx_cpymem(p, name->data, host_len);
            *p++ = '"';
            break;

        case 1:
            p = ngx_sprintf(p, "%d", (int) ucf->bootstrap_ports[
                                       ctx->legs[NGX_HTTP_OMNI_PREFILL].index]);
            break;

        default:
            room = ((uint64_t) ngx_random() << 33)
                   ^ ((uint64_t) ngx_random() << 12)
                   ^ (uint64_t) ngx_random();
            room &= 0x7fffffffffffffffULL;

            p = ngx_sprintf(p, "%uL", room);
            break;
        }
    }

    if (ctx->batch) {
        *p++ = ']';
    }

    e->op = OMNI_JSON_SET;
    e->key = which == 0 ? "bootstrap_host"
             : which == 1 ? "bootstrap_port" : "bootstrap_room";
    e->key_len = ngx_strlen(e->key);
    e->value = v;
    e->value_len = p - v;

    return NGX_OK;
}


/* The instances are bound: send the first leg(s). */
static ngx_int_t
ngx_http_omni_start(ngx_http_omni_ctx_t *ctx)
{
    ngx_uint_t           k;
    omni_json_edit_t     edits[NGX_HTTP_OMNI_MAX_EDITS], *e;

    if (ctx->t_released == 0) {
        ctx->t_released = ngx_current_msec;
    }

    switch (ctx->mode) {

    case NGX_HTTP_OMNI_AGGREGATED:
        return ngx_http_omni_start_decode(ctx, NULL, 0);

    case NGX_HTTP_OMNI_SEQUENTIAL:
        e = edits;
        ngx_http_omni_edit(e, OMNI_JSON_SET, "max_tokens", "1", 1);
        e++;

        if (omni_json_find(ctx->body, ctx->members, ctx->n_members,
                           "max_completion_tokens",
                           sizeof("max_completion_tokens") - 1)
            >= 0)
        {
            ngx_http_omni_edit(e, OMNI_JSON_SET, "max_completion_tokens",
                               "1", 1);
            e++;
        }

        ngx_http_omni_edit(e, OMNI_JSON_SET, "stream", "false", 5);
        e++;
        ngx_http_omni_edit(e, OMNI_JSON_DELETE, "stream_options", NULL, 0);
        e++;
        ngx_http_omni_edit(e, OMNI_JSON_DELETE, "min_tokens", NULL, 0);
        e++;
        ngx_http_omni_edit(e, OMNI_JSON_DELETE, "min_completion_tokens",
                           NULL, 0);
        e++;
        ngx_http_omni_edit(e, OMNI_JSON_SET, "kv_transfer_params",
                           ngx_http_omni_kv_request,
                           sizeof(ngx_http_omni_kv_request) - 1);
        e++;

        if (ngx_http_omni_start_prefill(ctx, edits, e - edits) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return NGX_DONE;

    default: /* NGX_HTTP_OMNI_PARALLEL */

        /* bootstrap_host/port of the chosen prefill, a random room */

        e = edits;

        for (k = 0; k < 3; k++) {
            if (ngx_http_omni_bootstrap_value(ctx, k, e) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            e++;
        }

        /* the decode leg first: it owns the client's output */

        if (ngx_http_omni_start_decode(ctx, edits, e - edits) != NGX_DONE) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ngx_http_omni_start_prefill(ctx, edits, e - edits) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return NGX_DONE;
    }
}


/* The prefill leg with the body edited: an in-memory background leg. */
static ngx_int_t
ngx_http_omni_start_prefill(ngx_http_omni_ctx_t *ctx, omni_json_edit_t *edits,
    size_t n_edits)
{
    off_t         len;
    ngx_chain_t  *body;

    if (ngx_http_omni_build_body(ctx, edits, n_edits, &body, &len) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_omni_start_leg(ctx, NGX_HTTP_OMNI_PREFILL, body, len, 1);
}


static ngx_int_t
ngx_http_omni_start_decode(ngx_http_omni_ctx_t *ctx, omni_json_edit_t *edits,
    size_t n_edits)
{
    off_t         len;
    ngx_buf_t    *b;
    ngx_chain_t  *body;

    if (n_edits) {
        if (ngx_http_omni_build_body(ctx, edits, n_edits, &body, &len)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

    } else {
        /* unchanged: the body as the client sent it */

        b = ngx_calloc_buf(ctx->request->pool);
        body = ngx_alloc_chain_link(ctx->request->pool);

        if (b == NULL || body == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        /* start and end too: a retry rewinds the body to start */
        b->pos = ctx->body;
        b->last = ctx->body + ctx->body_len;
        b->start = b->pos;
        b->end = b->last;
        b->memory = 1;
        b->last_buf = 1;

        body->buf = b;
        body->next = NULL;
        len = ctx->body_len;
    }

    if (ngx_http_omni_start_leg(ctx, NGX_HTTP_OMNI_DECODE, body, len, 0)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_DONE;
}


static ngx_int_t
ngx_http_omni_build_body(ngx_http_omni_ctx_t *ctx, omni_json_edit_t *edits,
    size_t n_edits, ngx_chain_t **out, off_t *len)
{
    int               rc;
    size_t            i, cap, nseg, total;
    ngx_buf_t        *b;
    ngx_chain_t      *cl, **ll;
    omni_json_seg_t  *segs;

    cap = 2 * ctx->n_members + 6 * n_edits + 4;

    segs = ngx_palloc(ctx->request->pool, cap * sizeof(omni_json_seg_t));
    if (segs == NULL) {
        return NGX_ERROR;
    }

    rc = omni_json_plan(ctx->body, ctx->body_len, ctx->members,
                        ctx->n_members, edits, n_edits, segs, cap, &nseg,
                        &total, NULL, 0);

    if (rc != OMNI_OK) {
        ngx_log_error(NGX_LOG_ALERT, ctx->request->connection->log, 0,
                      "omni: rewriting the body failed: %s",
                      omni_strerror(rc));
        return NGX_ERROR;
    }

    ll = out;
    b = NULL;

    for (i = 0; i < nseg; i++) {
        if (segs[i].len == 0) {
            continue;
        }

        b = ngx_calloc_buf(ctx->request->pool);
        cl = ngx_alloc_chain_link(ctx->request->pool);

        if (b == NULL || cl == NULL) {
            return NGX_ERROR;
        }

        /* start and end too: a retry rewinds the body to start */
        b->pos = (u_char *) segs[i].ptr;
        b->last = b->pos + segs[i].len;
        b->start = b->pos;
        b->end = b->last;
        b->memory = 1;

        cl->buf = b;
        *ll = cl;
        ll = &cl->next;
    }

    *ll = NULL;

    if (b) {
        b->last_buf = 1;
    }

    *len = total;

    return NGX_OK;
}


static void
ngx_http_omni_wake(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_http_omni_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_omni_module);

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni wake, answered: %ui", (ngx_uint_t) ctx->answered);

    if (ctx->answered) {
        return;
    }

    if (ctx->tok.pending) {
        rc = ngx_http_omni_tokenized(ctx);

        if (rc == NGX_AGAIN) {
            return;
        }

        /* NGX_OK with header_sent: the tokenizer's 400 went out, and
         * nothing may reach an engine after it */
        if (rc == NGX_OK && !ctx->header_sent) {
            rc = ngx_http_omni_dispatch(ctx);
        }

    } else if (ctx->qentry != NGX_HTTP_OMNI_NONE) {
        /* held: released, timed out, or a spurious wake-up */

        rc = ngx_http_omni_held_wake(ctx);

        if (rc == NGX_AGAIN) {
            return;
        }

        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            rc = ngx_http_omni_not_released(ctx, rc);

        } else if (rc == NGX_OK) {
            rc = (ctx->qstage == NGX_HTTP_OMNI_Q_DECODE)
                 ? ngx_http_omni_start_decode_kv(ctx)
                 : ngx_http_omni_start(ctx);
        }

    } else if (ctx->deadline_hit) {
        rc = ngx_http_omni_deadline_answer(ctx);

    } else {
        rc = ngx_http_omni_advance(ctx);
    }

    if (rc == NGX_DONE) {
        return;
    }

    ctx->answered = 1;
    ngx_http_finalize_request(r, rc);
}


static ngx_uint_t
ngx_http_omni_leg_ok(ngx_http_omni_leg_t *leg)
{
    return leg->done && !leg->failed && leg->status >= 200
           && leg->status < 300;
}


static ngx_int_t
ngx_http_omni_advance(ngx_http_omni_ctx_t *ctx)
{
    ngx_http_omni_leg_t  *p, *d;

    p = &ctx->legs[NGX_HTTP_OMNI_PREFILL];
    d = &ctx->legs[NGX_HTTP_OMNI_DECODE];

    switch (ctx->mode) {

    case NGX_HTTP_OMNI_AGGREGATED:
        break;

    case NGX_HTTP_OMNI_SEQUENTIAL:
        if (p->started && !p->done) {
            return NGX_DONE;
        }

        if (!d->started) {
            return ngx_http_omni_after_prefill(ctx);
        }

        break;

    default: /* NGX_HTTP_OMNI_PARALLEL */

        if (p->done && !ngx_http_omni_leg_ok(p) && !d->done) {
            /* no KV will ever come: do not let decode wait for it */
            ngx_http_omni_cancel_leg(ctx, NGX_HTTP_OMNI_DECODE);
            return NGX_DONE;
        }

        if (d->done && !p->done
            && (!ngx_http_omni_leg_ok(d) || d->suppress))
        {
            ngx_http_omni_cancel_leg(ctx, NGX_HTTP_OMNI_PREFILL);
        }

        break;
    }

    if (!d->done) {
        return NGX_DONE;
    }

    return ngx_http_omni_finish(ctx);
}


static ngx_int_t
ngx_http_omni_after_prefill(ngx_http_omni_ctx_t *ctx)
{
    u_char              *resp;
    size_t               len;
    long                 i;
    ngx_int_t            rc;
    omni_json_doc_t      doc;
    omni_json_member_t   members[NGX_HTTP_OMNI_MEMBERS];
    ngx_http_omni_leg_t  *p;

    p = &ctx->legs[NGX_HTTP_OMNI_PREFILL];

    if (!ngx_http_omni_leg_ok(p) || p->response == NULL) {
        return ngx_http_omni_leg_error(ctx, NGX_HTTP_OMNI_PREFILL);
    }

    resp = p->response->pos;
    len = p->response->last - p->response->pos;

    rc = omni_json_scan(resp, len, 0, members, NGX_HTTP_OMNI_MEMBERS, &doc);

    if ((rc != OMNI_OK && rc != OMNI_ERANGE)
        || doc.type != OMNI_JSON_OBJECT)
    {
        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "omni: prefill instance %V answered request %*s with "
                      "invalid JSON", ctx->mcf->tiers[NGX_HTTP_OMNI_PREFILL]
                                          ->peers[p->index]->name.data
                      ? &ctx->mcf->tiers[NGX_HTTP_OMNI_PREFILL]
                            ->peers[p->index]->name
                      : NULL,
                      ctx->request_id_len, ctx->request_id);

        ctx->error = "prefill_bad_json";
        return ngx_http_omni_send_error(ctx->request, NGX_HTTP_BAD_GATEWAY,
                                        "server_error",
                                        "the prefill instance returned "
                                        "invalid JSON");
    }

    ngx_http_omni_cache_observed(ctx, p, resp, members,
                                 ngx_min(doc.n_members, NGX_HTTP_OMNI_MEMBERS));

    i = omni_json_find(resp, members,
                       ngx_min(doc.n_members, NGX_HTTP_OMNI_MEMBERS),
                       "kv_transfer_params",
                       sizeof("kv_transfer_params") - 1);

    if (i < 0 || members[i].type == OMNI_JSON_NULL) {
        /* the request finished inside prefill (e.g. EOS at once) */
        return ngx_http_omni_answer_from_prefill(ctx, resp, len);
    }

    if (members[i].type != OMNI_JSON_OBJECT) {
        ctx->error = "prefill_bad_kv";
        return ngx_http_omni_send_error(ctx->request, NGX_HTTP_BAD_GATEWAY,
                                        "server_error",
                                        "the prefill instance returned "
                                        "kv_transfer_params that is not an "
                                        "object");
    }

    ctx->kv_params = resp + members[i].val_off;
    ctx->kv_params_len = members[i].val_len;

    if (ngx_http_omni_uses_queue(ctx->mcf)) {
        if (ngx_http_omni_start_now(ctx, NGX_HTTP_OMNI_Q_DECODE) == NGX_OK) {
            return ngx_http_omni_start_decode_kv(ctx);
        }

        /* decode work waits for a decode instance, longest first */
        return ngx_http_omni_held(ctx, NGX_HTTP_OMNI_Q_DECODE);
    }

    if (ngx_http_omni_choose(ctx, NGX_HTTP_OMNI_DECODE,
                             ctx->prompt_tokens + ctx->output_tokens)
        != NGX_OK)
    {
        return ngx_http_omni_no_instance(ctx, NGX_HTTP_OMNI_DECODE);
    }

    return ngx_http_omni_start_decode_kv(ctx);
}


/* Sequential mode: the decode leg, with the prefill's kv_transfer_params. */
static ngx_int_t
ngx_http_omni_start_decode_kv(ngx_http_omni_ctx_t *ctx)
{
    omni_json_edit_t  edit;

    if (ngx_http_omni_tokenize_kv(ctx, &ctx->kv_params, &ctx->kv_params_len)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_omni_edit(&edit, OMNI_JSON_SET, "kv_transfer_params",
                       ctx->kv_params, ctx->kv_params_len);

    return ngx_http_omni_start_decode(ctx, &edit, 1);
}


static ngx_int_t
ngx_http_omni_finish(ngx_http_omni_ctx_t *ctx)
{
    ngx_int_t             rc;
    ngx_http_request_t   *r;
    ngx_http_omni_leg_t  *d, *p;

    r = ctx->request;
    d = &ctx->legs[NGX_HTTP_OMNI_DECODE];
    p = &ctx->legs[NGX_HTTP_OMNI_PREFILL];

    if (ctx->header_sent && d->complete && !d->failed) {
        /* the decode response went out whole */
        ctx->t_end = ngx_current_msec;
        rc = ngx_http_send_special(r, NGX_HTTP_LAST);
        return rc == NGX_ERROR ? NGX_ERROR : NGX_OK;
    }

    if (ctx->header_sent) {
        if (ctx->stream) {
            ctx->error = "decode_broke";
            return ngx_http_omni_stream_error(ctx, NGX_HTTP_BAD_GATEWAY,
                "server_error",
                "the decode instance failed while streaming",
                sizeof("the decode instance failed while streaming") - 1);
        }

        /* a plain body was cut: close, so the client cannot take it whole */
        ctx->error = "decode_broke";
        return NGX_ERROR;
    }

    if (ctx->mode == NGX_HTTP_OMNI_PARALLEL && p->done && !p->cancelled
        && !ngx_http_omni_leg_ok(p))
    {
        /* the prefill failed first: decode was cancelled because of it */
        return ngx_http_omni_leg_error(ctx, NGX_HTTP_OMNI_PREFILL);
    }

    return ngx_http_omni_leg_error(ctx, NGX_HTTP_OMNI_DECODE);
}


static void
ngx_http_omni_cleanup(void *data)
{
    ngx_http_omni_ctx_t  *ctx = data;

    ngx_uint_t            t, status;
    ngx_http_request_t   *r;

    r = ctx->request;

    if (ctx->tok.timer.timer_set) {
        ngx_del_timer(&ctx->tok.timer);
    }

    ngx_http_omni_tokenize_release(ctx);
    ngx_http_omni_unhold(ctx);

    if (ctx->deadline_ev.timer_set) {
        ngx_del_timer(&ctx->deadline_ev);
    }

    /*
     * A leg no upstream holds any more (never started, or finalized with
     * no free: nothing is left to end it) gives back all it was charged,
     * its predictor job and prefilling included.
     */
    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        ngx_http_omni_ledger_release(ctx->mcf, &ctx->legs[t],
                                     NGX_HTTP_OMNI_OUTCOME_NONE, 0);
    }

    /* what it gave back may let a held request go */
    ngx_http_omni_schedule(ctx->mcf);

    status = ctx->status ? ctx->status : r->headers_out.status;

    if (!ctx->answered && r->connection->error) {
        status = 499;
    }

    if (status == 0) {
        status = 499;
    }

    if (ctx->t_end == 0) {
        ctx->t_end = ngx_current_msec;
    }

    ngx_http_omni_ledger_request_end(ctx->mcf, ctx->route, ctx->mode, status,
                                     ctx);
}

