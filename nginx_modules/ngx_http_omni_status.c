/*
 * Omni Proxy nginx module: /omni/status (JSON), /metrics (Prometheus text)
 * and /health.  The generated config serves the first two to loopback only.
 *
 * Each page is rendered from one consistent copy of the shared state, taken
 * under the zone lock, so a slow client never holds the lock.
 */


#include "ngx_http_omni.h"


static ngx_int_t ngx_http_omni_snapshot(ngx_http_request_t *r,
    ngx_http_omni_main_conf_t **pmcf, ngx_http_omni_shctx_t **psh);
static ngx_int_t ngx_http_omni_reply(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, u_char *body, size_t len);


static const char  *ngx_http_omni_roles[] = { "prefill", "decode" };
static const char  *ngx_http_omni_modes[] = {
    "sequential", "parallel", "aggregated"
};
static const char  *ngx_http_omni_policies[] = {
    "omni", "cache-aware", "least-loaded", "round-robin"
};
static const char  *ngx_http_omni_orders[] = { "sjf", "fcfs" };
static const char  *ngx_http_omni_routes[] = {
    "completions", "chat_completions", "other"
};
static const char  *ngx_http_omni_hist_names[] = {
    "omni_prefill_leg_seconds", "omni_time_to_first_byte_seconds",
    "omni_request_seconds", "omni_queue_seconds"
};
static const char  *ngx_http_omni_hist_help[] = {
    "Duration of the prefill leg (sequential and parallel modes).",
    "Client request arrival to the first response byte.",
    "Client request arrival to the last response byte.",
    "Time a request was held in the proxy before dispatch."
};


/* A consistent copy of the zone's state (404 when no zone is configured). */
static ngx_int_t
ngx_http_omni_snapshot(ngx_http_request_t *r, ngx_http_omni_main_conf_t **pmcf,
    ngx_http_omni_shctx_t **psh)
{
    ngx_slab_pool_t            *shpool;
    ngx_http_omni_shctx_t      *sh, *copy;
    ngx_http_omni_main_conf_t  *mcf;

    mcf = ngx_http_get_module_main_conf(r, ngx_http_omni_module);
    *pmcf = mcf;

    if (mcf->shm_zone == NULL) {
        return NGX_HTTP_NOT_FOUND;
    }

    copy = ngx_palloc(r->pool, sizeof(ngx_http_omni_shctx_t));
    if (copy == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_shmtx_lock(&shpool->mutex);
    ngx_memcpy(copy, sh, offsetof(ngx_http_omni_shctx_t, inst)
                         + sh->n_slots * sizeof(ngx_http_omni_inst_t));
    ngx_memcpy(copy->ingest, sh->ingest,
               sh->n_slots * sizeof(omni_ingest_inst_t));
    ngx_shmtx_unlock(&shpool->mutex);

    *psh = copy;

    return NGX_OK;
}


static ngx_int_t
ngx_http_omni_reply(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, u_char *body, size_t len)
{
    ngx_str_t  t;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    t.data = (u_char *) type;
    t.len = ngx_strlen(type);

    return ngx_http_omni_send(r, status, &t, body, len);
}


/*
 * The predictor's view of one instance and what the prefix index holds
 * for it, read under the zone lock (the model lives in the zone).
 */
static u_char *
ngx_http_omni_status_model(u_char *p, ngx_http_omni_main_conf_t *mcf,
    ngx_uint_t slot, uint64_t now_us)
{
    int64_t                 wait;
    ngx_slab_pool_t        *shpool;
    ngx_http_omni_shctx_t  *sh;
    omni_predict_state_t    ps;
    omni_index_instance_t   is;

    sh = ngx_http_omni_shm(mcf, &shpool);

    ngx_memzero(&ps, sizeof(omni_predict_state_t));
    ngx_memzero(&is, sizeof(omni_index_instance_t));

    ngx_shmtx_lock(&shpool->mutex);

    (void) omni_predict_state(sh->predict, (uint32_t) slot, &ps);
    wait = omni_predict_wait_us(sh->predict, (uint32_t) slot, now_us);
    (void) omni_index_instance_stats(sh->index, (uint32_t) slot, &is);

    ngx_shmtx_unlock(&shpool->mutex);

    return ngx_sprintf(p,
               "\"predictor\":{\"prefill_coef\":[%.6f,%.6f,%.6f],"
               "\"decode_coef\":[%.6f,%.6f,%.6f],"
               "\"prefill_samples\":%uL,\"decode_samples\":%uL,"
               "\"prefill_mape\":%.4f,\"decode_mape\":%.4f,"
               "\"completion_mape\":%.4f,\"predicted_free_in_ms\":%.1f,"
               "\"prefills_in_flight\":%uD,\"dispatch_overhead_ms\":%.2f,"
               "\"dispatch_overhead_per_1k_tokens_ms\":%.3f,"
               "\"transfer_per_1k_tokens_ms\":%.3f,"
               "\"transfer_samples\":%uL,"
               "\"transfer_told_samples\":%uL,\"engine_ends\":%uL},"
               "\"cache\":{\"blocks\":%uD,\"precise\":%uD,"
               "\"approx\":%uD,\"evicted\":%uL}",
               ps.prefill_coef[0], ps.prefill_coef[1], ps.prefill_coef[2],
               ps.decode_coef[0], ps.decode_coef[1], ps.decode_coef[2],
               ps.prefill_samples, ps.decode_samples,
               ps.prefill_mape, ps.decode_mape, ps.completion_mape,
               wait > 0 ? (double) wait / 1000 : 0.0, ps.inflight,
               ps.reach_us / 1000, ps.reach_per_1k_us / 1000,
               ps.transfer_per_1k_us / 1000, ps.transfer_samples,
               ps.transfer_told_samples, ps.engine_ends, is.blocks,
               is.precise, is.approx, is.evicted);
}


static const char  *ngx_http_omni_agent_modes[] = {
    "unknown", "precise", "approximate"
};

static const char  *ngx_http_omni_agent_health[] = {
    "unknown", "up", "down"
};


/* What the KV-event agent reported about an instance (a copy). */
static u_char *
ngx_http_omni_status_agent(u_char *p, omni_ingest_inst_t *ii,
    uint64_t now_us)
{
    return ngx_sprintf(p,
               ",\"agent\":{\"mode\":\"%s\",\"health\":\"%s\","
               "\"last_update_ms_ago\":%L,\"running\":%uD,"
               "\"waiting\":%uD,\"kv_usage\":%.4f,"
               "\"capacity_tokens\":%uL,\"stores\":%uL,"
               "\"blocks_stored\":%uL,\"removals\":%uL,"
               "\"blocks_removed\":%uL,\"clears\":%uL,"
               "\"orphans\":%uL,\"resyncs\":%uL}",
               ngx_http_omni_agent_modes[ii->mode > 2 ? 0 : ii->mode],
               ngx_http_omni_agent_health[ii->health > 2 ? 0 : ii->health],
               ii->last_update_us
                   ? (int64_t) (now_us - ii->last_update_us) / 1000
                   : (int64_t) -1,
               ii->running, ii->waiting,
               (double) ii->kv_usage_ppm / 1000000, ii->capacity_tokens,
               ii->stores, ii->blocks_stored, ii->removals,
               ii->blocks_removed, ii->clears, ii->orphans, ii->resyncs);
}


/*
 * "config": the effective value of every omni_* http-level directive, keyed
 * by its name without the prefix (durations in ms with a _ms suffix, sizes
 * in bytes).  What the zone runs with comes from the zone: a reload either
 * applies a change or is refused (ngx_http_omni_shm.c), so they agree.
 */
static u_char *
ngx_http_omni_status_config(u_char *p, ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh)
{
    p = ngx_sprintf(p,
            "\"config\":{\"zone_size\":%uz,\"pd_policy\":\"%s\","
            "\"schedule_policy\":\"%s\",\"prefill_queue_order\":\"%s\","
            "\"max_batch_num_token\":%ui,\"prefill_max_num_seqs\":%ui,"
            "\"prefill_step_tokens\":%ui,"
            "\"decode_max_num_seqs\":%ui,"
            "\"prefill_starvation_timeout_ms\":%M,"
            "\"queue_max\":%ui,\"queue_capacity\":%uD,"
            "\"queue_timeout_ms\":%M,\"request_timeout_ms\":%M,"
            "\"passive_health_on\":\"%V\","
            "\"block_size\":%uD,\"index_max_tokens\":%ui,"
            "\"index_instances\":%uD,"
            "\"cache_blocks\":%uD,\"cache_ttl_ms\":%M,"
            "\"decode_max_tokens\":%ui,\"max_model_len\":%ui,"
            "\"engine_tokenize_ns\":%ui,"
            "\"hold_slack_ms\":%M,"
            "\"slo_ttft_ms\":%M,\"slo_tpot_ms\":%M,\"slo_max_ms\":%M,"
            "\"slo_reject\":\"%s\","
            "\"tokenize_timeout_ms\":%M,\"tokenize_timeout_per_kb_ms\":%M,"
            "\"tokenize_max_body\":%uz,\"token_reuse\":\"%s\","
            "\"tokenize_learn_max\":%uz,\"tokenize_max_inflight\":%ui,"
            "\"model_path\":",
            mcf->zone_size, ngx_http_omni_modes[mcf->pd_policy],
            ngx_http_omni_policies[mcf->schedule_policy],
            ngx_http_omni_orders[mcf->queue_order],
            mcf->max_batch_num_token, mcf->prefill_max_num_seqs,
            mcf->prefill_step_tokens,
            mcf->decode_max_num_seqs, mcf->starvation_timeout,
            mcf->queue_max, sh->q_cap, mcf->queue_timeout,
            mcf->request_timeout, &mcf->passive_health_text,
            sh->block_size, mcf->index_max_tokens, sh->index_instances,
            sh->cache_blocks, sh->cache_ttl,
            mcf->decode_max_tokens, mcf->max_model_len,
            mcf->engine_tokenize_ns, mcf->hold_slack,
            mcf->slo_ttft, mcf->slo_tpot, mcf->slo_max,
            mcf->slo_reject ? "on" : "off",
            mcf->tokenize_timeout, mcf->tokenize_timeout_per_kb,
            mcf->tokenize_max_body, mcf->token_reuse ? "auto" : "off",
            mcf->tokenize_learn_max, mcf->tokenize_max_inflight);

    if (mcf->model_path.len) {
        *p++ = '"';
        p = (u_char *) ngx_escape_json(p, mcf->model_path.data,
                                       mcf->model_path.len);
        *p++ = '"';

    } else {
        p = ngx_cpymem(p, "null", 4);
    }

    *p++ = '}';

    return p;
}


/* The prefill queue's order now: its starvation bound, us (0: off; the
 * timeout, or under a backlog the library's share of it,
 * omni_policy_starvation_bound), and the SJF aging its keys are made with
 * (omni_policy_queue_aging, at the backlog they were made at). */
static void
ngx_http_omni_status_order(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, uint64_t *bound_us, double *aging)
{
    omni_queue_opts_t  o;

    ngx_http_omni_queue_opts(mcf, sh, NGX_HTTP_OMNI_Q_PREFILL, &o);
    *bound_us = omni_policy_starvation_bound(&o);

    ngx_http_omni_queue_key_opts(mcf, sh, NGX_HTTP_OMNI_Q_PREFILL, &o);
    *aging = omni_policy_queue_aging(&o);
}


ngx_int_t
ngx_http_omni_status_handler(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    u_char                         *body, *p;
    double                          aging;
    uint64_t                        now_us, bound_us;
    size_t                          size;
    ngx_uint_t                      t, i, first;
    ngx_msec_t                      now;
    ngx_http_omni_inst_t           *in;
    ngx_http_omni_shctx_t          *sh;
    ngx_http_omni_main_conf_t      *mcf;
    ngx_http_omni_upstream_conf_t  *ucf;

    rc = ngx_http_omni_snapshot(r, &mcf, &sh);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_omni_status_order(mcf, sh, &bound_us, &aging);

    now_us = ngx_http_omni_now_us();
    size = 6144 + 256 + 6 * mcf->model_path.len
           + (size_t) sh->n_slots * (1760 + NGX_HTTP_OMNI_ADDR_LEN);

    body = ngx_pnalloc(r->pool, size);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    now = ngx_current_msec;

    p = ngx_sprintf(body,
                    "{\"version\":\"%s\",\"pd_policy\":\"%s\","
                    "\"schedule_policy\":\"%s\",\"worker_pid\":%P,"
                    "\"uptime_s\":%M,\"config_generation\":%uL,"
                    "\"queues\":{\"prefill_waiting\":%uD,"
                    "\"decode_waiting\":%uD,\"held_total\":%uL,"
                    "\"rejected_full\":%uL,\"timed_out\":%uL,"
                    "\"released_by_starvation_timeout\":%uL,"
                    "\"prefill_work_ms\":%uL,\"starvation_bound_ms\":%uL,"
                    "\"rejected_slo\":%uL,"
                    "\"released\":{\"now\":%uL,\"order\":%uL,"
                    "\"starved\":%uL,\"plan\":%uL,\"lost\":%uL}},"
                    "\"scheduler\":{\"decisions\":%uL,"
                    "\"decision_us_mean\":%.1f,"
                    "\"decisions_reused\":%uL,\"queue_rekeys\":%uL,"
                    "\"queue_aging\":%.4f,\"aging_rekeys\":%uL,"
                    "\"held_decisions\":%uL,\"held_finished\":%uL,"
                    "\"held_decisions_max\":%uL,"
                    "\"decode_step_flushes\":%uL,"
                    "\"typical_output_tokens\":[%.1f,%.1f]},"
                    "\"totals\":{\"requests\":%uL,\"inflight_requests\":%uL,"
                    "\"errors\":%uL,\"charges_reaped\":%uL,"
                    "\"legs_cancelled\":%uL},"
                    "\"tokenize\":{\"tokenized\":%uL,\"fallback\":{"
                    "\"down\":%uL,\"timeout\":%uL,\"error\":%uL,"
                    "\"unsupported\":%uL,\"too_large\":%uL,\"busy\":%uL},"
                    "\"inflight\":%ui,"
                    "\"learn\":{\"sent\":%uL,\"dropped\":{"
                    "\"too_large\":%uL,\"busy\":%uL,\"down\":%uL,"
                    "\"error\":%uL}}},"
                    "\"instances\":[",
                    NGX_HTTP_OMNI_VERSION,
                    ngx_http_omni_modes[mcf->pd_policy],
                    ngx_http_omni_policies[mcf->schedule_policy],
                    ngx_pid, (now - sh->started) / 1000, sh->generation,
                    sh->queues[NGX_HTTP_OMNI_Q_PREFILL].n,
                    sh->queues[NGX_HTTP_OMNI_Q_DECODE].n, sh->held_total,
                    sh->rejected_full, sh->timed_out, sh->starved,
                    sh->queues[NGX_HTTP_OMNI_Q_PREFILL].work_us / 1000,
                    bound_us / 1000,
                    sh->rejected_slo,
                    sh->released[NGX_HTTP_OMNI_REL_NOW],
                    sh->released[NGX_HTTP_OMNI_REL_ORDER],
                    sh->released[NGX_HTTP_OMNI_REL_STARVED],
                    sh->released[NGX_HTTP_OMNI_REL_PLAN],
                    sh->released[NGX_HTTP_OMNI_REL_LOST],
                    sh->decisions,
                    sh->decisions ? (double) sh->decision_us / sh->decisions
                                  : 0.0,
                    sh->decisions_reused, sh->rekeys,
                    aging, sh->aging_rekeys,
                    sh->held_decided, sh->held_finished, sh->held_decided_max,
                    sh->decode_step_flushes,
                    sh->output_ewma[NGX_HTTP_OMNI_ROUTE_COMPLETIONS],
                    sh->output_ewma[NGX_HTTP_OMNI_ROUTE_CHAT],
                    sh->requests_total, sh->inflight_requests,
                    sh->errors_total, sh->reaped_total, sh->legs_cancelled,
                    sh->tokenized_total,
                    sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_DOWN],
                    sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_TIMEOUT],
                    sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_ERROR],
                    sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_UNSUPPORTED],
                    sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_TOO_LARGE],
                    sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_BUSY],
                    ngx_http_omni_tokenize_inflight(),
                    sh->learn_sent,
                    sh->learn_dropped[NGX_HTTP_OMNI_LEARN_TOO_LARGE],
                    sh->learn_dropped[NGX_HTTP_OMNI_LEARN_BUSY],
                    sh->learn_dropped[NGX_HTTP_OMNI_LEARN_DOWN],
                    sh->learn_dropped[NGX_HTTP_OMNI_LEARN_ERROR]);

    first = 1;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        ucf = mcf->tiers[t];
        if (ucf == NULL) {
            continue;
        }

        for (i = 0; i < ucf->n; i++) {
            if (ucf->slots[i] >= sh->n_slots) {
                continue;
            }

            in = &sh->inst[ucf->slots[i]];

            if (!first) {
                *p++ = ',';
            }

            first = 0;

            p = ngx_sprintf(p,
                    "{\"role\":\"%s\",\"index\":%ui,\"slot\":%ui,"
                    "\"address\":\"%*s\","
                    "\"bootstrap_port\":%d,"
                    "\"inflight_requests\":%uL,\"inflight_tokens\":%uL,"
                    "\"healthy\":%s,\"fails\":%uD,"
                    "\"requests_total\":%uL,\"errors_total\":%uL,"
                    "\"tokens_total\":%uL,\"last_latency_ms\":%uL,"
                    "\"prefilling\":%uD,\"prefilling_tokens\":%uL,"
                    "\"cache_check\":{\"checked\":%uL,\"missing\":%uL,"
                    "\"unpredicted\":%uL,\"predicted\":%uL},",
                    ngx_http_omni_roles[t], i, ucf->slots[i],
                    (size_t) in->addr_len, in->addr,
                    (int) in->bootstrap_port,
                    in->inflight_requests, in->inflight_tokens,
                    ngx_http_omni_inst_usable(in, now) ? "true" : "false",
                    in->fails, in->requests_total, in->errors_total,
                    in->tokens_total, in->last_latency_ms, in->prefilling,
                    in->prefilling_tokens, in->cache_checked,
                    in->cache_missing, in->cache_unpredicted,
                    in->cache_predicted);

            p = ngx_http_omni_status_model(p, mcf, ucf->slots[i], now_us);
            p = ngx_http_omni_status_agent(p, &sh->ingest[ucf->slots[i]],
                                           now_us);

            *p++ = '}';
        }
    }

    p = ngx_cpymem(p, "],", 2);
    p = ngx_sprintf(p, "\"ingest\":{\"batches\":%uL,\"rejected\":%uL,"
                    "\"records\":%uL,\"unknown_names\":%uL,"
                    "\"last_reject\":\"%s\",\"unauthorized\":%uL,"
                    "\"engine_ends\":%uL},",
                    sh->ingest_stats.batches, sh->ingest_stats.rejected,
                    sh->ingest_stats.records, sh->ingest_stats.unknown_names,
                    omni_ingest_strreason(sh->ingest_stats.last_reason),
                    sh->ingest_unauthorized, sh->ingest_stats.engine_ends);
    p = ngx_http_omni_status_config(p, mcf, sh);
    p = ngx_cpymem(p, "}\n", 2);

    return ngx_http_omni_reply(r, NGX_HTTP_OK, "application/json", body,
                               p - body);
}


ngx_int_t
ngx_http_omni_metrics_handler(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    u_char                         *body, *p;
    size_t                          size;
    double                          aging;
    uint64_t                        cum, now_us, bound_us;
    ngx_uint_t                      t, i, k, m, s;
    ngx_msec_t                      now;
    ngx_http_omni_hist_t           *h;
    ngx_http_omni_inst_t           *in;
    ngx_http_omni_shctx_t          *sh;
    ngx_http_omni_main_conf_t      *mcf;
    ngx_http_omni_upstream_conf_t  *ucf;

    rc = ngx_http_omni_snapshot(r, &mcf, &sh);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_omni_status_order(mcf, sh, &bound_us, &aging);

    size = 32768 + (size_t) sh->n_slots * (1024 + 8 * NGX_HTTP_OMNI_ADDR_LEN);
    /* the KV-event agent's figures */
    size += (size_t) sh->n_slots * (1024 + 12 * NGX_HTTP_OMNI_ADDR_LEN);

    body = ngx_pnalloc(r->pool, size);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    now = ngx_current_msec;
    now_us = ngx_http_omni_now_us();
    p = body;

    p = ngx_sprintf(p,
            "# HELP omni_requests_total Client requests answered, by route, "
            "P/D mode and HTTP status (\"other\" for unlisted codes).\n"
            "# TYPE omni_requests_total counter\n");

    for (k = 0; k < NGX_HTTP_OMNI_ROUTES; k++) {
        for (m = 0; m < NGX_HTTP_OMNI_TIERS + 1; m++) {
            for (s = 0; s < NGX_HTTP_OMNI_STATUSES; s++) {
                if (sh->requests[k][m][s] == 0) {
                    continue;
                }

                p = ngx_sprintf(p, "omni_requests_total{route=\"%s\","
                                "mode=\"%s\",status=\"",
                                ngx_http_omni_routes[k],
                                ngx_http_omni_modes[m]);

                if (s == 0) {
                    p = ngx_cpymem(p, "other", 5);
                } else {
                    p = ngx_sprintf(p, "%ui", ngx_http_omni_status_codes[s]);
                }

                p = ngx_sprintf(p, "\"} %uL\n", sh->requests[k][m][s]);
            }
        }
    }

    p = ngx_sprintf(p,
            "# HELP omni_inflight_requests Client requests in the proxy now.\n"
            "# TYPE omni_inflight_requests gauge\n"
            "omni_inflight_requests %uL\n"
            "# HELP omni_queue_waiting Requests held in the proxy now.\n"
            "# TYPE omni_queue_waiting gauge\n"
            "omni_queue_waiting{queue=\"prefill\"} %uD\n"
            "omni_queue_waiting{queue=\"decode\"} %uD\n"
            "# HELP omni_queue_work_seconds Predicted prefill work of the "
            "held requests.\n"
            "# TYPE omni_queue_work_seconds gauge\n"
            "omni_queue_work_seconds %.3f\n"
            "# HELP omni_starvation_bound_seconds TTFT past which a held "
            "request goes first: the starvation timeout, or more under a "
            "backlog.\n"
            "# TYPE omni_starvation_bound_seconds gauge\n"
            "omni_starvation_bound_seconds %.3f\n"
            "# HELP omni_queue_aging Shortest-first order: work forgiven per "
            "unit waited (less under a backlog).\n"
            "# TYPE omni_queue_aging gauge\n"
            "omni_queue_aging %.4f\n"
            "# HELP omni_queue_rejected_total Requests refused (429) because "
            "the queue was full.\n"
            "# TYPE omni_queue_rejected_total counter\n"
            "omni_queue_rejected_total %uL\n"
            "# HELP omni_queue_timeouts_total Requests that waited past "
            "omni_queue_timeout (503).\n"
            "# TYPE omni_queue_timeouts_total counter\n"
            "omni_queue_timeouts_total %uL\n"
            "# HELP omni_held_total Requests that were held before dispatch."
            "\n# TYPE omni_held_total counter\n"
            "omni_held_total %uL\n"
            "# HELP omni_slo_rejected_total Requests refused early (429): "
            "the queue could meet no SLO.\n"
            "# TYPE omni_slo_rejected_total counter\n"
            "omni_slo_rejected_total %uL\n"
            "# HELP omni_released_total Requests to start, by why they "
            "went when they did.\n"
            "# TYPE omni_released_total counter\n"
            "omni_released_total{reason=\"now\"} %uL\n"
            "omni_released_total{reason=\"order\"} %uL\n"
            "omni_released_total{reason=\"starved\"} %uL\n"
            "omni_released_total{reason=\"plan\"} %uL\n"
            "omni_released_total{reason=\"lost\"} %uL\n"
            "# HELP omni_legs_cancelled_total Legs the proxy cancelled "
            "because the other leg of their request failed.\n"
            "# TYPE omni_legs_cancelled_total counter\n"
            "omni_legs_cancelled_total %uL\n",
            sh->inflight_requests, sh->queues[NGX_HTTP_OMNI_Q_PREFILL].n,
            sh->queues[NGX_HTTP_OMNI_Q_DECODE].n,
            sh->queues[NGX_HTTP_OMNI_Q_PREFILL].work_us / 1e6,
            bound_us / 1e6,
            aging, sh->rejected_full,
            sh->timed_out, sh->held_total, sh->rejected_slo,
            sh->released[NGX_HTTP_OMNI_REL_NOW],
            sh->released[NGX_HTTP_OMNI_REL_ORDER],
            sh->released[NGX_HTTP_OMNI_REL_STARVED],
            sh->released[NGX_HTTP_OMNI_REL_PLAN],
            sh->released[NGX_HTTP_OMNI_REL_LOST], sh->legs_cancelled);

    p = ngx_sprintf(p,
            "# HELP omni_tokenized_total Requests scheduled on the tokenizer "
            "service's ids.\n"
            "# TYPE omni_tokenized_total counter\n"
            "omni_tokenized_total %uL\n"
            "# HELP omni_tokenize_fallback_total Requests scheduled on the "
            "estimate because the tokenizer service could not tokenize them."
            "\n# TYPE omni_tokenize_fallback_total counter\n"
            "omni_tokenize_fallback_total{reason=\"down\"} %uL\n"
            "omni_tokenize_fallback_total{reason=\"timeout\"} %uL\n"
            "omni_tokenize_fallback_total{reason=\"error\"} %uL\n"
            "omni_tokenize_fallback_total{reason=\"unsupported\"} %uL\n"
            "omni_tokenize_fallback_total{reason=\"too_large\"} %uL\n"
            "omni_tokenize_fallback_total{reason=\"busy\"} %uL\n",
            sh->tokenized_total,
            sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_DOWN],
            sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_TIMEOUT],
            sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_ERROR],
            sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_UNSUPPORTED],
            sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_TOO_LARGE],
            sh->tokenize_fallback[NGX_HTTP_OMNI_TOK_BUSY]);

    p = ngx_sprintf(p,
            "# HELP omni_tokenize_learn_sent_total Chat answers sent to the "
            "tokenizer service to learn.\n"
            "# TYPE omni_tokenize_learn_sent_total counter\n"
            "omni_tokenize_learn_sent_total %uL\n"
            "# HELP omni_tokenize_learn_dropped_total Chat answers not sent "
            "to the tokenizer service to learn.\n"
            "# TYPE omni_tokenize_learn_dropped_total counter\n"
            "omni_tokenize_learn_dropped_total{reason=\"too_large\"} %uL\n"
            "omni_tokenize_learn_dropped_total{reason=\"busy\"} %uL\n"
            "omni_tokenize_learn_dropped_total{reason=\"down\"} %uL\n"
            "omni_tokenize_learn_dropped_total{reason=\"error\"} %uL\n",
            sh->learn_sent,
            sh->learn_dropped[NGX_HTTP_OMNI_LEARN_TOO_LARGE],
            sh->learn_dropped[NGX_HTTP_OMNI_LEARN_BUSY],
            sh->learn_dropped[NGX_HTTP_OMNI_LEARN_DOWN],
            sh->learn_dropped[NGX_HTTP_OMNI_LEARN_ERROR]);

    p = ngx_sprintf(p,
            "# HELP omni_decisions_total Policy decisions about requests to "
            "start or place.\n"
            "# TYPE omni_decisions_total counter\n"
            "omni_decisions_total %uL\n"
            "# HELP omni_decisions_reused_total Held requests not decided "
            "again: nothing their decision depends on changed.\n"
            "# TYPE omni_decisions_reused_total counter\n"
            "omni_decisions_reused_total %uL\n"
            "# HELP omni_queue_rekeys_total Times the waiting requests' "
            "predicted work was computed again and some of it had changed.\n"
            "# TYPE omni_queue_rekeys_total counter\n"
            "omni_queue_rekeys_total %uL\n"
            "# HELP omni_held_decisions_total Policy decisions about held "
            "requests, counted when they leave the queue.\n"
            "# TYPE omni_held_decisions_total counter\n"
            "omni_held_decisions_total %uL\n"
            "# HELP omni_held_finished_total Held requests that left the "
            "queue (released, timed out or gone).\n"
            "# TYPE omni_held_finished_total counter\n"
            "omni_held_finished_total %uL\n"
            "# HELP omni_held_decisions_max Most policy decisions about one "
            "held request.\n"
            "# TYPE omni_held_decisions_max gauge\n"
            "omni_held_decisions_max %uL\n",
            sh->decisions, sh->decisions_reused, sh->rekeys,
            sh->held_decided, sh->held_finished, sh->held_decided_max);

#define omni_inst_metric(name, type, help)                                   \
    p = ngx_sprintf(p, "# HELP " name " " help "\n# TYPE " name " " type "\n");\
    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {                             \
        ucf = mcf->tiers[t];                                                 \
        if (ucf == NULL) {                                                   \
            continue;                                                        \
        }                                                                    \
        for (i = 0; i < ucf->n; i++) {                                       \
            if (ucf->slots[i] >= sh->n_slots) {                              \
                continue;                                                    \
            }                                                                \
            in = &sh->inst[ucf->slots[i]];                                   \
            p = ngx_sprintf(p, name "{role=\"%s\",instance=\"%*s\"} %uL\n",  \
                            ngx_http_omni_roles[t], (size_t) in->addr_len,   \
                            in->addr, (uint64_t) (OMNI_VALUE));              \
        }                                                                    \
    }

#define OMNI_VALUE  in->inflight_requests
    omni_inst_metric("omni_instance_inflight_requests", "gauge",
                     "Legs in flight on the instance.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->inflight_tokens
    omni_inst_metric("omni_instance_inflight_tokens", "gauge",
                     "Tokens charged to the instance by legs in flight.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->requests_total
    omni_inst_metric("omni_instance_requests_total", "counter",
                     "Legs sent to the instance.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->errors_total
    omni_inst_metric("omni_instance_errors_total", "counter",
                     "Legs to the instance that failed.")
#undef OMNI_VALUE
#define OMNI_VALUE  ngx_http_omni_inst_usable(in, now)
    omni_inst_metric("omni_instance_healthy", "gauge",
                     "1 when the instance may be chosen.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->cache_missing
    omni_inst_metric("omni_instance_cache_missing_tokens_total", "counter",
                     "Cached tokens the proxy predicted that the engine did "
                     "not report.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->cache_unpredicted
    omni_inst_metric("omni_instance_cache_unpredicted_tokens_total",
                     "counter", "Cached tokens the engine reported that the "
                     "proxy did not predict.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->cache_predicted
    omni_inst_metric("omni_instance_cache_predicted_tokens_total", "counter",
                     "Cached tokens the proxy predicted for the prefill "
                     "answers it checked.")
#undef OMNI_VALUE
#define OMNI_VALUE  in->cache_checked
    omni_inst_metric("omni_instance_cache_checked_total", "counter",
                     "Prefill answers whose cached tokens were compared "
                     "with the prediction.")
#undef OMNI_VALUE
#define OMNI_VALUE  (sh->ingest[in - sh->inst].mode == OMNI_INGEST_PRECISE)
    omni_inst_metric("omni_instance_agent_precise", "gauge",
                     "1 when the index holds the engine's own cache state "
                     "(KV events), 0 when approximate.")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].health
    omni_inst_metric("omni_instance_agent_health", "gauge",
                     "Health the agent's probes report: 0 unknown, 1 up, "
                     "2 down.")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].blocks_stored
    omni_inst_metric("omni_instance_agent_blocks_stored_total", "counter",
                     "Index blocks stored from the engine's KV events.")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].blocks_removed
    omni_inst_metric("omni_instance_agent_blocks_removed_total", "counter",
                     "Index blocks removed by the engine's KV events.")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].clears
    omni_inst_metric("omni_instance_agent_clears_total", "counter",
                     "Instance caches cleared (engine clear, restart or "
                     "resynchronisation).")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].resyncs
    omni_inst_metric("omni_instance_agent_resyncs_total", "counter",
                     "Precise to approximate transitions (lost events or "
                     "a silent agent).")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].running
    omni_inst_metric("omni_instance_engine_running", "gauge",
                     "Requests running on the engine, from its /metrics.")
#undef OMNI_VALUE
#define OMNI_VALUE  sh->ingest[in - sh->inst].waiting
    omni_inst_metric("omni_instance_engine_waiting", "gauge",
                     "Requests waiting in the engine, from its /metrics.")
#undef OMNI_VALUE
#define OMNI_VALUE  (sh->ingest[in - sh->inst].last_update_us                \
                     ? (now_us - sh->ingest[in - sh->inst].last_update_us)   \
                       / 1000 : 0)
    omni_inst_metric("omni_instance_agent_update_age_ms", "gauge",
                     "Milliseconds since the agent last reported the "
                     "instance (0: never).")
#undef OMNI_VALUE
#undef omni_inst_metric

    p = ngx_sprintf(p,
            "# HELP omni_ingest_batches_total Agent batches applied.\n"
            "# TYPE omni_ingest_batches_total counter\n"
            "omni_ingest_batches_total %uL\n"
            "# HELP omni_ingest_rejected_total Agent batches rejected as "
            "malformed.\n"
            "# TYPE omni_ingest_rejected_total counter\n"
            "omni_ingest_rejected_total %uL\n"
            "# HELP omni_ingest_records_total Records of applied agent "
            "batches.\n"
            "# TYPE omni_ingest_records_total counter\n"
            "omni_ingest_records_total %uL\n"
            "# HELP omni_ingest_unauthorized_total Agent batches refused "
            "for a missing or wrong status token.\n"
            "# TYPE omni_ingest_unauthorized_total counter\n"
            "omni_ingest_unauthorized_total %uL\n"
            "# HELP omni_ingest_engine_ends_total Prefill ends the engines' "
            "KV events told, earlier than predicted, before the prefill's "
            "answer.\n"
            "# TYPE omni_ingest_engine_ends_total counter\n"
            "omni_ingest_engine_ends_total %uL\n",
            sh->ingest_stats.batches, sh->ingest_stats.rejected,
            sh->ingest_stats.records, sh->ingest_unauthorized,
            sh->ingest_stats.engine_ends);

    for (k = 0; k < NGX_HTTP_OMNI_HISTS; k++) {
        h = &sh->hists[k];

        p = ngx_sprintf(p, "# HELP %s %s\n# TYPE %s histogram\n",
                        ngx_http_omni_hist_names[k],
                        ngx_http_omni_hist_help[k],
                        ngx_http_omni_hist_names[k]);

        cum = 0;

        for (i = 0; i < NGX_HTTP_OMNI_BUCKETS; i++) {
            cum += h->buckets[i];
            p = ngx_sprintf(p, "%s_bucket{le=\"%.3f\"} %uL\n",
                            ngx_http_omni_hist_names[k],
                            ngx_http_omni_bucket_bounds[i], cum);
        }

        p = ngx_sprintf(p, "%s_bucket{le=\"+Inf\"} %uL\n"
                        "%s_sum %uL.%03uL\n%s_count %uL\n",
                        ngx_http_omni_hist_names[k], h->count,
                        ngx_http_omni_hist_names[k], h->sum_ms / 1000,
                        h->sum_ms % 1000,
                        ngx_http_omni_hist_names[k], h->count);
    }

    return ngx_http_omni_reply(r, NGX_HTTP_OK,
                               "text/plain; version=0.0.4; charset=utf-8",
                               body, p - body);
}


ngx_int_t
ngx_http_omni_health_handler(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    u_char                         *body, *p;
    ngx_uint_t                      t, i, usable[NGX_HTTP_OMNI_TIERS], ok;
    ngx_msec_t                      now;
    ngx_http_omni_shctx_t          *sh;
    ngx_http_omni_main_conf_t      *mcf;
    ngx_http_omni_upstream_conf_t  *ucf;

    rc = ngx_http_omni_snapshot(r, &mcf, &sh);
    if (rc != NGX_OK) {
        return rc;
    }

    now = ngx_current_msec;

    for (t = 0; t < NGX_HTTP_OMNI_TIERS; t++) {
        usable[t] = 0;
        ucf = mcf->tiers[t];

        for (i = 0; ucf && i < ucf->n; i++) {
            if (ucf->slots[i] < sh->n_slots
                && ngx_http_omni_inst_usable(&sh->inst[ucf->slots[i]], now)
                && !ucf->peers[i]->down)
            {
                usable[t]++;
            }
        }
    }

    ok = usable[NGX_HTTP_OMNI_DECODE] > 0
         && (mcf->pd_policy == NGX_HTTP_OMNI_AGGREGATED
             || usable[NGX_HTTP_OMNI_PREFILL] > 0);

    body = ngx_pnalloc(r->pool, 512);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(body,
                    "{\"status\":\"%s\",\"pd_policy\":\"%s\","
                    "\"prefill\":{\"usable\":%ui,\"total\":%ui},"
                    "\"decode\":{\"usable\":%ui,\"total\":%ui}}\n",
                    ok ? "ok" : "unavailable",
                    ngx_http_omni_modes[mcf->pd_policy],
                    usable[NGX_HTTP_OMNI_PREFILL],
                    mcf->tiers[NGX_HTTP_OMNI_PREFILL]
                    ? mcf->tiers[NGX_HTTP_OMNI_PREFILL]->n : 0,
                    usable[NGX_HTTP_OMNI_DECODE],
                    mcf->tiers[NGX_HTTP_OMNI_DECODE]
                    ? mcf->tiers[NGX_HTTP_OMNI_DECODE]->n : 0);

    return ngx_http_omni_reply(r, ok ? NGX_HTTP_OK
                                     : NGX_HTTP_SERVICE_UNAVAILABLE,
                               "application/json", body, p - body);
}
