/*
 * Omni Proxy nginx module: what the client gets when the proxy answers
 * itself: OpenAI-style JSON errors (with Retry-After when it is worth
 * retrying), a failed leg's answer (an engine's 4xx as it is, 502, 504),
 * one SSE error event after a stream started, and a request that finished
 * inside prefill rebuilt in the form the client asked for.
 */


#include "ngx_http_omni.h"


static u_char *ngx_http_omni_error_json(ngx_pool_t *pool, ngx_uint_t status,
    const char *type, const u_char *msg, size_t msg_len, size_t *len);


static ngx_str_t  ngx_http_omni_json_type = ngx_string("application/json");
static ngx_str_t  ngx_http_omni_sse_type = ngx_string("text/event-stream");


/* 429/503 answers say when to come back: the queue's expected drain when
 * the holding code worked it out (ctx->retry_after_s), else 1 second. */
void
ngx_http_omni_retry_after(ngx_http_request_t *r)
{
    u_char               *p;
    ngx_table_elt_t      *h;
    ngx_http_omni_ctx_t  *ctx;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    ngx_str_set(&h->value, "1");

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_omni_module);

    if (ctx == NULL || ctx->retry_after_s <= 1) {
        return;
    }

    p = ngx_pnalloc(r->pool, NGX_INT32_LEN);
    if (p != NULL) {
        h->value.data = p;
        h->value.len = ngx_sprintf(p, "%uD", ctx->retry_after_s) - p;
    }
}


/*
 * A leg failed before anything reached the client: an engine's 4xx answer
 * is passed on as it is (it is about the request), everything else becomes
 * 502, or 504 for a timeout.
 */
ngx_int_t
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
ngx_int_t
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
 * The ids of every answer: X-Omni-Request-Id, the id the engines saw
 * (always the proxy's own), and X-Request-Id, the client's own id back
 * when it sent one.
 */
ngx_int_t
ngx_http_omni_id_headers(ngx_http_request_t *r, ngx_http_omni_ctx_t *ctx)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "X-Omni-Request-Id");
    h->value.data = ctx->request_id;
    h->value.len = ctx->request_id_len;

    if (ctx->client_id_len == 0) {
        return NGX_OK;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "X-Request-Id");
    h->value.data = ctx->client_id;
    h->value.len = ctx->client_id_len;

    return NGX_OK;
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
    ngx_http_omni_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_omni_module);

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
        if (ngx_http_omni_id_headers(r, ctx) != NGX_OK) {
            return NGX_ERROR;
        }

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
ngx_int_t
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
