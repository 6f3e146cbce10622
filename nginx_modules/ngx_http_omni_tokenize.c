/*
 * Omni Proxy nginx module: the tokenizer service (docs/tokenizer.md).
 *
 * With `omni_model_path`, a text prompt or a chat request is tokenized once
 * by `omni-ctl tokenizer` through an in-memory background subrequest to the
 * internal location /_omni/tokenize/v1/..., which proxies to the service's
 * unix socket.  The worker never blocks on it: the request waits like it
 * waits for a prefill leg, with a deadline of its own.
 *
 * Its ids replace the estimate (4 bytes a token) for the block hashes, the
 * prefix match and the predictor's token counts.  Anything but a
 * well-formed answer (the service down, late, failing, or unable to render
 * the request exactly) leaves the request on the estimate and is counted
 * by reason; a 400 is the client's error and is answered as such.
 */


#include "ngx_http_omni.h"


#define NGX_HTTP_OMNI_TOK_MAGIC      "OMTK"
#define NGX_HTTP_OMNI_TOK_VERSION    1
#define NGX_HTTP_OMNI_TOK_IDS_GIVEN  0x1
#define NGX_HTTP_OMNI_TOK_CHAT       0x2
#define NGX_HTTP_OMNI_TOK_SGLANG     0x4
#define NGX_HTTP_OMNI_TOK_HANDLE     0x10
#define NGX_HTTP_OMNI_TOK_HEADER     16
/* messages searched for the first user message ($omni_conversation) */
#define NGX_HTTP_OMNI_TOK_CONV_SCAN  8


static ngx_int_t ngx_http_omni_tokenize_done(ngx_http_request_t *sr,
    void *data, ngx_int_t rc);
static void ngx_http_omni_tokenize_timeout(ngx_event_t *ev);
static ngx_int_t ngx_http_omni_tokenize_decode(ngx_http_omni_ctx_t *ctx);
static void ngx_http_omni_tokenize_count(ngx_http_omni_ctx_t *ctx,
    ngx_int_t reason);
static ngx_int_t ngx_http_omni_tokenize_reuse(ngx_http_omni_ctx_t *ctx,
    u_char *lens, u_char *ids, uint32_t count, uint32_t flags);


/*
 * This worker's subrequests in flight (a worker's own: one that dies takes
 * its count with it).  Past omni_tokenize_max_inflight a request is
 * scheduled on the estimate at once (`busy`) instead of queueing at the
 * service behind requests that will all miss their deadline: a service
 * with a queue longer than its deadline serves only answers nobody waits
 * for any more.
 */
static ngx_uint_t  ngx_http_omni_tok_inflight;

static ngx_str_t  ngx_http_omni_tok_post = ngx_string("POST");
static ngx_str_t  ngx_http_omni_tok_learn = ngx_string("learn=1");


/*
 * Start the subrequest: NGX_DONE when the request now waits for it,
 * NGX_DECLINED when it needs none (no model path, a token-id prompt, a
 * body too large to send), NGX_ERROR.
 */
ngx_int_t
ngx_http_omni_tokenize(ngx_http_omni_ctx_t *ctx)
{
    u_char                      *p;
    ngx_str_t                    uri, *args;
    ngx_buf_t                   *b;
    ngx_msec_t                   deadline;
    ngx_chain_t                 *cl;
    ngx_http_request_t          *r, *sr;
    ngx_http_omni_tok_t         *tok;
    ngx_http_request_body_t     *rb;
    ngx_http_post_subrequest_t  *ps;
    ngx_http_omni_main_conf_t   *mcf;

    r = ctx->request;
    mcf = ctx->mcf;
    tok = &ctx->tok;

    if (mcf->model_path.len == 0 || ctx->token_prompt) {
        return NGX_DECLINED;
    }

    if (ctx->body_len > mcf->tokenize_max_body) {
        ngx_http_omni_tokenize_count(ctx, NGX_HTTP_OMNI_TOK_TOO_LARGE);
        return NGX_DECLINED;
    }

    if (mcf->tokenize_max_inflight
        && ngx_http_omni_tok_inflight >= mcf->tokenize_max_inflight)
    {
        ngx_http_omni_tokenize_count(ctx, NGX_HTTP_OMNI_TOK_BUSY);
        return NGX_DECLINED;
    }

    uri.len = sizeof(NGX_HTTP_OMNI_TOKENIZE_PREFIX) - 1 + r->uri.len;
    uri.data = ngx_pnalloc(r->pool, uri.len);
    if (uri.data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(uri.data, NGX_HTTP_OMNI_TOKENIZE_PREFIX,
                   sizeof(NGX_HTTP_OMNI_TOKENIZE_PREFIX) - 1);
    ngx_memcpy(p, r->uri.data, r->uri.len);

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_ERROR;
    }

    ps->handler = ngx_http_omni_tokenize_done;
    ps->data = ctx;

    /* a chat answer will be learned: the service names the conversation */
    args = (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT && mcf->token_reuse
            && mcf->tokenize_learn_max)
           ? &ngx_http_omni_tok_learn : NULL;

    if (ngx_http_subrequest(r, &uri, args, &sr, ps,
                            NGX_HTTP_SUBREQUEST_IN_MEMORY
                            |NGX_HTTP_SUBREQUEST_BACKGROUND)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* the client's body as it came: the service parses it itself */

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = ctx->body;
    b->last = ctx->body + ctx->body_len;
    b->memory = 1;
    b->last_buf = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    rb = ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t));
    if (rb == NULL) {
        return NGX_ERROR;
    }

    rb->bufs = cl;

    sr->request_body = rb;
    sr->method = NGX_HTTP_POST;
    sr->method_name = ngx_http_omni_tok_post;
    sr->headers_in.content_length_n = ctx->body_len;
    sr->headers_in.chunked = 0;
    sr->headers_in.transfer_encoding = NULL;
    sr->request_body_no_buffering = 0;

    tok->sr = sr;
    tok->pending = 1;
    tok->inflight = 1;
    ngx_http_omni_tok_inflight++;

    deadline = mcf->tokenize_timeout
               + mcf->tokenize_timeout_per_kb * (ctx->body_len / 1024);

    tok->timer.handler = ngx_http_omni_tokenize_timeout;
    tok->timer.data = ctx;
    tok->timer.log = r->connection->log;
    ngx_add_timer(&tok->timer, deadline);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni tokenize \"%V\", deadline %M", &uri, deadline);

    return NGX_DONE;
}


/*
 * $omni_conversation, the tokenizer upstream's `hash` key when the service
 * runs several workers: for a chat request the JSON text of `messages` from
 * its start through the first user message, which every later turn of the
 * conversation sends again unchanged, so all its turns reach the worker
 * whose reuse cache holds the earlier ones (and their learned answers).
 * Anything else: the request id, which spreads them over the workers.
 * A client that re-serializes its history differently only loses the
 * affinity; the ids are exact either way.  Found when the variable is
 * first read (with one tokenizer worker, never).
 */
ngx_str_t *
ngx_http_omni_tokenize_conversation(ngx_http_omni_ctx_t *ctx)
{
    int                  type;
    long                 i;
    size_t               k, eo, el, ro, rl, end;
    omni_json_member_t  *m;

    if (ctx->tok.conversation.data != NULL) {
        return &ctx->tok.conversation;
    }

    ctx->tok.conversation.data = ctx->request_id;
    ctx->tok.conversation.len = ctx->request_id_len;

    if (ctx->route != NGX_HTTP_OMNI_ROUTE_CHAT || ctx->members == NULL) {
        return &ctx->tok.conversation;
    }

    m = ctx->members;
    i = omni_json_find(ctx->body, m, ctx->n_members, "messages",
                       sizeof("messages") - 1);

    if (i < 0 || m[i].type != OMNI_JSON_ARRAY) {
        return &ctx->tok.conversation;
    }

    end = 0;

    for (k = 0; k < NGX_HTTP_OMNI_TOK_CONV_SCAN; k++) {
        if (omni_json_array_get(ctx->body, m[i].val_off, m[i].val_len, k,
                                &eo, &el, &type)
            != OMNI_OK)
        {
            break;
        }

        if (end == 0) {
            end = eo + el;      /* no user message: the first one */
        }

        if (type == OMNI_JSON_OBJECT
            && omni_json_object_get(ctx->body, eo, el, "role",
                                    sizeof("role") - 1, &ro, &rl, &type)
               == OMNI_OK
            && rl == sizeof("\"user\"") - 1
            && ngx_strncmp(ctx->body + ro, "\"user\"", rl) == 0)
        {
            end = eo + el;
            break;
        }
    }

    if (end > m[i].val_off) {
        ctx->tok.conversation.data = ctx->body + m[i].val_off;
        ctx->tok.conversation.len = end - m[i].val_off;
    }

    return &ctx->tok.conversation;
}


static ngx_int_t
ngx_http_omni_tokenize_done(ngx_http_request_t *sr, void *data, ngx_int_t rc)
{
    ngx_http_omni_ctx_t  *ctx = data;

    ngx_http_upstream_t  *u;
    ngx_http_omni_tok_t  *tok;

    tok = &ctx->tok;

    if (tok->sr != sr || tok->done) {
        return NGX_OK;
    }

    tok->done = 1;
    ngx_http_omni_tokenize_release(ctx);

    u = sr->upstream;

    if (rc == NGX_OK || rc == NGX_DONE) {
        tok->status = sr->headers_out.status;

    } else {
        tok->status = rc >= NGX_HTTP_SPECIAL_RESPONSE
                      ? (ngx_uint_t) rc : NGX_HTTP_BAD_GATEWAY;
    }

    if (u == NULL || u->state == NULL
        || u->state->connect_time == (ngx_msec_t) -1)
    {
        /* nginx's own error: the socket refused or was not there */
        tok->down = (u != NULL);
        tok->status = NGX_HTTP_BAD_GATEWAY;
    }

    if (sr->out && sr->out->buf) {
        tok->response = sr->out->buf;
    }

    if (tok->timer.timer_set) {
        ngx_del_timer(&tok->timer);
    }

    /* nginx wakes the parent of foreground subrequests only */
    ngx_http_post_request(ctx->request, NULL);

    /* an error answer of the service is ours to handle, not nginx's */
    return NGX_OK;
}


static void
ngx_http_omni_tokenize_timeout(ngx_event_t *ev)
{
    ngx_http_omni_ctx_t  *ctx = ev->data;

    ngx_connection_t     *c;
    ngx_http_request_t   *r;

    r = ctx->request;
    c = r->connection;

    ngx_log_error(NGX_LOG_WARN, c->log, 0,
                  "omni: the tokenizer did not answer request %*s in time",
                  ctx->request_id_len, ctx->request_id);

    ctx->tok.timedout = 1;

    ngx_http_omni_tokenize_cancel(ctx);

    ngx_http_post_request(r, NULL);
    ngx_http_run_posted_requests(c);
}


/*
 * Abandon the subrequest: its upstream is finalized at once, which closes
 * the connection to the service and never calls the post handler.
 */
void
ngx_http_omni_tokenize_cancel(ngx_http_omni_ctx_t *ctx)
{
    ngx_http_request_t   *sr;
    ngx_http_upstream_t  *u;
    ngx_http_omni_tok_t  *tok;

    tok = &ctx->tok;

    if (tok->timer.timer_set) {
        ngx_del_timer(&tok->timer);
    }

    if (tok->sr == NULL || tok->done) {
        return;
    }

    sr = tok->sr;
    tok->done = 1;
    tok->status = 0;
    ngx_http_omni_tokenize_release(ctx);

    u = sr->upstream;

    if (u && u->cleanup && *u->cleanup) {
        (*u->cleanup)(sr);
    }
}


/*
 * The subrequest no longer counts in flight: it answered, was abandoned at
 * its deadline, or its request ended (the request's cleanup); once.
 */
void
ngx_http_omni_tokenize_release(ngx_http_omni_ctx_t *ctx)
{
    if (ctx->tok.inflight) {
        ctx->tok.inflight = 0;
        ngx_http_omni_tok_inflight--;
    }
}


ngx_uint_t
ngx_http_omni_tokenize_inflight(void)
{
    return ngx_http_omni_tok_inflight;
}


/*
 * The request was woken: NGX_AGAIN while the subrequest runs, NGX_OK to go
 * on (with ids or on the estimate), or the client's answer (a 400).
 */
ngx_int_t
ngx_http_omni_tokenized(ngx_http_omni_ctx_t *ctx)
{
    u_char               *body;
    size_t                len;
    ngx_str_t             type = ngx_string("application/json");
    ngx_http_omni_tok_t  *tok;

    tok = &ctx->tok;

    if (!tok->done && !tok->timedout) {
        return NGX_AGAIN;
    }

    tok->pending = 0;

    if (tok->timedout) {
        ngx_http_omni_tokenize_count(ctx, NGX_HTTP_OMNI_TOK_TIMEOUT);
        return NGX_OK;
    }

    if (tok->down) {
        ngx_http_omni_tokenize_count(ctx, NGX_HTTP_OMNI_TOK_DOWN);
        return NGX_OK;
    }

    if (tok->status == NGX_HTTP_BAD_REQUEST && tok->response) {
        /* what the engine would answer: the service's own error body */
        len = ngx_buf_size(tok->response);
        body = ngx_pnalloc(ctx->request->pool, len);
        if (body == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_memcpy(body, tok->response->pos, len);
        ctx->error = "bad_input";

        return ngx_http_omni_send(ctx->request, NGX_HTTP_BAD_REQUEST, &type,
                                  body, len);
    }

    if (tok->status == 422) {
        ngx_http_omni_tokenize_count(ctx, NGX_HTTP_OMNI_TOK_UNSUPPORTED);
        return NGX_OK;
    }

    if (tok->status != NGX_HTTP_OK || tok->response == NULL
        || ngx_http_omni_tokenize_decode(ctx) != NGX_OK)
    {
        ngx_http_omni_tokenize_count(ctx, NGX_HTTP_OMNI_TOK_ERROR);
        return NGX_OK;
    }

    return NGX_OK;
}


static uint32_t
ngx_http_omni_le32(u_char *p)
{
    return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16
           | (uint32_t) p[3] << 24;
}


/* The binary answer (docs/tokenizer.md, "Answer"); NGX_ERROR: malformed. */
static ngx_int_t
ngx_http_omni_tokenize_decode(ngx_http_omni_ctx_t *ctx)
{
    u_char     *p, *ids;
    size_t      len, i;
    uint32_t    flags, count, first, k, n, longest;
    uint64_t    total;

    p = ctx->tok.response->pos;
    len = ctx->tok.response->last - p;

    if (len < NGX_HTTP_OMNI_TOK_HEADER
        || ngx_memcmp(p, NGX_HTTP_OMNI_TOK_MAGIC, 4) != 0
        || (p[4] | p[5] << 8) != NGX_HTTP_OMNI_TOK_VERSION)
    {
        return NGX_ERROR;
    }

    flags = p[6] | p[7] << 8;
    count = ngx_http_omni_le32(p + 8);

    if (flags & NGX_HTTP_OMNI_TOK_HANDLE) {
        /* 8 bytes after the ids: the conversation's learn handle */
        if (len < NGX_HTTP_OMNI_TOK_HEADER + 8
            || !(flags & NGX_HTTP_OMNI_TOK_CHAT))
        {
            return NGX_ERROR;
        }

        len -= 8;
        ctx->tok.handle = (uint64_t) ngx_http_omni_le32(p + len)
                          | (uint64_t) ngx_http_omni_le32(p + len + 4) << 32;
        ctx->tok.has_handle = 1;
    }

    if (flags & NGX_HTTP_OMNI_TOK_IDS_GIVEN) {
        /* the prompt already is ids: the request's own count stands */
        return count == 0 && len == NGX_HTTP_OMNI_TOK_HEADER
               ? NGX_OK : NGX_ERROR;
    }

    if (count == 0 || count > (len - NGX_HTTP_OMNI_TOK_HEADER) / 4
        || ((flags & NGX_HTTP_OMNI_TOK_CHAT) && count != 1))
    {
        return NGX_ERROR;
    }

    total = 0;
    longest = 0;

    for (k = 0; k < count; k++) {
        n = ngx_http_omni_le32(p + NGX_HTTP_OMNI_TOK_HEADER + 4 * k);
        total += n;
        longest = ngx_max(longest, n);
    }

    if (len != NGX_HTTP_OMNI_TOK_HEADER + 4 * (uint64_t) count + 4 * total) {
        return NGX_ERROR;
    }

    /* the first prompt's ids drive the prefix match; all count as work */

    first = ngx_http_omni_le32(p + NGX_HTTP_OMNI_TOK_HEADER);
    ids = p + NGX_HTTP_OMNI_TOK_HEADER + 4 * count;

    ctx->token_ids = ngx_palloc(ctx->request->pool,
                                (first ? first : 1) * sizeof(uint32_t));
    if (ctx->token_ids == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < first; i++) {
        ctx->token_ids[i] = ngx_http_omni_le32(ids + 4 * i);
    }

    ctx->n_tokens = first;
    ctx->prompt_tokens = total;
    ctx->longest_exact = longest;
    ctx->token_prompt = 1;
    ctx->tok.ok = 1;

    if (ctx->tok.has_handle && ctx->mcf->token_reuse
        && ctx->mcf->tokenize_learn_max
        && ngx_http_omni_learn_start(ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_omni_tokenize_count(ctx, -1);

    if (ctx->mcf->token_reuse
        && ngx_http_omni_tokenize_reuse(ctx, p + NGX_HTTP_OMNI_TOK_HEADER,
                                        ids, count, flags)
           != NGX_OK)
    {
        /* the body is unchanged: the engines tokenize it themselves */
        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "omni: could not put the ids of request %*s in its "
                      "body", ctx->request_id_len, ctx->request_id);
    }

    return NGX_OK;
}


/*
 * Reuse downstream (omni_token_reuse auto): the ids go in the body both
 * legs are built from, so every mode sends them on each leg.
 *
 * - /v1/completions: "prompt" becomes the ids (a list of lists for a list
 *   of prompts), unless "echo" asks for the prompt's text back;
 * - chat, SGLang (parallel mode): "input_ids" next to "messages", only when
 *   the service says SGLang renders the same ids;
 * - chat, vLLM (sequential mode): kept for the decode leg's
 *   kv_transfer_params.prompt_token_ids (ngx_http_omni_flow.c).
 */
static ngx_int_t
ngx_http_omni_tokenize_reuse(ngx_http_omni_ctx_t *ctx, u_char *lens,
    u_char *ids, uint32_t count, uint32_t flags)
{
    int                  rc;
    u_char              *v, *q, *body;
    size_t               size, len, n;
    uint32_t             k, j, plen;
    const char          *key;
    omni_json_doc_t      doc;
    omni_json_edit_t     edit;
    omni_json_member_t  *members;

    if (ctx->route == NGX_HTTP_OMNI_ROUTE_CHAT) {
        if (ctx->mode == NGX_HTTP_OMNI_PARALLEL
            && (flags & NGX_HTTP_OMNI_TOK_SGLANG))
        {
            key = "input_ids";

        } else if (ctx->mode == NGX_HTTP_OMNI_SEQUENTIAL) {
            key = NULL;

        } else {
            return NGX_OK;
        }

    } else {
        if (omni_json_find(ctx->body, ctx->members, ctx->n_members, "echo",
                           sizeof("echo") - 1) >= 0)
        {
            return NGX_OK;
        }

        key = "prompt";
    }

    /* the ids as JSON: at most 10 digits and a comma each, brackets and a
     * comma per prompt, the batch's brackets */

    size = 3 * (size_t) count + 2 + 11 * (size_t) ctx->prompt_tokens;

    v = ngx_pnalloc(ctx->request->pool, size);
    if (v == NULL) {
        return NGX_ERROR;
    }

    q = v;

    if (ctx->batch) {
        *q++ = '[';
    }

    for (k = 0; k < count; k++) {
        plen = ngx_http_omni_le32(lens + 4 * k);

        if (k) {
            *q++ = ',';
        }

        *q++ = '[';

        for (j = 0; j < plen; j++) {
            if (j) {
                *q++ = ',';
            }

            q = ngx_sprintf(q, "%uD", ngx_http_omni_le32(ids));
            ids += 4;
        }

        *q++ = ']';
    }

    if (ctx->batch) {
        *q++ = ']';
    }

    if (key == NULL) {
        ctx->tok.ids_json = v;
        ctx->tok.ids_json_len = q - v;
        return NGX_OK;
    }

    edit.op = OMNI_JSON_SET;
    edit.key = key;
    edit.key_len = ngx_strlen(key);
    edit.value = v;
    edit.value_len = q - v;

    rc = omni_json_apply(ctx->body, ctx->body_len, ctx->members,
                         ctx->n_members, &edit, 1, NULL, 0, &len);
    if (rc != OMNI_ERANGE && rc != OMNI_OK) {
        return NGX_ERROR;
    }

    body = ngx_pnalloc(ctx->request->pool, len + 1);
    if (body == NULL) {
        return NGX_ERROR;
    }

    rc = omni_json_apply(ctx->body, ctx->body_len, ctx->members,
                         ctx->n_members, &edit, 1, body, len, &len);
    if (rc != OMNI_OK) {
        return NGX_ERROR;
    }

    /* the members of the new body: one more at most */

    n = ctx->n_members + 1;

    members = ngx_palloc(ctx->request->pool, n * sizeof(omni_json_member_t));
    if (members == NULL) {
        return NGX_ERROR;
    }

    rc = omni_json_scan(body, len, 0, members, n, &doc);
    if (rc != OMNI_OK) {
        return NGX_ERROR;
    }

    ctx->body = body;
    ctx->body_len = len;
    ctx->members = members;
    ctx->n_members = doc.n_members;
    ctx->ids_sent = 1;

    return NGX_OK;
}


/* reason -1: tokenized; otherwise a fallback's reason */
static void
ngx_http_omni_tokenize_count(ngx_http_omni_ctx_t *ctx, ngx_int_t reason)
{
    ngx_http_omni_zone_count(ctx->mcf,
                             offsetof(ngx_http_omni_shctx_t, tokenized_total),
                             offsetof(ngx_http_omni_shctx_t, tokenize_fallback),
                             reason);
}


/*
 * vLLM chat (sequential mode): the decode leg's kv_transfer_params (the
 * prefill's answer) with the rendered prompt's ids as prompt_token_ids,
 * which vLLM's decode chat path reads instead of rendering again.
 */
ngx_int_t
ngx_http_omni_tokenize_kv(ngx_http_omni_ctx_t *ctx, u_char **kv, size_t *len)
{
    int                  rc;
    u_char              *out;
    size_t               n, size;
    omni_json_doc_t      doc;
    omni_json_edit_t     edit;
    omni_json_member_t  *members;

    if (ctx->tok.ids_json == NULL) {
        return NGX_OK;
    }

    n = NGX_HTTP_OMNI_MEMBERS;

    for ( ;; ) {
        members = ngx_palloc(ctx->request->pool,
                             n * sizeof(omni_json_member_t));
        if (members == NULL) {
            return NGX_ERROR;
        }

        rc = omni_json_scan(*kv, *len, 0, members, n, &doc);

        if (rc != OMNI_ERANGE || n >= doc.n_members) {
            break;
        }

        n = doc.n_members;
    }

    if (rc != OMNI_OK || doc.type != OMNI_JSON_OBJECT) {
        /* not ours to judge: the engine gets what the prefill said */
        return NGX_OK;
    }

    edit.op = OMNI_JSON_SET;
    edit.key = "prompt_token_ids";
    edit.key_len = sizeof("prompt_token_ids") - 1;
    edit.value = ctx->tok.ids_json;
    edit.value_len = ctx->tok.ids_json_len;

    rc = omni_json_apply(*kv, *len, members, doc.n_members, &edit, 1, NULL, 0,
                         &size);
    if (rc != OMNI_ERANGE && rc != OMNI_OK) {
        return NGX_ERROR;
    }

    out = ngx_pnalloc(ctx->request->pool, size + 1);
    if (out == NULL) {
        return NGX_ERROR;
    }

    rc = omni_json_apply(*kv, *len, members, doc.n_members, &edit, 1, out,
                         size, &size);
    if (rc != OMNI_OK) {
        return NGX_ERROR;
    }

    *kv = out;
    *len = size;

    return NGX_OK;
}
