/*
 * Omni Proxy nginx module: the request's deadline.
 *
 * omni_request_timeout, which a client may lower (never raise) with
 * X-Omni-Request-Timeout: <ms>, bounds the time from the request's arrival
 * through the queue and both legs.  At the deadline the request leaves the
 * queue or its legs are cancelled, and it gets 504, or one SSE error event
 * when its stream had started (the flow answers through
 * ngx_http_omni_deadline_answer() once a cancelled leg that wakes it ends).
 */


#include "ngx_http_omni.h"


static void ngx_http_omni_deadline_handler(ngx_event_t *ev);

/*
 * omni_request_timeout, which a client may lower (never raise) with
 * X-Omni-Request-Timeout: <ms>, bounds the time from the request's arrival
 * through the queue and both legs.  Past it the request gets 504, or one
 * SSE error event when its stream had started.
 */
ngx_int_t
ngx_http_omni_deadline_arm(ngx_http_omni_ctx_t *ctx)
{
    ngx_msec_t           deadline, spent;
    ngx_http_request_t  *r;

    r = ctx->request;
    deadline = ctx->mcf->request_timeout;

    /* the header was read with the others, ngx_http_omni_read_headers() */

    if (ctx->timeout_bad) {
        ctx->error = "bad_request";
        return ngx_http_omni_send_error(r, NGX_HTTP_BAD_REQUEST,
                   "invalid_request_error",
                   "X-Omni-Request-Timeout must be a number of "
                   "milliseconds from 1 to %i",
                   (ngx_int_t) NGX_HTTP_OMNI_TIMEOUT_HEADER_MAX);
    }

    /* a client may only shorten its deadline */
    if (ctx->timeout_header
        && (deadline == 0 || ctx->timeout_header < deadline))
    {
        deadline = ctx->timeout_header;
    }

    if (deadline == 0) {
        return NGX_OK;
    }

    ctx->deadline_ms = deadline;
    spent = ngx_current_msec - ctx->t_start;

    if (spent >= deadline) {
        ctx->deadline_hit = 1;
        return ngx_http_omni_deadline_answer(ctx);
    }

    ctx->deadline_ev.handler = ngx_http_omni_deadline_handler;
    ctx->deadline_ev.data = ctx;
    ctx->deadline_ev.log = r->connection->log;

    ngx_add_timer(&ctx->deadline_ev, deadline - spent);

    return NGX_OK;
}


static void
ngx_http_omni_deadline_handler(ngx_event_t *ev)
{
    ngx_http_omni_ctx_t  *ctx = ev->data;

    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    if (ctx->answered) {
        return;
    }

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "omni: request %*s passed its deadline of %M ms",
                  ctx->request_id_len, ctx->request_id, ctx->deadline_ms);

    ctx->deadline_hit = 1;

    /* held: out of the queue; in flight: the legs end now */
    ngx_http_omni_unhold(ctx);
    ngx_http_omni_cancel_leg(ctx, NGX_HTTP_OMNI_PREFILL);
    ngx_http_omni_cancel_leg(ctx, NGX_HTTP_OMNI_DECODE);

    rc = ngx_http_omni_deadline_answer(ctx);

    if (rc != NGX_DONE) {
        ctx->answered = 1;
        ngx_http_finalize_request(r, rc);
    }

    ngx_http_run_posted_requests(c);
}


/* NGX_DONE while a cancelled leg that wakes the request is still ending */
ngx_int_t
ngx_http_omni_deadline_answer(ngx_http_omni_ctx_t *ctx)
{
    ngx_uint_t            t;
    ngx_http_omni_leg_t  *leg;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        leg = &ctx->legs[t];

        if (leg->started && !leg->done && leg->sr
            && !leg->sr->background)
        {
            return NGX_DONE;
        }
    }

    ctx->error = "deadline";

    if (ctx->header_sent) {
        if (!ctx->stream) {
            /* a plain body was cut: close, so the client cannot take it */
            return NGX_ERROR;
        }

        return ngx_http_omni_stream_error(ctx, NGX_HTTP_GATEWAY_TIME_OUT,
            "server_error", "the request passed its deadline",
            sizeof("the request passed its deadline") - 1);
    }

    return ngx_http_omni_send_error(ctx->request, NGX_HTTP_GATEWAY_TIME_OUT,
                                    "server_error",
                                    "the request passed its deadline of "
                                    "%M ms", ctx->deadline_ms);
}
