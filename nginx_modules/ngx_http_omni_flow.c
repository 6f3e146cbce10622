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
 * Every request gets exactly one answer; the load each leg was charged is
 * released exactly once (balancer free, or the cleanup for a leg that never
 * reached an upstream).
 */


#include "ngx_http_omni.h"


#define NGX_HTTP_OMNI_MEMBERS        32
#define NGX_HTTP_OMNI_MAX_EDITS      8
#define NGX_HTTP_OMNI_DEFAULT_OUTPUT 256


static void ngx_http_omni_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_omni_read_body(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_parse(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_hash_prompt(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_dispatch(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_start(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_bootstrap_value(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t which, omni_json_edit_t *e);
static ngx_int_t ngx_http_omni_start_decode_kv(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_start_decode(ngx_http_omni_ctx_t *ctx,
    omni_json_edit_t *edits, size_t n_edits);
static ngx_int_t ngx_http_omni_after_prefill(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_finish(ngx_http_omni_ctx_t *ctx);
static ngx_int_t ngx_http_omni_advance(ngx_http_omni_ctx_t *ctx);
static void ngx_http_omni_wake(ngx_http_request_t *r);
static ngx_int_t ngx_http_omni_build_body(ngx_http_omni_ctx_t *ctx,
    omni_json_edit_t *edits, size_t n_edits, ngx_chain_t **out, off_t *len);
static ngx_int_t ngx_http_omni_answer_from_prefill(ngx_http_omni_ctx_t *ctx,
    u_char *resp, size_t len);
static ngx_int_t ngx_http_omni_leg_error(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t tier);
static ngx_int_t ngx_http_omni_stream_error(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t status, const char *type, const char *msg, size_t len);
static u_char *ngx_http_omni_error_json(ngx_pool_t *pool, ngx_uint_t status,
    const char *type, const u_char *msg, size_t msg_len, size_t *len);
static void ngx_http_omni_set_request_id(ngx_http_omni_ctx_t *ctx);
static void ngx_http_omni_cleanup(void *data);


static ngx_str_t  ngx_http_omni_json_type = ngx_string("application/json");
static ngx_str_t  ngx_http_omni_sse_type = ngx_string("text/event-stream");

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
    ngx_http_omni_set_request_id(ctx);

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_omni_cleanup;
    cln->data = ctx;

    ngx_http_omni_request_begin(mcf);

    if (!(r->method & NGX_HTTP_POST)) {
        return ngx_http_omni_send_error(r, NGX_HTTP_NOT_ALLOWED,
                                        "invalid_request_error",
                                        "method %V is not allowed, use POST",
                                        &r->method_name);
    }

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

        rc = ngx_http_omni_dispatch(ctx);
    }

    if (rc == NGX_DONE) {
        /* legs in flight: ngx_http_omni_wake() goes on */
        return;
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * The body as one contiguous buffer: nginx keeps it in one buffer when it
 * fits client_body_buffer_size, otherwise in several buffers or a temp file.
 */
static ngx_int_t
ngx_http_omni_read_body(ngx_http_omni_ctx_t *ctx)
{
    u_char              *p;
    off_t                len;
    ssize_t              n;
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    ngx_http_request_t  *r;

    r = ctx->request;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "request body is empty");
    }

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        ctx->body = cl->buf->pos;
        ctx->body_len = cl->buf->last - cl->buf->pos;
        goto done;
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    p = ngx_pnalloc(r->pool, (size_t) len + 1);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->body = p;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            n = ngx_read_file(b->file, p, (size_t) (b->file_last - b->file_pos),
                              b->file_pos);

            if (n != b->file_last - b->file_pos) {
                ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                              "omni: could not read the request body back "
                              "from \"%V\"", &b->file->name);
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            p += n;

        } else {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
        }
    }

    ctx->body_len = p - ctx->body;

done:

    if (ctx->body_len == 0) {
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "request body is empty");
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_omni_parse(ngx_http_omni_ctx_t *ctx)
{
    int                  type, etype;
    long                 i;
    size_t               n, k, vo, vl, count;
    int64_t              v;
    ngx_int_t            rc;
    omni_json_doc_t      doc;
    omni_json_member_t  *m;
    ngx_http_request_t  *r;

    r = ctx->request;

    ctx->members = ngx_palloc(r->pool,
                              NGX_HTTP_OMNI_MEMBERS
                              * sizeof(omni_json_member_t));
    if (ctx->members == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = omni_json_scan(ctx->body, ctx->body_len, 0, ctx->members,
                        NGX_HTTP_OMNI_MEMBERS, &doc);

    if (rc == OMNI_ERANGE) {
        ctx->members = ngx_palloc(r->pool,
                                  doc.n_members * sizeof(omni_json_member_t));
        if (ctx->members == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        rc = omni_json_scan(ctx->body, ctx->body_len, 0, ctx->members,
                            doc.n_members, &doc);
    }

    if (rc == OMNI_EJSON || rc == OMNI_EDEPTH) {
        ctx->error = "invalid_json";
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "request body is not valid JSON: "
                                        "%s at byte %uD",
                                        doc.err_msg ? doc.err_msg : "error",
                                        doc.err_off);
    }

    if (rc != OMNI_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "omni: json scan failed: %s", omni_strerror(rc));
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (doc.type != OMNI_JSON_OBJECT) {
        ctx->error = "not_object";
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "request body must be a JSON object");
    }

    ctx->n_members = doc.n_members;
    m = ctx->members;

#define omni_find(key)                                                       \
    omni_json_find(ctx->body, m, ctx->n_members, key, sizeof(key) - 1)

    /* stream */

    i = omni_find("stream");

    if (i >= 0) {
        if (m[i].type == OMNI_JSON_TRUE) {
            ctx->stream = 1;

        } else if (m[i].type != OMNI_JSON_FALSE
                   && m[i].type != OMNI_JSON_NULL)
        {
            goto bad_stream;
        }
    }

    i = omni_find("stream_options");

    if (i >= 0 && m[i].type == OMNI_JSON_OBJECT
        && omni_json_object_get(ctx->body, m[i].val_off, m[i].val_len,
                                "include_usage", sizeof("include_usage") - 1,
                                &vo, &vl, &type) == OMNI_OK
        && type == OMNI_JSON_TRUE)
    {
        ctx->include_usage = 1;
    }

    i = omni_find("ignore_eos");

    if (i >= 0 && m[i].type == OMNI_JSON_TRUE) {
        ctx->ignore_eos = 1;
    }

    /* output length */

    i = -1;

    if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
        i = omni_find("max_completion_tokens");
    }

    if (i < 0 || m[i].type == OMNI_JSON_NULL) {
        i = omni_find("max_tokens");
    }

    if (i >= 0 && m[i].type != OMNI_JSON_NULL) {
        if (m[i].type != OMNI_JSON_NUMBER
            || omni_json_int64(ctx->body, m[i].val_off, m[i].val_len, &v)
               != OMNI_OK
            || v < 0)
        {
            ctx->error = "bad_max_tokens";
            return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                            "invalid_request_error",
                                            "'max_tokens' must be a "
                                            "non-negative integer");
        }

        ctx->max_tokens = v;
    }

    /* the prompt */

    if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
        i = omni_find("messages");

        if (i < 0) {
            ctx->error = "no_messages";
            return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                            "invalid_request_error",
                                            "'messages' is required");
        }

        if (m[i].type != OMNI_JSON_ARRAY
            || omni_json_array_count(ctx->body, m[i].val_off, m[i].val_len,
                                     &n) != OMNI_OK
            || n == 0)
        {
            ctx->error = "bad_messages";
            return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                            "invalid_request_error",
                                            "'messages' must be a non-empty "
                                            "list of messages");
        }

        /* about four bytes of text per token until the tokenizer runs */
        ctx->prompt_tokens = m[i].val_len / 4 + 1;

        return NGX_OK;
    }

    i = omni_find("prompt");

    if (i < 0) {
        ctx->error = "no_prompt";
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "'prompt' is required");
    }

    if (m[i].type == OMNI_JSON_STRING) {
        ctx->prompt_tokens = m[i].val_len / 4 + 1;
        return NGX_OK;
    }

    if (m[i].type != OMNI_JSON_ARRAY) {
        goto bad_prompt;
    }

    if (omni_json_array_count(ctx->body, m[i].val_off, m[i].val_len, &n)
        != OMNI_OK || n == 0)
    {
        ctx->error = "empty_prompt";
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "'prompt' must not be empty");
    }

    if (omni_json_array_get(ctx->body, m[i].val_off, m[i].val_len, 0,
                            &vo, &vl, &type)
        != OMNI_OK)
    {
        goto bad_prompt;
    }

    switch (type) {

    case OMNI_JSON_NUMBER:
        ctx->token_ids = ngx_palloc(r->pool, n * sizeof(uint32_t));
        if (ctx->token_ids == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (omni_json_u32_array(ctx->body, m[i].val_off, m[i].val_len,
                                ctx->token_ids, n, &ctx->n_tokens)
            != OMNI_OK)
        {
            goto bad_tokens;
        }

        ctx->token_prompt = 1;
        ctx->prompt_tokens = ctx->n_tokens;
        return NGX_OK;

    case OMNI_JSON_STRING:
    case OMNI_JSON_ARRAY:
        /* a batch: every element must have the first one's type */

        ctx->prompt_tokens = 0;

        for (k = 0; k < n; k++) {
            if (omni_json_array_get(ctx->body, m[i].val_off, m[i].val_len, k,
                                    &vo, &vl, &etype)
                != OMNI_OK)
            {
                goto bad_prompt;
            }

            if (etype != type) {
                goto bad_prompt;
            }

            if (type == OMNI_JSON_STRING) {
                ctx->prompt_tokens += vl / 4 + 1;
                continue;
            }

            if (omni_json_u32_array(ctx->body, vo, vl, NULL, 0, &count)
                == OMNI_ETYPE)
            {
                goto bad_tokens;
            }

            ctx->prompt_tokens += count;
        }

        ctx->batch = n;

        if (n > 1 && ctx->mode == NGX_HTTP_OMNI_SEQUENTIAL) {
            /* vLLM's kv_transfer_params describe one request's blocks */
            ctx->error = "batch_in_sequential";
            return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                            "invalid_request_error",
                                            "a list of %uz prompts cannot be "
                                            "served in sequential P/D mode: "
                                            "send one prompt per request",
                                            n);
        }

        return NGX_OK;
    }

bad_prompt:

    ctx->error = "bad_prompt";
    return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                    "invalid_request_error",
                                    "'prompt' must be a string, a list of "
                                    "strings, a list of token ids or a list "
                                    "of lists of token ids");

bad_tokens:

    ctx->error = "bad_tokens";
    return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                    "invalid_request_error",
                                    "token ids in 'prompt' must be integers "
                                    "in [0, 4294967295]");

bad_stream:

    ctx->error = "bad_stream";
    return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                    "invalid_request_error",
                                    "'stream' must be a boolean");

#undef omni_find
}


/* 429/503 answers say when to come back. */
void
ngx_http_omni_retry_after(ngx_http_request_t *r)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h != NULL) {
        h->hash = 1;
        ngx_str_set(&h->key, "Retry-After");
        ngx_str_set(&h->value, "1");
    }
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


/*
 * The prompt's chained block hashes, for the prefix index: token ids as
 * they are, text (a string prompt, a batch, chat messages) as pseudo tokens
 * of four bytes of its JSON text.  Only the policies that use the index
 * need them.
 */
static ngx_int_t
ngx_http_omni_hash_prompt(ngx_http_omni_ctx_t *ctx)
{
    int                  rc;
    long                 i;
    size_t               n, off, len, max;
    ngx_uint_t           bs;

    if (ctx->mcf->schedule_policy != NGX_HTTP_OMNI_SCHED_OMNI
        && ctx->mcf->schedule_policy != NGX_HTTP_OMNI_SCHED_CACHE_AWARE)
    {
        return NGX_OK;
    }

    /*
     * Only the first index_max_tokens: that identifies a shared prefix or a
     * conversation, and keeps the index's work per request bounded whatever
     * the prompt's size.
     */

    bs = ctx->mcf->block_size;
    max = ctx->mcf->index_max_tokens / bs;

    if (ctx->token_prompt) {
        n = ngx_min(ctx->n_tokens / bs, max);

    } else {
        i = omni_json_find(ctx->body, ctx->members, ctx->n_members,
                           ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT
                           ? "messages" : "prompt",
                           ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT
                           ? sizeof("messages") - 1 : sizeof("prompt") - 1);
        if (i < 0) {
            return NGX_OK;
        }

        off = ctx->members[i].val_off;
        len = ctx->members[i].val_len;

        if (ctx->members[i].type == OMNI_JSON_STRING && len >= 2) {
            /* the text between the quotes */
            off++;
            len -= 2;
        }

        n = ngx_min(len / (4 * bs), max);
        len = ngx_min(len, n * 4 * bs);

        if (n == 0) {
            return NGX_OK;
        }

        ctx->hashes = ngx_palloc(ctx->request->pool, n * sizeof(uint64_t));
        if (ctx->hashes == NULL) {
            return NGX_ERROR;
        }

        rc = omni_hash_text_blocks(ctx->body + off, len, (uint32_t) bs, 0,
                                   ctx->hashes, n);
        ctx->n_hashes = rc > 0 ? (size_t) rc : 0;

        return NGX_OK;
    }

    if (n == 0) {
        return NGX_OK;
    }

    ctx->hashes = ngx_palloc(ctx->request->pool, n * sizeof(uint64_t));
    if (ctx->hashes == NULL) {
        return NGX_ERROR;
    }

    rc = omni_hash_blocks(ctx->token_ids, ngx_min(ctx->n_tokens, n * bs),
                          (uint32_t) bs, 0, ctx->hashes, n);
    ctx->n_hashes = rc > 0 ? (size_t) rc : 0;

    return NGX_OK;
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

    if (ngx_http_omni_hash_prompt(ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->output_tokens = ngx_http_omni_expected_output(ctx);

    if (ngx_http_omni_uses_queue(ctx->mcf)) {
        if (ngx_http_omni_start_now(ctx, NGX_HTTP_OMNI_Q_PREFILL) == NGX_OK) {
            return ngx_http_omni_start(ctx);
        }

        return ngx_http_omni_hold(ctx, NGX_HTTP_OMNI_Q_PREFILL);
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

            if (k == 0) {
                ctx->bootstrap_room = room;
            }

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
    off_t                len;
    ngx_uint_t           k;
    ngx_chain_t         *body;
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

        if (ngx_http_omni_build_body(ctx, edits, e - edits, &body, &len)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ngx_http_omni_start_leg(ctx, NGX_HTTP_OMNI_PREFILL, body, len, 1)
            != NGX_OK)
        {
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

        if (ngx_http_omni_build_body(ctx, edits, e - edits, &body, &len)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ngx_http_omni_start_leg(ctx, NGX_HTTP_OMNI_PREFILL, body, len, 1)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return NGX_DONE;
    }
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

        b->pos = ctx->body;
        b->last = ctx->body + ctx->body_len;
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

        b->pos = (u_char *) segs[i].ptr;
        b->last = b->pos + segs[i].len;
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

    if (ctx->qentry != NGX_HTTP_OMNI_NONE) {
        /* held: released, timed out, or a spurious wake-up */

        rc = ngx_http_omni_held_wake(ctx);

        if (rc == NGX_AGAIN) {
            return;
        }

        if (rc == NGX_OK) {
            rc = (ctx->qstage == NGX_HTTP_OMNI_Q_DECODE)
                 ? ngx_http_omni_start_decode_kv(ctx)
                 : ngx_http_omni_start(ctx);
        }

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
        return ngx_http_omni_hold(ctx, NGX_HTTP_OMNI_Q_DECODE);
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


/*
 * A leg failed before anything reached the client: an engine's 4xx answer
 * is passed on as it is (it is about the request), everything else becomes
 * 502, or 504 for a timeout.
 */
static ngx_int_t
ngx_http_omni_leg_error(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier)
{
    ngx_str_t            *name, none = ngx_string("-");
    ngx_http_omni_leg_t  *leg;

    leg = &ctx->legs[tier];

    if (leg->header && leg->complete && leg->status >= 400
        && leg->status < 500 && leg->response)
    {
        ctx->error = tier == NGX_HTTP_OMNI_PREFILL ? "prefill_4xx"
                                                    : "decode_4xx";
        return ngx_http_omni_send(ctx->request, leg->status,
                                  leg->content_type.len
                                  ? &leg->content_type
                                  : &ngx_http_omni_json_type,
                                  leg->response->pos,
                                  leg->response->last - leg->response->pos);
    }

    name = &none;

    if (ctx->mcf->tiers[tier] && leg->index < ctx->mcf->tiers[tier]->n) {
        name = &ctx->mcf->tiers[tier]->peers[leg->index]->name;
    }

    if (leg->rc == NGX_HTTP_GATEWAY_TIME_OUT
        || leg->status == NGX_HTTP_GATEWAY_TIME_OUT)
    {
        ctx->error = tier == NGX_HTTP_OMNI_PREFILL ? "prefill_timeout"
                                                    : "decode_timeout";
        return ngx_http_omni_send_error(ctx->request,
                                        NGX_HTTP_GATEWAY_TIME_OUT,
                                        "server_error",
                                        "the %s instance %V timed out",
                                        tier == NGX_HTTP_OMNI_PREFILL
                                        ? "prefill" : "decode", name);
    }

    ctx->error = tier == NGX_HTTP_OMNI_PREFILL ? "prefill_failed"
                                                : "decode_failed";

    if (leg->header) {
        return ngx_http_omni_send_error(ctx->request, NGX_HTTP_BAD_GATEWAY,
                                        "server_error",
                                        "the %s instance %V failed with "
                                        "status %ui",
                                        tier == NGX_HTTP_OMNI_PREFILL
                                        ? "prefill" : "decode", name,
                                        leg->status);
    }

    return ngx_http_omni_send_error(ctx->request, NGX_HTTP_BAD_GATEWAY,
                                    "server_error",
                                    "the %s instance %V could not be reached "
                                    "or did not answer",
                                    tier == NGX_HTTP_OMNI_PREFILL
                                    ? "prefill" : "decode", name);
}


/*
 * Sequential mode, prefill finished the request by itself (no
 * kv_transfer_params): the client still gets its answer, in the form it asked
 * for.  A stream is rebuilt from the completion: one chunk per choice, the
 * usage chunk when asked, then [DONE].
 */
static ngx_int_t
ngx_http_omni_answer_from_prefill(ngx_http_omni_ctx_t *ctx, u_char *resp,
    size_t len)
{
    int                  type;
    u_char              *out, *p;
    size_t               n, k, co, cl, vo, vl, size;
    size_t               io, il, cro, crl, mo, ml, uo, ul;
    ngx_str_t            obj;
    const char          *text_key;

    if (!ctx->stream) {
        return ngx_http_omni_send(ctx->request, NGX_HTTP_OK,
                                  &ngx_http_omni_json_type, resp, len);
    }

    if (omni_json_object_get(resp, 0, len, "id", 2, &io, &il, &type)
        != OMNI_OK)
    {
        io = 0; il = 0;
    }

    if (omni_json_object_get(resp, 0, len, "created", 7, &cro, &crl, &type)
        != OMNI_OK)
    {
        cro = 0; crl = 0;
    }

    if (omni_json_object_get(resp, 0, len, "model", 5, &mo, &ml, &type)
        != OMNI_OK)
    {
        mo = 0; ml = 0;
    }

    if (omni_json_object_get(resp, 0, len, "choices", 7, &co, &cl, &type)
        != OMNI_OK
        || type != OMNI_JSON_ARRAY
        || omni_json_array_count(resp, co, cl, &n) != OMNI_OK)
    {
        n = 0;
    }

    if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
        ngx_str_set(&obj, "chat.completion.chunk");
        text_key = "content";

    } else {
        ngx_str_set(&obj, "text_completion");
        text_key = "text";
    }

    /* every piece below is copied from resp, plus fixed framing */
    size = (n + 2) * (len + 256) + 32;

    out = ngx_pnalloc(ctx->request->pool, size);
    if (out == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = out;

#define omni_raw(o, l, dflt)                                                 \
    ((l) ? ngx_cpymem(p, resp + (o), (l))                                     \
         : ngx_cpymem(p, dflt, sizeof(dflt) - 1))

#define omni_head()                                                          \
    p = ngx_cpymem(p, "data: {\"id\":", sizeof("data: {\"id\":") - 1);       \
    p = omni_raw(io, il, "\"\"");                                            \
    p = ngx_sprintf(p, ",\"object\":\"%V\",\"created\":", &obj);             \
    p = omni_raw(cro, crl, "0");                                             \
    p = ngx_cpymem(p, ",\"model\":", sizeof(",\"model\":") - 1);             \
    p = omni_raw(mo, ml, "\"\"")

    for (k = 0; k < n; k++) {
        size_t  eo, el, to, tl, fo, fl;

        if (omni_json_array_get(resp, co, cl, k, &eo, &el, &type) != OMNI_OK
            || type != OMNI_JSON_OBJECT)
        {
            continue;
        }

        tl = 0;
        to = 0;

        if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
            if (omni_json_object_get(resp, eo, el, "message", 7, &vo, &vl,
                                     &type)
                == OMNI_OK && type == OMNI_JSON_OBJECT
                && omni_json_object_get(resp, vo, vl, text_key,
                                        ngx_strlen(text_key), &to, &tl,
                                        &type)
                   != OMNI_OK)
            {
                tl = 0;
            }

        } else if (omni_json_object_get(resp, eo, el, text_key,
                                        ngx_strlen(text_key), &to, &tl,
                                        &type)
                   != OMNI_OK)
        {
            tl = 0;
        }

        if (omni_json_object_get(resp, eo, el, "finish_reason", 13, &fo, &fl,
                                 &type)
            != OMNI_OK)
        {
            fl = 0;
        }

        omni_head();

        p = ngx_sprintf(p, ",\"choices\":[{\"index\":%uz,", k);

        if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
            p = ngx_cpymem(p, "\"delta\":{\"role\":\"assistant\",\"content\":",
                    sizeof("\"delta\":{\"role\":\"assistant\",\"content\":")
                    - 1);
            p = omni_raw(to, tl, "\"\"");
            *p++ = '}';

        } else {
            p = ngx_cpymem(p, "\"text\":", sizeof("\"text\":") - 1);
            p = omni_raw(to, tl, "\"\"");
        }

        p = ngx_cpymem(p, ",\"logprobs\":null,\"finish_reason\":",
                       sizeof(",\"logprobs\":null,\"finish_reason\":") - 1);
        p = omni_raw(fo, fl, "\"stop\"");
        p = ngx_cpymem(p, "}]}\n\n", 5);
    }

    if (ctx->include_usage
        && omni_json_object_get(resp, 0, len, "usage", 5, &uo, &ul, &type)
           == OMNI_OK)
    {
        omni_head();
        p = ngx_cpymem(p, ",\"choices\":[],\"usage\":",
                       sizeof(",\"choices\":[],\"usage\":") - 1);
        p = ngx_cpymem(p, resp + uo, ul);
        p = ngx_cpymem(p, "}\n\n", 3);
    }

    p = ngx_cpymem(p, "data: [DONE]\n\n", sizeof("data: [DONE]\n\n") - 1);

#undef omni_head
#undef omni_raw

    return ngx_http_omni_send(ctx->request, NGX_HTTP_OK,
                              &ngx_http_omni_sse_type, out, p - out);
}


/*
 * Send a whole response from the main request (for an omni request also
 * its X-Request-Id and timings; status pages have no ctx).
 */
ngx_int_t
ngx_http_omni_send(ngx_http_request_t *r, ngx_uint_t status, ngx_str_t *type,
    u_char *body, size_t len)
{
    ngx_int_t             rc;
    ngx_buf_t            *b;
    ngx_chain_t           out;
    ngx_table_elt_t      *h;
    ngx_http_omni_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_omni_module);

    if (ctx && ctx->header_sent) {
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "omni: a second answer for request %*s",
                      ctx->request_id_len, ctx->request_id);
        return NGX_ERROR;
    }

    if (r->discard_body == 0 && r->request_body == NULL) {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            r->keepalive = 0;
        }
    }

    r->headers_out.status = status;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_length_n = len;

    if (ctx) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "X-Request-Id");
        h->value.data = ctx->request_id;
        h->value.len = ctx->request_id_len;

        ctx->header_sent = 1;
        ctx->status = status;
        ctx->t_first_byte = ngx_current_msec;
        ctx->t_end = ngx_current_msec;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body;
    b->last = body + len;
    b->memory = len ? 1 : 0;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_omni_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *fmt, ...)
{
    u_char      *body, msg[1024], *last;
    size_t       len;
    va_list      args;
    ngx_uint_t   level;

    va_start(args, fmt);
    last = ngx_vslprintf(msg, msg + sizeof(msg), fmt, args);
    va_end(args);

    body = ngx_http_omni_error_json(r->pool, status, type, msg, last - msg,
                                    &len);
    if (body == NULL) {
        return NGX_ERROR;
    }

    level = status >= 500 ? NGX_LOG_ERR : NGX_LOG_INFO;

    ngx_log_error(level, r->connection->log, 0, "omni: %ui %*s", status,
                  (size_t) (last - msg), msg);

    return ngx_http_omni_send(r, status, &ngx_http_omni_json_type, body, len);
}


/* After the stream started: one SSE error event, then the end. */
static ngx_int_t
ngx_http_omni_stream_error(ngx_http_omni_ctx_t *ctx, ngx_uint_t status,
    const char *type, const char *msg, size_t msg_len)
{
    u_char       *json, *p;
    size_t        len;
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    json = ngx_http_omni_error_json(ctx->request->pool, status, type,
                                    (const u_char *) msg, msg_len, &len);
    if (json == NULL) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(ctx->request->pool, len + sizeof("data: \n\n"));
    if (p == NULL) {
        return NGX_ERROR;
    }

    b = ngx_calloc_buf(ctx->request->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = p;
    p = ngx_cpymem(p, "data: ", 6);
    p = ngx_cpymem(p, json, len);
    p = ngx_cpymem(p, "\n\n", 2);
    b->last = p;
    b->memory = 1;
    b->last_buf = 1;

    out.buf = b;
    out.next = NULL;

    ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                  "omni: request %*s: %*s, sent as an SSE error event",
                  ctx->request_id_len, ctx->request_id, msg_len, msg);

    ctx->t_end = ngx_current_msec;

    rc = ngx_http_output_filter(ctx->request, &out);

    return rc == NGX_ERROR ? NGX_ERROR : NGX_OK;
}


static u_char *
ngx_http_omni_error_json(ngx_pool_t *pool, ngx_uint_t status,
    const char *type, const u_char *msg, size_t msg_len, size_t *len)
{
    u_char  *body, *p;
    size_t   need;

    if (omni_json_string_encode(msg, msg_len, NULL, 0, &need) != OMNI_OK
        && need == 0)
    {
        return NULL;
    }

    body = ngx_pnalloc(pool, need + ngx_strlen(type) + 64 + NGX_INT_T_LEN);
    if (body == NULL) {
        return NULL;
    }

    p = ngx_cpymem(body, "{\"error\":{\"message\":",
                   sizeof("{\"error\":{\"message\":") - 1);

    if (omni_json_string_encode(msg, msg_len, p, need, &need) != OMNI_OK) {
        return NULL;
    }

    p += need;
    p = ngx_sprintf(p, ",\"type\":\"%s\",\"code\":%ui}}", type, status);

    *len = p - body;

    return body;
}


static void
ngx_http_omni_set_request_id(ngx_http_omni_ctx_t *ctx)
{
    u_char            *p, c;
    size_t             i;
    ngx_uint_t         n;
    ngx_list_part_t   *part;
    ngx_table_elt_t   *h;

    p = ctx->request_id;

    part = &ctx->request->headers_in.headers.part;
    h = part->elts;

    for (n = 0; /* void */ ; n++) {

        if (n >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            n = 0;
        }

        if (h[n].key.len != sizeof("X-Request-Id") - 1
            || ngx_strncasecmp(h[n].key.data, (u_char *) "X-Request-Id",
                               sizeof("X-Request-Id") - 1) != 0)
        {
            continue;
        }

        /* keep what is safe in a header, a log line and a JSON string */

        for (i = 0; i < h[n].value.len; i++) {
            c = h[n].value.data[i];

            if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
                || (c >= '0' && c <= '9') || c == '-' || c == '_'
                || c == '.' || c == ':')
            {
                *p++ = c;

                if (p == ctx->request_id + NGX_HTTP_OMNI_REQUEST_ID_LEN) {
                    break;
                }
            }
        }

        break;
    }

    if (p == ctx->request_id) {
        p = ngx_sprintf(p, "%08xD%08xD%08xD%08xD",
                        (uint32_t) ngx_random(), (uint32_t) ngx_random(),
                        (uint32_t) ngx_random(), (uint32_t) ngx_random());
    }

    ctx->request_id_len = p - ctx->request_id;
}


static void
ngx_http_omni_cleanup(void *data)
{
    ngx_http_omni_ctx_t  *ctx = data;

    ngx_uint_t            t, status;
    ngx_http_request_t   *r;

    r = ctx->request;

    ngx_http_omni_unhold(ctx);

    if (ctx->mode == NGX_HTTP_OMNI_AGGREGATED) {
        /* its prefill never answered with a first byte */
        ngx_http_omni_prefill_observed(ctx, &ctx->legs[NGX_HTTP_OMNI_DECODE],
                                       0);
    }

    /* a leg whose upstream never started still holds its charge */
    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        ngx_http_omni_leg_release(ctx->mcf, &ctx->legs[t], 0);
    }

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

    ngx_http_omni_request_end(ctx->mcf, ctx->route, ctx->mode, status,
                              ctx);
}
