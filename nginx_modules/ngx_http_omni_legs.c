/*
 * Omni Proxy nginx module: the prefill and decode legs.
 *
 * Each leg is a subrequest to an internal location that proxy_passes to the
 * tier's upstream, so both legs get nginx's own keepalive, timeouts, buffering
 * rules and retries.
 *
 * - A prefill leg is an in-memory background subrequest: its answer is
 *   collected in memory and never reaches the client by itself.
 * - A decode leg is an ordinary subrequest whose body streams to the client.
 *   Its response header is caught in our header filter and turned into the
 *   client's header, so a failed leg (5xx, no answer) can still be reported
 *   as one well-formed error instead of a half-sent response.
 *
 * The post-subrequest handler records how a leg ended and swallows its error
 * code, so an upstream failure never tears the client request down: the main
 * request is woken and decides what comes next (ngx_http_omni_flow.c).
 */


#include "ngx_http_omni.h"


static ngx_int_t ngx_http_omni_leg_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc);
static ssize_t ngx_http_omni_cancelled_recv(ngx_connection_t *c, u_char *buf,
    size_t size);
static ssize_t ngx_http_omni_cancelled_recv_chain(ngx_connection_t *c,
    ngx_chain_t *in, off_t limit);
static ngx_http_omni_leg_t *ngx_http_omni_find_leg(ngx_http_request_t *r,
    ngx_http_omni_ctx_t **pctx);
static ngx_int_t ngx_http_omni_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_omni_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_str_t  ngx_http_omni_post = ngx_string("POST");
static ngx_str_t  ngx_http_omni_sse_type = ngx_string("text/event-stream");


ngx_int_t
ngx_http_omni_filters_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_omni_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_omni_body_filter;

    return NGX_OK;
}


ngx_int_t
ngx_http_omni_start_leg(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier,
    ngx_chain_t *body, off_t len, ngx_uint_t in_memory)
{
    u_char                      *p;
    ngx_str_t                    uri;
    ngx_uint_t                   flags;
    ngx_http_request_t          *r, *sr;
    ngx_http_omni_leg_t         *leg;
    ngx_http_request_body_t     *rb;
    ngx_http_post_subrequest_t  *ps;

    r = ctx->request;
    leg = &ctx->legs[tier];

    if (tier == NGX_HTTP_OMNI_PREFILL) {
        ngx_str_set(&uri, NGX_HTTP_OMNI_PREFILL_PREFIX);
    } else {
        ngx_str_set(&uri, NGX_HTTP_OMNI_DECODE_PREFIX);
    }

    p = ngx_pnalloc(r->pool, uri.len + r->uri.len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, uri.data, uri.len);
    ngx_memcpy(p + uri.len, r->uri.data, r->uri.len);
    uri.data = p;
    uri.len += r->uri.len;

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_ERROR;
    }

    ps->handler = ngx_http_omni_leg_done;
    ps->data = ctx;

    flags = in_memory ? (NGX_HTTP_SUBREQUEST_IN_MEMORY
                         |NGX_HTTP_SUBREQUEST_BACKGROUND)
                      : 0;

    if (ngx_http_subrequest(r, &uri, &r->args, &sr, ps, flags) != NGX_OK) {
        return NGX_ERROR;
    }

    rb = ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t));
    if (rb == NULL) {
        return NGX_ERROR;
    }

    rb->bufs = body;
    rb->rest = 0;

    sr->request_body = rb;
    sr->method = NGX_HTTP_POST;
    sr->method_name = ngx_http_omni_post;
    sr->headers_in.content_length_n = len;
    sr->headers_in.chunked = 0;
    sr->headers_in.transfer_encoding = NULL;
    sr->request_body_no_buffering = 0;

    leg->sr = sr;
    leg->started = 1;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni start leg %ui \"%V\", body %O", tier, &uri, len);

    return NGX_OK;
}


void
ngx_http_omni_cancel_leg(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier)
{
    ngx_connection_t     *pc;
    ngx_http_request_t   *sr;
    ngx_http_upstream_t  *u;
    ngx_http_omni_leg_t  *leg;

    leg = &ctx->legs[tier];
    sr = leg->sr;

    if (!leg->started || leg->done || leg->cancelled) {
        return;
    }

    leg->cancelled = 1;
    leg->suppress = 1;

    ngx_http_omni_ledger_cancelled(ctx->mcf);

    ngx_log_error(NGX_LOG_INFO, ctx->request->connection->log, 0,
                  "omni: cancelling the %s leg of request %*s",
                  tier == NGX_HTTP_OMNI_PREFILL ? "prefill" : "decode",
                  ctx->request_id_len, ctx->request_id);

    u = sr->upstream;

    if (u == NULL || u->peer.connection == NULL) {
        /* not connected yet: the balancer refuses to start it */
        return;
    }

    if (sr->background && u->cleanup && *u->cleanup) {
        /*
         * A background leg is nobody's output: finalize its upstream at
         * once.  This closes the connection, which is how engines learn that
         * the request is gone, and never calls the post-subrequest handler.
         */
        leg->done = 1;
        leg->failed = 1;
        (*u->cleanup)(sr);
        return;
    }

    /*
     * A leg that owns the client's output must end through the normal
     * subrequest path so the main request is woken.  Its next read fails
     * (no retry: one try left, the connection not a cached one nginx would
     * try again), which nginx's upstream ends as a 502 and logs nothing of:
     * not a timeout, and not at error level; the line above says what it
     * was.
     */

    pc = u->peer.connection;
    u->peer.tries = 1;
    u->peer.cached = 0;
    pc->recv = ngx_http_omni_cancelled_recv;
    pc->recv_chain = ngx_http_omni_cancelled_recv_chain;
    pc->read->ready = 1;
    ngx_post_event(pc->read, &ngx_posted_events);
}


/* The reads of a cancelled leg's upstream connection. */
static ssize_t
ngx_http_omni_cancelled_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
    c->read->error = 1;
    c->read->ready = 0;

    return NGX_ERROR;
}


static ssize_t
ngx_http_omni_cancelled_recv_chain(ngx_connection_t *c, ngx_chain_t *in,
    off_t limit)
{
    c->read->error = 1;
    c->read->ready = 0;

    return NGX_ERROR;
}


static ngx_int_t
ngx_http_omni_leg_done(ngx_http_request_t *sr, void *data, ngx_int_t rc)
{
    ngx_http_omni_ctx_t  *ctx = data;

    ngx_uint_t            tier;
    ngx_http_omni_leg_t  *leg;

    for (tier = 0; tier < NGX_HTTP_OMNI_TIERS; tier++) {
        if (ctx->legs[tier].sr == sr) {
            break;
        }
    }

    if (tier == NGX_HTTP_OMNI_TIERS) {
        return rc;
    }

    leg = &ctx->legs[tier];

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, sr->connection->log, 0,
                   "omni leg %ui done: rc %i, status %ui, complete %ui",
                   tier, rc, sr->headers_out.status,
                   (ngx_uint_t) leg->complete);

    if (!leg->done || leg->rc == 0) {
        leg->rc = rc;
    }

    if (!leg->done) {
        leg->done = 1;
        leg->finished = ngx_current_msec;

        if (leg->header) {
            leg->status = sr->headers_out.status;
        }

        if (sr->out && sr->out->buf) {
            leg->response = sr->out->buf;
        }

        if (rc == NGX_ERROR || rc >= NGX_HTTP_SPECIAL_RESPONSE
            || !leg->header || !leg->complete)
        {
            leg->failed = 1;
        }

        if (!leg->header && rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            leg->status = rc;
        }

        /* a prefill leg's job ended with its upstream (the ledger) */
        if (!sr->subrequest_in_memory) {
            ngx_http_omni_decode_observed(ctx, leg, 0, 1);

            /* the client's whole answer passed: the tokenizer learns it
             * (a failed leg's bytes, if any, are no answer to learn) */
            if (ctx->learn && !leg->suppress
                && (leg->failed || leg->status != NGX_HTTP_OK))
            {
                ctx->learn->failed = 1;

            } else if (!leg->suppress) {
                ngx_http_omni_learn_send(ctx);
            }
        }

        if (sr->background) {
            /* nginx wakes the parent of foreground subrequests only */
            ngx_http_post_request(ctx->request, NULL);
        }
    }

    if (sr->connection->error) {
        return rc;
    }

    /* the main request reports the failure; keep it alive */
    return NGX_OK;
}


ngx_http_omni_ctx_t *
ngx_http_omni_get_ctx(ngx_http_request_t *r)
{
    return ngx_http_get_module_ctx(r->main, ngx_http_omni_module);
}


static ngx_http_omni_leg_t *
ngx_http_omni_find_leg(ngx_http_request_t *r, ngx_http_omni_ctx_t **pctx)
{
    ngx_uint_t            tier;
    ngx_http_omni_ctx_t  *ctx;

    if (r == r->main) {
        return NULL;
    }

    ctx = ngx_http_omni_get_ctx(r);
    if (ctx == NULL) {
        return NULL;
    }

    for (tier = 0; tier < NGX_HTTP_OMNI_TIERS; tier++) {
        if (ctx->legs[tier].sr == r) {
            *pctx = ctx;
            return &ctx->legs[tier];
        }
    }

    return NULL;
}


static ngx_int_t
ngx_http_omni_header_filter(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_http_request_t   *mr;
    ngx_http_omni_ctx_t  *ctx;
    ngx_http_omni_leg_t  *leg;

    leg = ngx_http_omni_find_leg(r, &ctx);

    if (leg == NULL) {
        return ngx_http_next_header_filter(r);
    }

    leg->header = 1;
    leg->status = r->headers_out.status;
    leg->content_type = r->headers_out.content_type;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni leg header: status %ui, in memory %ui",
                   r->headers_out.status, (ngx_uint_t) r->subrequest_in_memory);

    if (r->subrequest_in_memory) {
        return ngx_http_next_header_filter(r);
    }

    /* the decode leg: its header becomes the client's */

    mr = r->main;

    if (leg->suppress || ctx->header_sent || ctx->answered
        || r->headers_out.status >= NGX_HTTP_INTERNAL_SERVER_ERROR)
    {
        /* 5xx: the main request answers with one error of its own */
        leg->suppress = 1;
        return NGX_OK;
    }

    mr->headers_out.status = r->headers_out.status;
    mr->headers_out.content_type = r->headers_out.content_type;
    mr->headers_out.content_type_len = r->headers_out.content_type_len;
    mr->headers_out.charset = r->headers_out.charset;

    if (r->headers_out.content_type.len >= ngx_http_omni_sse_type.len
        && ngx_strncasecmp(r->headers_out.content_type.data,
                           ngx_http_omni_sse_type.data,
                           ngx_http_omni_sse_type.len) == 0)
    {
        /* a stream: chunked, so an error event can still be appended */
        mr->headers_out.content_length_n = -1;

    } else {
        mr->headers_out.content_length_n = r->headers_out.content_length_n;
    }

    if (ngx_http_omni_id_headers(mr, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->header_sent = 1;
    ctx->status = mr->headers_out.status;

    rc = ngx_http_send_header(mr);

    if (rc == NGX_ERROR || rc > NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_omni_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    u_char               *p;
    ngx_uint_t            data, events;
    ngx_chain_t          *cl;
    ngx_http_omni_ctx_t  *ctx;
    ngx_http_omni_leg_t  *leg;

    if (in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    leg = ngx_http_omni_find_leg(r, &ctx);

    if (leg == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    data = 0;
    events = 0;

    for (cl = in; cl; cl = cl->next) {
        if (cl->buf->last_in_chain || cl->buf->last_buf) {
            leg->complete = 1;
        }

        if (ngx_buf_size(cl->buf)) {
            data = 1;
        }

        if (cl->buf->in_file || r->subrequest_in_memory) {
            if (ctx->learn && !r->subrequest_in_memory) {
                /* bytes not looked at: the capture would lack them */
                ctx->learn->failed = 1;
            }

            continue;
        }

        /*
         * SSE events end with a blank line.  memchr(), not ngx_strlchr():
         * the libc one is vectorized, and a non-streamed answer (no event
         * at all) is otherwise walked byte by byte.
         */
        for (p = cl->buf->pos; p + 1 < cl->buf->last; p++) {
            p = memchr(p, '\n', (size_t) (cl->buf->last - p));

            if (p == NULL) {
                break;
            }

            if (p + 1 < cl->buf->last && p[1] == '\n') {
                events++;
                p++;
            }
        }

        if (ctx->learn && !leg->suppress) {
            ngx_http_omni_learn_capture(ctx, cl->buf->pos, cl->buf->last);
        }

        if (leg->suppress) {
            /* consumed, so nginx does not wait for it to be written */
            cl->buf->pos = cl->buf->last;
            cl->buf->file_pos = cl->buf->file_last;
        }
    }

    if (leg->suppress) {
        return NGX_OK;
    }

    if (data && !r->subrequest_in_memory) {
        if (ctx->t_first_byte == 0) {
            ctx->t_first_byte = ngx_current_msec;
        }

        if (ctx->mode == NGX_HTTP_OMNI_AGGREGATED && !leg->first) {
            /* the first byte ends an aggregated leg's prefill */
            ngx_http_omni_prefill_observed(ctx, leg, 1);
        }

        ngx_http_omni_decode_observed(ctx, leg, events, 0);
    }

    return ngx_http_next_body_filter(r, in);
}
