/*
 * Omni Proxy nginx module: answer learning (docs/tokenizer.md).
 *
 * A chat request the tokenizer service gave a handle (its name for the
 * rendered conversation) has its answer's text captured as the decode leg
 * streams it to the client: the string values of "content" keys
 * (choices[0].delta.content chunks, or a whole answer's message.content),
 * unescaped, across buffer boundaries, up to omni_tokenize_learn_max bytes.
 * When the leg ends well, (handle, text) goes to the service worker that
 * gave the handle in one unix datagram, without waiting: a send that would
 * block is dropped and counted.  The service then caches the conversation
 * through the answer, so the next turn, which resends it, is encoded only
 * for its new message.  Nothing here can fail or delay the client's
 * request; a wrong capture costs only a useless learn (the service reuses
 * ids only for the exact rendered text).
 */


#include "ngx_http_omni.h"

#include <sys/un.h>


#define NGX_HTTP_OMNI_LEARN_MAGIC   "OMLN"
#define NGX_HTTP_OMNI_LEARN_HEADER  16
#define NGX_HTTP_OMNI_LEARN_SOCKET  "tokenizer.learn."

/* the scanner's states */
#define NGX_HTTP_OMNI_SCAN_OUT      0   /* outside strings */
#define NGX_HTTP_OMNI_SCAN_STR      1   /* in a string we do not keep */
#define NGX_HTTP_OMNI_SCAN_STR_ESC  2
#define NGX_HTTP_OMNI_SCAN_KEY      3   /* after the string "content" */
#define NGX_HTTP_OMNI_SCAN_COLON    4   /* after "content": */
#define NGX_HTTP_OMNI_SCAN_CAP      5   /* in a "content" string value */
#define NGX_HTTP_OMNI_SCAN_CAP_ESC  6
#define NGX_HTTP_OMNI_SCAN_CAP_U    7   /* in a \u escape's digits */

#define NGX_HTTP_OMNI_CONTENT       "content"
#define NGX_HTTP_OMNI_NO_MATCH      ((ngx_uint_t) -1)


static ngx_int_t ngx_http_omni_learn_append(ngx_http_omni_ctx_t *ctx,
    u_char *p, size_t n);
static ngx_int_t ngx_http_omni_learn_code(ngx_http_omni_ctx_t *ctx,
    uint32_t code);
static ngx_int_t ngx_http_omni_learn_escape(ngx_http_omni_ctx_t *ctx,
    u_char c);
static void ngx_http_omni_learn_count(ngx_http_omni_ctx_t *ctx,
    ngx_int_t reason);


/* The request's answer will be captured: NGX_OK, or NGX_ERROR (no memory;
 * the request goes on without learning). */
ngx_int_t
ngx_http_omni_learn_start(ngx_http_omni_ctx_t *ctx)
{
    ngx_http_omni_learn_t  *ln;

    ln = ngx_pcalloc(ctx->request->pool, sizeof(ngx_http_omni_learn_t));
    if (ln == NULL) {
        return NGX_ERROR;
    }

    ctx->learn = ln;

    return NGX_OK;
}


/*
 * Bytes of the decode leg's body on their way to the client.  Any JSON
 * string whose text is exactly "content", followed by a colon and a string,
 * has that string kept; the scanner's state carries over to the next
 * buffer, so a chunk may be cut anywhere.
 */
void
ngx_http_omni_learn_capture(ngx_http_omni_ctx_t *ctx, u_char *p,
    u_char *last)
{
    u_char                 *q, c;
    ngx_http_omni_learn_t  *ln;

    ln = ctx->learn;

    if (ln == NULL || ln->failed) {
        return;
    }

    while (p < last) {

        switch (ln->state) {

        case NGX_HTTP_OMNI_SCAN_OUT:
            p = memchr(p, '"', (size_t) (last - p));
            if (p == NULL) {
                return;
            }

            p++;
            ln->state = NGX_HTTP_OMNI_SCAN_STR;
            ln->matched = 0;
            break;

        case NGX_HTTP_OMNI_SCAN_STR:
            c = *p++;

            if (c == '"') {
                ln->state = ln->matched == sizeof(NGX_HTTP_OMNI_CONTENT) - 1
                            ? NGX_HTTP_OMNI_SCAN_KEY
                            : NGX_HTTP_OMNI_SCAN_OUT;
                break;
            }

            if (c == '\\') {
                /* an escaped key is not the plain "content" */
                ln->matched = NGX_HTTP_OMNI_NO_MATCH;
                ln->state = NGX_HTTP_OMNI_SCAN_STR_ESC;
                break;
            }

            if (ln->matched < sizeof(NGX_HTTP_OMNI_CONTENT) - 1
                && c == (u_char) NGX_HTTP_OMNI_CONTENT[ln->matched])
            {
                ln->matched++;

            } else {
                ln->matched = NGX_HTTP_OMNI_NO_MATCH;
            }

            break;

        case NGX_HTTP_OMNI_SCAN_STR_ESC:
            p++;
            ln->state = NGX_HTTP_OMNI_SCAN_STR;
            break;

        case NGX_HTTP_OMNI_SCAN_KEY:
        case NGX_HTTP_OMNI_SCAN_COLON:
            c = *p;

            if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
                p++;
                break;
            }

            if (ln->state == NGX_HTTP_OMNI_SCAN_KEY && c == ':') {
                p++;
                ln->state = NGX_HTTP_OMNI_SCAN_COLON;
                break;
            }

            if (ln->state == NGX_HTTP_OMNI_SCAN_COLON && c == '"') {
                p++;
                ln->state = NGX_HTTP_OMNI_SCAN_CAP;
                break;
            }

            /* a value "content", or "content": null, [...]: not ours; the
             * byte is looked at again outside strings */
            ln->state = NGX_HTTP_OMNI_SCAN_OUT;
            break;

        case NGX_HTTP_OMNI_SCAN_CAP:
            if (ln->high) {
                /* a high surrogate must be followed by \u and a low one */
                if (*p != '\\') {
                    ln->failed = 1;
                    return;
                }
            }

            for (q = p; q < last && *q != '"' && *q != '\\'; q++) {
                /* void */
            }

            if (q > p && ngx_http_omni_learn_append(ctx, p, q - p) != NGX_OK)
            {
                return;
            }

            p = q;

            if (p == last) {
                return;
            }

            ln->state = *p++ == '"' ? NGX_HTTP_OMNI_SCAN_OUT
                                    : NGX_HTTP_OMNI_SCAN_CAP_ESC;
            break;

        case NGX_HTTP_OMNI_SCAN_CAP_ESC:
            if (ngx_http_omni_learn_escape(ctx, *p++) != NGX_OK) {
                return;
            }

            break;

        default: /* NGX_HTTP_OMNI_SCAN_CAP_U */
            c = *p++;

            if (c >= '0' && c <= '9') {
                ln->hex = ln->hex << 4 | (uint32_t) (c - '0');

            } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
                ln->hex = ln->hex << 4 | (uint32_t) ((c | 0x20) - 'a' + 10);

            } else {
                ln->failed = 1;
                return;
            }

            if (++ln->hex_n == 4) {
                ln->state = NGX_HTTP_OMNI_SCAN_CAP;

                if (ngx_http_omni_learn_code(ctx, ln->hex) != NGX_OK) {
                    return;
                }
            }

            break;
        }
    }
}


/* The character after a backslash in a kept string. */
static ngx_int_t
ngx_http_omni_learn_escape(ngx_http_omni_ctx_t *ctx, u_char c)
{
    u_char                  ch;
    ngx_http_omni_learn_t  *ln;

    ln = ctx->learn;

    if (c == 'u') {
        ln->state = NGX_HTTP_OMNI_SCAN_CAP_U;
        ln->hex = 0;
        ln->hex_n = 0;
        return NGX_OK;
    }

    if (ln->high) {
        ln->failed = 1;
        return NGX_ERROR;
    }

    switch (c) {
    case '"':
    case '\\':
    case '/':
        ch = c;
        break;
    case 'b':
        ch = '\b';
        break;
    case 'f':
        ch = '\f';
        break;
    case 'n':
        ch = '\n';
        break;
    case 'r':
        ch = '\r';
        break;
    case 't':
        ch = '\t';
        break;
    default:
        ln->failed = 1;
        return NGX_ERROR;
    }

    ln->state = NGX_HTTP_OMNI_SCAN_CAP;

    return ngx_http_omni_learn_append(ctx, &ch, 1);
}


/* A \u escape's code unit: UTF-8 out, surrogate pairs joined. */
static ngx_int_t
ngx_http_omni_learn_code(ngx_http_omni_ctx_t *ctx, uint32_t code)
{
    u_char                  utf8[4], *q;
    ngx_http_omni_learn_t  *ln;

    ln = ctx->learn;

    if (code >= 0xdc00 && code <= 0xdfff) {
        if (ln->high == 0) {
            /* a lone low surrogate is not text */
            ln->failed = 1;
            return NGX_ERROR;
        }

        code = 0x10000 + ((ln->high - 0xd800) << 10) + (code - 0xdc00);
        ln->high = 0;

    } else if (ln->high) {
        ln->failed = 1;
        return NGX_ERROR;

    } else if (code >= 0xd800 && code <= 0xdbff) {
        ln->high = code;
        return NGX_OK;
    }

    q = utf8;

    if (code < 0x80) {
        *q++ = (u_char) code;

    } else if (code < 0x800) {
        *q++ = (u_char) (0xc0 | code >> 6);
        *q++ = (u_char) (0x80 | (code & 0x3f));

    } else if (code < 0x10000) {
        *q++ = (u_char) (0xe0 | code >> 12);
        *q++ = (u_char) (0x80 | (code >> 6 & 0x3f));
        *q++ = (u_char) (0x80 | (code & 0x3f));

    } else {
        *q++ = (u_char) (0xf0 | code >> 18);
        *q++ = (u_char) (0x80 | (code >> 12 & 0x3f));
        *q++ = (u_char) (0x80 | (code >> 6 & 0x3f));
        *q++ = (u_char) (0x80 | (code & 0x3f));
    }

    return ngx_http_omni_learn_append(ctx, utf8, q - utf8);
}


/* Text kept after the datagram's header; past the cap nothing is sent. */
static ngx_int_t
ngx_http_omni_learn_append(ngx_http_omni_ctx_t *ctx, u_char *p, size_t n)
{
    u_char                 *text;
    size_t                  size, max;
    ngx_http_omni_learn_t  *ln;

    ln = ctx->learn;
    max = ctx->mcf->tokenize_learn_max;

    if (ln->len + n > max) {
        ln->too_large = 1;
        ln->failed = 1;
        return NGX_ERROR;
    }

    if (NGX_HTTP_OMNI_LEARN_HEADER + ln->len + n > ln->size) {
        size = ln->size ? 2 * ln->size : 1024;

        while (size < NGX_HTTP_OMNI_LEARN_HEADER + ln->len + n) {
            size *= 2;
        }

        size = ngx_min(size, NGX_HTTP_OMNI_LEARN_HEADER + max);

        text = ngx_pnalloc(ctx->request->pool, size);
        if (text == NULL) {
            ln->failed = 1;
            return NGX_ERROR;
        }

        if (ln->len) {
            ngx_memcpy(text + NGX_HTTP_OMNI_LEARN_HEADER,
                       ln->text + NGX_HTTP_OMNI_LEARN_HEADER, ln->len);
        }

        ln->text = text;
        ln->size = size;
    }

    ngx_memcpy(ln->text + NGX_HTTP_OMNI_LEARN_HEADER + ln->len, p, n);
    ln->len += n;

    return NGX_OK;
}


/*
 * The decode leg ended well: (handle, text) to the service worker that
 * gave the handle, LEARN_SOCKET.<index> in nginx's prefix (index: the
 * handle's top 16 bits), in one non-blocking datagram.  At most once.
 */
void
ngx_http_omni_learn_send(ngx_http_omni_ctx_t *ctx)
{
    int                     fd;
    u_char                 *p;
    size_t                  n;
    uint64_t                h;
    ngx_uint_t              i;
    ngx_err_t               err;
    ngx_int_t               reason;
    struct sockaddr_un      sa;
    ngx_http_omni_learn_t  *ln;

    ln = ctx->learn;

    if (ln == NULL) {
        return;
    }

    ctx->learn = NULL;

    if (ln->failed || ln->high || ln->state != NGX_HTTP_OMNI_SCAN_OUT) {
        ngx_http_omni_learn_count(ctx, ln->too_large
                                       ? NGX_HTTP_OMNI_LEARN_TOO_LARGE
                                       : NGX_HTTP_OMNI_LEARN_ERROR);
        return;
    }

    if (ln->text == NULL) {
        /* an empty answer: the header alone */
        ln->text = ngx_pnalloc(ctx->request->pool,
                               NGX_HTTP_OMNI_LEARN_HEADER);
        if (ln->text == NULL) {
            ngx_http_omni_learn_count(ctx, NGX_HTTP_OMNI_LEARN_ERROR);
            return;
        }
    }

    ngx_memzero(&sa, sizeof(struct sockaddr_un));
    sa.sun_family = AF_UNIX;

    h = ctx->tok.handle;
    n = ngx_cycle->prefix.len + sizeof(NGX_HTTP_OMNI_LEARN_SOCKET) - 1
        + NGX_INT_T_LEN + 2;

    if (n >= sizeof(sa.sun_path)) {
        ngx_http_omni_learn_count(ctx, NGX_HTTP_OMNI_LEARN_ERROR);
        return;
    }

    p = ngx_cpymem(sa.sun_path, ngx_cycle->prefix.data,
                   ngx_cycle->prefix.len);

    if (p > (u_char *) sa.sun_path && p[-1] != '/') {
        *p++ = '/';
    }

    p = ngx_cpymem(p, NGX_HTTP_OMNI_LEARN_SOCKET,
                   sizeof(NGX_HTTP_OMNI_LEARN_SOCKET) - 1);
    p = ngx_sprintf(p, "%uL", (uint64_t) (h >> 48));
    *p = '\0';

    /* the header: magic, version 1, 0, the handle (little-endian) */

    p = ngx_cpymem(ln->text, NGX_HTTP_OMNI_LEARN_MAGIC, 4);
    *p++ = 1;
    *p++ = 0;
    *p++ = 0;
    *p++ = 0;

    for (i = 0; i < 8; i++) {
        *p++ = (u_char) (h >> (8 * i));
    }

    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        ngx_http_omni_learn_count(ctx, NGX_HTTP_OMNI_LEARN_ERROR);
        return;
    }

    if (sendto(fd, ln->text, NGX_HTTP_OMNI_LEARN_HEADER + ln->len,
               MSG_DONTWAIT, (struct sockaddr *) &sa, sizeof(sa))
        == -1)
    {
        err = ngx_errno;
        reason = (err == NGX_EAGAIN || err == ENOBUFS)
                 ? NGX_HTTP_OMNI_LEARN_BUSY
                 : (err == NGX_ENOENT || err == NGX_ECONNREFUSED)
                   ? NGX_HTTP_OMNI_LEARN_DOWN : NGX_HTTP_OMNI_LEARN_ERROR;

        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ctx->request->connection->log,
                       err, "omni learn: not sent to \"%s\"", sa.sun_path);

    } else {
        reason = -1;
    }

    (void) close(fd);

    ngx_http_omni_learn_count(ctx, reason);
}


/* reason -1: sent; otherwise why not (once per request, not per chunk) */
static void
ngx_http_omni_learn_count(ngx_http_omni_ctx_t *ctx, ngx_int_t reason)
{
    ngx_http_omni_zone_count(ctx->mcf,
                             offsetof(ngx_http_omni_shctx_t, learn_sent),
                             offsetof(ngx_http_omni_shctx_t, learn_dropped),
                             reason);
}
