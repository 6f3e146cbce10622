/*
 * Omni Proxy nginx module: what the client sent.
 *
 * The body as one buffer, validated as JSON (top-level members only), the
 * fields scheduling needs (stream, max_tokens, the prompt's size or token
 * ids), the prompt's block hashes for the prefix index, and the request id.
 * Every problem is answered here with one 400 naming it.
 */


#include "ngx_http_omni.h"


/*
 * The body as nginx read it, joined in place where that needs no new memory:
 * every read is a buffer of its own, and the reads after the request header
 * are neighbours in the body buffer (rb->buf).  With
 * request_body_in_single_buf (set by the handler) that buffer has room for
 * the part that came with the header, which is moved in front of them.
 * NGX_DECLINED: the body is elsewhere too (a temp file, other memory).
 */
static ngx_int_t
ngx_http_omni_join_body(ngx_http_request_t *r, u_char **body, size_t *len)
{
    u_char       *p;
    size_t        head, run;
    ngx_buf_t    *b, *first;
    ngx_chain_t  *cl, *from;

    cl = r->request_body->bufs;
    b = r->request_body->buf;
    first = cl->buf;

    if (first->in_file) {
        return NGX_DECLINED;
    }

    /* the part that came with the header: outside the body buffer */

    head = 0;
    from = cl;

    if (b && cl->next
        && (first->pos < b->start || first->pos >= b->end))
    {
        head = first->last - first->pos;
        from = cl->next;
    }

    /* the rest: neighbours */

    p = from->buf->pos;

    for (cl = from; cl; cl = cl->next) {
        if (cl->buf->in_file || cl->buf->pos != p) {
            return NGX_DECLINED;
        }

        p = cl->buf->last;
    }

    if (head == 0) {
        *body = from->buf->pos;
        *len = p - from->buf->pos;
        return NGX_OK;
    }

    run = p - from->buf->pos;

    if (from->buf->pos != b->start || (size_t) (b->end - b->start) < head + run)
    {
        return NGX_DECLINED;
    }

    ngx_memmove(b->start + head, b->start, run);
    ngx_memcpy(b->start, first->pos, head);

    *body = b->start;
    *len = head + run;

    return NGX_OK;
}


/*
 * The body as one contiguous buffer: nginx keeps it in memory when it fits
 * client_body_buffer_size, otherwise in a temp file.
 */
ngx_int_t
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

    if (ngx_http_omni_join_body(r, &ctx->body, &ctx->body_len) == NGX_OK) {
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

        } else if (b->last != b->pos) {
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


/* the top-level keys the proxy reads or sets; the order is KEY_* below */
static ngx_str_t  ngx_http_omni_read_keys[] = {
    ngx_string("prompt"),
    ngx_string("messages"),
    ngx_string("stream"),
    ngx_string("stream_options"),
    ngx_string("max_tokens"),
    ngx_string("max_completion_tokens"),
    ngx_string("ignore_eos"),
    ngx_string("kv_transfer_params"),
    ngx_string("bootstrap_host"),
    ngx_string("bootstrap_port"),
    ngx_string("bootstrap_room"),
    ngx_null_string
};

#define NGX_HTTP_OMNI_KEY_PROMPT          0
#define NGX_HTTP_OMNI_KEY_MESSAGES        1
#define NGX_HTTP_OMNI_KEY_STREAM          2
#define NGX_HTTP_OMNI_KEY_STREAM_OPTIONS  3
#define NGX_HTTP_OMNI_KEY_MAX_TOKENS      4
#define NGX_HTTP_OMNI_KEY_MAX_COMPLETION  5
#define NGX_HTTP_OMNI_KEY_IGNORE_EOS      6
#define NGX_HTTP_OMNI_READ_KEYS                                              \
    (sizeof(ngx_http_omni_read_keys) / sizeof(ngx_str_t) - 1)


static ngx_int_t ngx_http_omni_index_keys(ngx_http_omni_ctx_t *ctx,
    long *idx);


/*
 * One pass over the top-level members: idx[k] is the last member named
 * ngx_http_omni_read_keys[k] (as omni_json_find() would answer) or -1.
 * Returns the first such key that appears twice, or -1.  A lookup per key
 * and a second one for its duplicate were ~1.8k instructions a request
 * (bench-notes/issue23.md section 10); the comparison is still the
 * library's, on a one-member span, after an exact length filter.
 */
static ngx_int_t
ngx_http_omni_index_keys(ngx_http_omni_ctx_t *ctx, long *idx)
{
    size_t               i, k, len;
    uint32_t             dup;
    omni_json_member_t  *m;

    dup = 0;

    for (k = 0; k < NGX_HTTP_OMNI_READ_KEYS; k++) {
        idx[k] = -1;
    }

    for (i = 0; i < ctx->n_members; i++) {
        m = &ctx->members[i];

        if (m->key_len < 2) {
            continue;
        }

        len = m->key_len - 2;

        for (k = 0; k < NGX_HTTP_OMNI_READ_KEYS; k++) {
            /* an escape only shortens a key: longer text may match */
            if ((m->key_escaped ? len < ngx_http_omni_read_keys[k].len
                                : len != ngx_http_omni_read_keys[k].len)
                || omni_json_find(ctx->body, m, 1,
                                  (char *) ngx_http_omni_read_keys[k].data,
                                  ngx_http_omni_read_keys[k].len)
                   != 0)
            {
                continue;
            }

            if (idx[k] >= 0) {
                dup |= 1u << k;
            }

            idx[k] = (long) i;
        }
    }

    for (k = 0; k < NGX_HTTP_OMNI_READ_KEYS; k++) {
        if (dup & (1u << k)) {
            return (ngx_int_t) k;
        }
    }

    return -1;
}


ngx_int_t
ngx_http_omni_parse(ngx_http_omni_ctx_t *ctx)
{
    int                  type, etype;
    long                 i, idx[NGX_HTTP_OMNI_READ_KEYS];
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

#define omni_find(key)  idx[NGX_HTTP_OMNI_KEY_ ## key]

    /*
     * A key the proxy reads or sets must appear once: with two, the proxy
     * and an engine may each take a different one (JSON parsers disagree
     * on which duplicate wins).
     */
    rc = ngx_http_omni_index_keys(ctx, idx);

    if (rc >= 0) {
        ctx->error = "duplicate_key";
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_request_error",
                                        "duplicate key \"%V\" in the "
                                        "request body",
                                        &ngx_http_omni_read_keys[rc]);
    }

    /* stream */

    i = omni_find(STREAM);

    if (i >= 0) {
        if (m[i].type == OMNI_JSON_TRUE) {
            ctx->stream = 1;

        } else if (m[i].type != OMNI_JSON_FALSE
                   && m[i].type != OMNI_JSON_NULL)
        {
            goto bad_stream;
        }
    }

    i = omni_find(STREAM_OPTIONS);

    if (i >= 0 && m[i].type == OMNI_JSON_OBJECT
        && omni_json_object_get(ctx->body, m[i].val_off, m[i].val_len,
                                "include_usage", sizeof("include_usage") - 1,
                                &vo, &vl, &type) == OMNI_OK
        && type == OMNI_JSON_TRUE)
    {
        ctx->include_usage = 1;
    }

    i = omni_find(IGNORE_EOS);

    if (i >= 0 && m[i].type == OMNI_JSON_TRUE) {
        ctx->ignore_eos = 1;
    }

    /* output length */

    i = -1;

    if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
        i = omni_find(MAX_COMPLETION);
    }

    if (i < 0 || m[i].type == OMNI_JSON_NULL) {
        i = omni_find(MAX_TOKENS);
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
        i = omni_find(MESSAGES);

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

    i = omni_find(PROMPT);

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
        ctx->ids_sent = 1;
        ctx->prompt_tokens = ctx->n_tokens;
        ctx->longest_exact = ctx->n_tokens;
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
            ctx->longest_exact = ngx_max(ctx->longest_exact, count);
        }

        ctx->batch = n;
        ctx->ids_sent = type == OMNI_JSON_ARRAY;

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


/*
 * The prompt's chained block hashes, for the prefix index: token ids as
 * they are, text (a string prompt, a batch, chat messages) as pseudo tokens
 * of four bytes of its JSON text.  Only the policies that use the index
 * need them.
 */
ngx_int_t
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


/* The client's X-Request-Id, keeping what is safe in a header, a log line
 * and a JSON string. */
static void
ngx_http_omni_client_id(ngx_http_omni_ctx_t *ctx, ngx_str_t *value)
{
    u_char  *p, c;
    size_t   i;

    p = ctx->client_id;

    for (i = 0; i < value->len; i++) {
        c = value->data[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c >= '0' && c <= '9') || c == '-' || c == '_'
            || c == '.' || c == ':')
        {
            *p++ = c;

            if (p == ctx->client_id + NGX_HTTP_OMNI_REQUEST_ID_LEN) {
                break;
            }
        }
    }

    ctx->client_id_len = p - ctx->client_id;
}


/*
 * X-Omni-SLO-TTFT and X-Omni-SLO-TPOT (milliseconds, a positive integer),
 * capped at omni_slo_max, replace the configured omni_slo_ttft /
 * omni_slo_tpot (0: none).  A header of 0 or one that does not parse is
 * ignored.
 */
static void
ngx_http_omni_slo_header(ngx_http_omni_ctx_t *ctx, ngx_table_elt_t *h)
{
    ngx_int_t   ms;
    uint64_t   *slo;

    if (ngx_strncasecmp(h->key.data, (u_char *) "X-Omni-SLO-TTFT",
                        sizeof("X-Omni-SLO-TTFT") - 1) == 0)
    {
        slo = &ctx->slo_ttft_us;

    } else if (ngx_strncasecmp(h->key.data, (u_char *) "X-Omni-SLO-TPOT",
                               sizeof("X-Omni-SLO-TPOT") - 1) == 0)
    {
        slo = &ctx->slo_tpot_us;

    } else {
        return;
    }

    ms = ngx_atoi(h->value.data, h->value.len);
    if (ms <= 0) {
        return;
    }

    *slo = (uint64_t) ngx_min((ngx_msec_t) ms, ctx->mcf->slo_max) * 1000;
}


/*
 * The request headers the module reads, in one walk (the names differ in
 * length, so most headers cost one comparison): the client's X-Request-Id
 * (the first), the SLO headers (the last valid one of each, only when
 * omni_slo_max allows them) and X-Omni-Request-Timeout (the least; a bad
 * one is answered by ngx_http_omni_deadline_arm() once the body is read,
 * as before).  Then the request id the engines see.
 */
void
ngx_http_omni_read_headers(ngx_http_omni_ctx_t *ctx)
{
    u_char                     *p;
    uint32_t                    rnd[4];
    ngx_int_t                   ms;
    ngx_uint_t                  n, id_seen;
    ngx_list_part_t            *part;
    ngx_table_elt_t            *h;
    ngx_http_omni_main_conf_t  *mcf;

    mcf = ctx->mcf;

    ctx->slo_ttft_us = (uint64_t) mcf->slo_ttft * 1000;
    ctx->slo_tpot_us = (uint64_t) mcf->slo_tpot * 1000;

    id_seen = 0;

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

        switch (h[n].key.len) {

        case sizeof("X-Request-Id") - 1:
            if (!id_seen
                && ngx_strncasecmp(h[n].key.data, (u_char *) "X-Request-Id",
                                   sizeof("X-Request-Id") - 1) == 0)
            {
                id_seen = 1;
                ngx_http_omni_client_id(ctx, &h[n].value);
            }

            break;

        case sizeof("X-Omni-SLO-TTFT") - 1:     /* and X-Omni-SLO-TPOT */
            if (mcf->slo_max) {
                ngx_http_omni_slo_header(ctx, &h[n]);
            }

            break;

        case sizeof("X-Omni-Request-Timeout") - 1:
            if (ngx_strncasecmp(h[n].key.data,
                                (u_char *) "X-Omni-Request-Timeout",
                                sizeof("X-Omni-Request-Timeout") - 1) != 0)
            {
                break;
            }

            ms = ngx_atoi(h[n].value.data, h[n].value.len);

            if (ms <= 0 || ms > NGX_HTTP_OMNI_TIMEOUT_HEADER_MAX) {
                ctx->timeout_bad = 1;

            } else if (ctx->timeout_header == 0
                       || (ngx_msec_t) ms < ctx->timeout_header)
            {
                ctx->timeout_header = (ngx_msec_t) ms;
            }

            break;
        }
    }

    /*
     * The id the engines see is always ours: engines and KV connectors key
     * requests and transfers on it, and clients' ids may collide.
     */
    for (n = 0; n < 4; n++) {
        rnd[n] = (uint32_t) ngx_random();
    }

    /* 32 hex digits; ngx_hex_dump(), as ngx_sprintf("%08xD") cost ~800
     * instructions a request (bench-notes/issue23.md section 10) */
    p = ngx_hex_dump(ctx->request_id, (u_char *) rnd, sizeof(rnd));

    ctx->request_id_len = p - ctx->request_id;
}


/*
 * A prompt known to fill the engines' whole context (omni_max_model_len) is
 * refused by every engine, vLLM and SGLang alike: answered by the caller at
 * once, with the engine's words, instead of being held as the largest job
 * of the queue.  Only an exact count (ids, or the tokenizer's): on the
 * estimate the request goes on and the engine judges.
 */
ngx_int_t
ngx_http_omni_too_long(ngx_http_omni_ctx_t *ctx)
{
    ctx->error = "context_length";

    return ngx_http_omni_send_error(ctx->request, NGX_HTTP_BAD_REQUEST,
                                    "invalid_request_error",
                                    "This model's maximum context length is "
                                    "%ui tokens. However, your request has "
                                    "%uL input tokens.",
                                    ctx->mcf->max_model_len,
                                    ctx->longest_exact);
}
