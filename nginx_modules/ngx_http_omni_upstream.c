/*
 * Omni Proxy nginx module: the upstream balancer (`omni_balance`).
 *
 * Built on round robin like nginx's least_conn.  The instance of a leg is
 * decided by the scheduler before the leg starts (in parallel mode the
 * prefill's address is written into both bodies); get() connects to that
 * decision, and on a retry (nginx's proxy_next_upstream, only before the
 * request was sent) picks the least-loaded usable instance not tried yet.
 * free() releases the leg's load and records the outcome, then calls round
 * robin's free; keepalive wraps us as it wraps round robin.
 */


#include "ngx_http_omni.h"


typedef struct {
    /* the round robin data must come first: rr's functions use it */
    ngx_http_upstream_rr_peer_data_t   rrp;

    ngx_http_omni_upstream_conf_t     *ucf;
    ngx_http_request_t                *request;
    ngx_http_omni_leg_t               *leg;
    /* accounting of a request that is not an omni leg (location /) */
    ngx_http_omni_leg_t                plain;

    /* the instance of the last try, and whether it failed on a reused
     * idle connection (the engine closed it as we sent): retried once on
     * the same instance, not counted against it */
    ngx_uint_t                         last;
    unsigned                           stale:1;
    unsigned                           stale_retried:1;
} ngx_http_omni_peer_data_t;


static ngx_int_t ngx_http_omni_init_upstream(ngx_conf_t *cf,
    ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_omni_init_peer(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_omni_get_peer(ngx_peer_connection_t *pc,
    void *data);
static void ngx_http_omni_free_peer(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state);
static ngx_uint_t ngx_http_omni_failure_kind(ngx_peer_connection_t *pc,
    ngx_http_upstream_t *u);


char *
ngx_http_omni_balance(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_omni_upstream_conf_t  *ucf = conf;

    ngx_str_t                     *value;
    ngx_uint_t                     role;
    ngx_http_omni_main_conf_t     *mcf;
    ngx_http_upstream_srv_conf_t  *uscf;

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "prefill") == 0) {
        role = NGX_HTTP_OMNI_PREFILL;

    } else if (ngx_strcmp(value[1].data, "decode") == 0) {
        role = NGX_HTTP_OMNI_DECODE;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid role \"%V\" in \"omni_balance\", "
                           "use \"prefill\" or \"decode\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (ucf->role != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_module);

    if (mcf->tiers[role]) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_balance %V\" is already used by upstream "
                           "\"%V\"", &value[1],
                           &mcf->tiers[role]->upstream->host);
        return NGX_CONF_ERROR;
    }

    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);

    if (uscf->peer.init_upstream) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "load balancing method redefined");
    }

    ucf->role = role;
    ucf->mcf = mcf;
    ucf->upstream = uscf;
    mcf->tiers[role] = ucf;

    uscf->peer.init_upstream = ngx_http_omni_init_upstream;

    uscf->flags = NGX_HTTP_UPSTREAM_CREATE
                  |NGX_HTTP_UPSTREAM_WEIGHT
                  |NGX_HTTP_UPSTREAM_MAX_CONNS
                  |NGX_HTTP_UPSTREAM_MAX_FAILS
                  |NGX_HTTP_UPSTREAM_FAIL_TIMEOUT
                  |NGX_HTTP_UPSTREAM_DOWN;

    return NGX_CONF_OK;
}


char *
ngx_http_omni_bootstrap(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_omni_upstream_conf_t  *ucf = conf;

    ngx_int_t                   port;
    ngx_str_t                  *value;
    ngx_http_omni_bootstrap_t  *b;

    value = cf->args->elts;

    port = ngx_atoi(value[2].data, value[2].len);

    if (port < 1 || port > 65535) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid bootstrap port \"%V\" in "
                           "\"omni_bootstrap\"", &value[2]);
        return NGX_CONF_ERROR;
    }

    if (ucf->bootstrap == NULL) {
        ucf->bootstrap = ngx_array_create(cf->pool, 4,
                                          sizeof(ngx_http_omni_bootstrap_t));
        if (ucf->bootstrap == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    b = ngx_array_push(ucf->bootstrap);
    if (b == NULL) {
        return NGX_CONF_ERROR;
    }

    b->addr = value[1];
    b->port = (in_port_t) port;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_omni_init_upstream(ngx_conf_t *cf, ngx_http_upstream_srv_conf_t *us)
{
    ngx_uint_t                      i, j;
    ngx_http_omni_bootstrap_t      *b;
    ngx_http_upstream_rr_peer_t    *peer;
    ngx_http_upstream_rr_peers_t   *peers;
    ngx_http_omni_upstream_conf_t  *ucf;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, cf->log, 0, "omni init upstream");

    if (ngx_http_upstream_init_round_robin(cf, us) != NGX_OK) {
        return NGX_ERROR;
    }

    ucf = ngx_http_conf_upstream_srv_conf(us, ngx_http_omni_module);
    peers = us->peer.data;

    if (peers->next) {
        ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                      "omni: backup servers in upstream \"%V\" are not "
                      "used by omni_balance", &us->host);
    }

    ucf->n = peers->number;

    ucf->peers = ngx_pcalloc(cf->pool,
                             ucf->n * sizeof(ngx_http_upstream_rr_peer_t *));
    ucf->slots = ngx_pcalloc(cf->pool, ucf->n * sizeof(ngx_uint_t));
    ucf->bootstrap_ports = ngx_pcalloc(cf->pool, ucf->n * sizeof(in_port_t));

    if (ucf->peers == NULL || ucf->slots == NULL
        || ucf->bootstrap_ports == NULL)
    {
        return NGX_ERROR;
    }

    for (i = 0, peer = peers->peer; peer && i < ucf->n; peer = peer->next) {
        ucf->peers[i] = peer;
        ucf->slots[i] = NGX_HTTP_OMNI_MAX_SLOTS;
        ucf->bootstrap_ports[i] = 8998;     /* SGLang's default */
        i++;
    }

    if (ucf->bootstrap == NULL) {
        goto done;
    }

    b = ucf->bootstrap->elts;

    for (j = 0; j < ucf->bootstrap->nelts; j++) {

        for (i = 0; i < ucf->n; i++) {
            if (ucf->peers[i]->name.len == b[j].addr.len
                && ngx_strncmp(ucf->peers[i]->name.data, b[j].addr.data,
                               b[j].addr.len) == 0)
            {
                ucf->bootstrap_ports[i] = b[j].port;
                break;
            }
        }

        if (i == ucf->n) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"omni_bootstrap %V\" does not name a server of "
                          "upstream \"%V\" (write the address as the server "
                          "line resolves it, e.g. 127.0.0.1:8001)",
                          &b[j].addr, &us->host);
            return NGX_ERROR;
        }
    }

done:

    us->peer.init = ngx_http_omni_init_peer;

    return NGX_OK;
}


static ngx_int_t
ngx_http_omni_init_peer(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_omni_ctx_t            *ctx;
    ngx_http_omni_leg_t            *leg;
    ngx_http_omni_peer_data_t      *pd;
    ngx_http_omni_upstream_conf_t  *ucf;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "omni init peer");

    pd = ngx_pcalloc(r->pool, sizeof(ngx_http_omni_peer_data_t));
    if (pd == NULL) {
        return NGX_ERROR;
    }

    r->upstream->peer.data = &pd->rrp;

    if (ngx_http_upstream_init_round_robin_peer(r, us) != NGX_OK) {
        return NGX_ERROR;
    }

    ucf = ngx_http_conf_upstream_srv_conf(us, ngx_http_omni_module);

    pd->ucf = ucf;
    pd->request = r;

    ctx = (r != r->main) ? ngx_http_omni_get_ctx(r) : NULL;
    leg = ctx ? &ctx->legs[ucf->role] : NULL;

    if (leg && leg->sr == r && leg->cancelled) {
        /*
         * Cancelled before it connected (the other leg failed first): it
         * never starts.  Its charge goes back now; the error ends the
         * subrequest quietly and the request answers for the other leg.
         */
        ngx_http_omni_ledger_release(ucf->mcf, leg,
                                     NGX_HTTP_OMNI_OUTCOME_NONE, 0);
        return NGX_ERROR;
    }

    if (leg && leg->sr == r && leg->state == NGX_HTTP_OMNI_LEG_RESERVED) {
        pd->leg = leg;

        if (ctx->mode == NGX_HTTP_OMNI_PARALLEL
            && ucf->role == NGX_HTTP_OMNI_PREFILL)
        {
            /* the decode leg was told this prefill's address */
            r->upstream->peer.tries = 1;
        }

    } else {
        pd->leg = &pd->plain;
    }

    r->upstream->peer.get = ngx_http_omni_get_peer;
    r->upstream->peer.free = ngx_http_omni_free_peer;

    return NGX_OK;
}


static ngx_int_t
ngx_http_omni_get_peer(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_omni_peer_data_t  *pd = data;

    uintptr_t                     m;
    ngx_uint_t                    index, n;
    ngx_http_omni_leg_t          *leg;
    ngx_http_upstream_rr_peer_t  *peer;

    leg = pd->leg;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                   "omni get peer, try: %ui, leg state: %ui",
                   pc->tries, leg->state);

    pc->cached = 0;
    pc->connection = NULL;

    if (leg->state == NGX_HTTP_OMNI_LEG_RESERVED) {
        index = leg->index;

    } else if (pd->stale) {
        /* once more on the same instance: nginx added the try */
        pd->stale = 0;
        pd->stale_retried = 1;
        index = pd->last;

        leg->sr = pd->request;

        if (ngx_http_omni_ledger_leg_bind(pd->ucf, leg, index) != NGX_OK) {
            pc->name = &pd->ucf->upstream->host;
            return NGX_BUSY;
        }

    } else {
        /* a retry, or a request the scheduler did not place */
        if (ngx_http_omni_choose_retry(pd->request, pd->ucf, pd->rrp.tried,
                                       &index)
            != NGX_OK)
        {
            pc->name = &pd->ucf->upstream->host;
            return NGX_BUSY;
        }

        /*
         * The ledger charges the new instance with all the leg carried
         * (its load, its prefill's predictor job, prefilling): the free
         * of the failed try gave all of it back on the old one.
         */

        leg->sr = pd->request;

        if (ngx_http_omni_ledger_leg_bind(pd->ucf, leg, index) != NGX_OK) {
            pc->name = &pd->ucf->upstream->host;
            return NGX_BUSY;
        }
    }

    if (index >= pd->ucf->n) {
        return NGX_BUSY;
    }

    peer = pd->ucf->peers[index];

    n = index / (8 * sizeof(uintptr_t));
    m = (uintptr_t) 1 << index % (8 * sizeof(uintptr_t));
    pd->rrp.tried[n] |= m;

    pd->rrp.current = peer;
    pd->last = index;
    peer->conns++;

    leg->state = NGX_HTTP_OMNI_LEG_ACTIVE;

    pc->sockaddr = peer->sockaddr;
    pc->socklen = peer->socklen;
    pc->name = &peer->name;

    return NGX_OK;
}


static void
ngx_http_omni_free_peer(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state)
{
    ngx_http_omni_peer_data_t  *pd = data;

    ngx_uint_t            failed, prefill_ok;
    ngx_http_omni_ctx_t  *ctx;
    ngx_http_upstream_t  *u;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                   "omni free peer, tries: %ui, state: %ui", pc->tries, state);

    /*
     * One release for every end of a try: success, engine error, refused
     * connection, timeout, a retry to come, a cancel, a client that went
     * away (the upstream's cleanup frees it too).  The prefill it carried
     * succeeded only with a 2xx answer read whole.
     */

    u = pd->request->upstream;

    /*
     * A failure on a reused idle connection is the engine's idle close
     * racing our request, not the instance failing: nginx gives it one
     * more try (peer.cached), and we make it the same instance.
     */

    if ((state & NGX_PEER_FAILED) && pc->cached && !pd->stale_retried
        && !pd->leg->cancelled)
    {
        ngx_log_error(NGX_LOG_INFO, pc->log, 0,
                      "omni: reused connection to %V failed, retrying on a "
                      "new one", pc->name);

        pd->stale = 1;
        state &= ~NGX_PEER_FAILED;

        ngx_http_omni_ledger_release(pd->ucf->mcf, pd->leg,
                                     NGX_HTTP_OMNI_OUTCOME_NONE, 0);
        goto rr;
    }

    /*
     * An engine's 5xx answer passed on (the last try) arrives here as a
     * success: it counts against the instance all the same, in our health
     * state and in round robin's (which would otherwise reset its fails).
     */

    if (!(state & NGX_PEER_FAILED) && !pd->leg->cancelled && u
        && u->headers_in.status_n >= 500)
    {
        state |= NGX_PEER_FAILED;
    }

    failed = (state & NGX_PEER_FAILED) != 0 && !pd->leg->cancelled;

    if (failed
        && !(ngx_http_omni_failure_kind(pc, u) & pd->ucf->mcf->passive_health))
    {
        /* a kind of failure --passive-health-on does not count */
        failed = 0;
        state &= ~NGX_PEER_FAILED;
    }

    prefill_ok = !(state & NGX_PEER_FAILED) && !pd->leg->cancelled && u
                 && u->headers_in.status_n >= 200
                 && u->headers_in.status_n < 300;

    /* the engine refused the prefill this leg carried: its marks go */

    if (!prefill_ok && !pd->leg->cancelled && pd->leg->charge
        && (pd->leg->charge->flags & NGX_HTTP_OMNI_CHARGE_JOB))
    {
        ctx = ngx_http_omni_get_ctx(pd->request);

        if (ctx) {
            ngx_http_omni_unmark(ctx, pd->leg->charge->slot);
        }
    }

    /* a cancelled leg says nothing of its instance, good or bad */

    ngx_http_omni_ledger_release(pd->ucf->mcf, pd->leg,
                                 pd->leg->cancelled
                                 ? NGX_HTTP_OMNI_OUTCOME_NONE
                                 : failed ? NGX_HTTP_OMNI_OUTCOME_FAILED
                                          : NGX_HTTP_OMNI_OUTCOME_OK,
                                 prefill_ok);

rr:

    /* the load it gave back may let a held request go */
    ngx_http_omni_schedule(pd->ucf->mcf);

    if (pd->rrp.current == NULL) {
        return;
    }

    ngx_http_upstream_free_round_robin_peer(pc, &pd->rrp, state);

    pd->rrp.current = NULL;
}


/* what a failed try was: NGX_HTTP_OMNI_PH_ERROR, _TIMEOUT or _5XX */
static ngx_uint_t
ngx_http_omni_failure_kind(ngx_peer_connection_t *pc, ngx_http_upstream_t *u)
{
    ngx_connection_t  *c;

    if (u && u->headers_in.status_n >= 500) {
        return NGX_HTTP_OMNI_PH_5XX;
    }

    c = pc->connection;

    if (c && (c->read->timedout || c->write->timedout)) {
        return NGX_HTTP_OMNI_PH_TIMEOUT;
    }

    return NGX_HTTP_OMNI_PH_ERROR;
}
