/*
 * Omni Proxy nginx module: directives, configuration, variables and init.
 * The request flow, legs, balancer, shared state and status pages live in
 * the other ngx_http_omni_*.c files (see ngx_http_omni.h).
 */


#include "ngx_http_omni.h"


static ngx_int_t ngx_http_omni_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_omni_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_omni_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_omni_init_main_conf(ngx_conf_t *cf, void *conf);
static char *ngx_http_omni_passive_health_on(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static void *ngx_http_omni_create_srv_conf(ngx_conf_t *cf);
static char *ngx_http_omni_set_handler(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_omni_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


static ngx_conf_enum_t  ngx_http_omni_token_reuse[] = {
    { ngx_string("off"), 0 },
    { ngx_string("auto"), 1 },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_omni_pd_policies[] = {
    { ngx_string("sequential"), NGX_HTTP_OMNI_SEQUENTIAL },
    { ngx_string("parallel"), NGX_HTTP_OMNI_PARALLEL },
    { ngx_string("aggregated"), NGX_HTTP_OMNI_AGGREGATED },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_omni_schedule_policies[] = {
    { ngx_string("omni"), NGX_HTTP_OMNI_SCHED_OMNI },
    { ngx_string("cache-aware"), NGX_HTTP_OMNI_SCHED_CACHE_AWARE },
    { ngx_string("least-loaded"), NGX_HTTP_OMNI_SCHED_LEAST_LOADED },
    { ngx_string("round-robin"), NGX_HTTP_OMNI_SCHED_ROUND_ROBIN },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_omni_queue_orders[] = {
    { ngx_string("sjf"), NGX_HTTP_OMNI_ORDER_SJF },
    { ngx_string("fcfs"), NGX_HTTP_OMNI_ORDER_FCFS },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_omni_commands[] = {

    { ngx_string("omni_zone_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, zone_size),
      NULL },

    { ngx_string("omni_pd_policy"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, pd_policy),
      &ngx_http_omni_pd_policies },

    { ngx_string("omni_schedule_policy"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, schedule_policy),
      &ngx_http_omni_schedule_policies },

    { ngx_string("omni_prefill_queue_order"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, queue_order),
      &ngx_http_omni_queue_orders },

    { ngx_string("omni_max_batch_num_token"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, max_batch_num_token),
      NULL },

    { ngx_string("omni_prefill_step_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, prefill_step_tokens),
      NULL },

    { ngx_string("omni_prefill_max_num_seqs"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, prefill_max_num_seqs),
      NULL },

    { ngx_string("omni_decode_max_num_seqs"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, decode_max_num_seqs),
      NULL },

    { ngx_string("omni_prefill_starvation_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, starvation_timeout),
      NULL },

    { ngx_string("omni_queue_max"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, queue_max),
      NULL },

    { ngx_string("omni_queue_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, queue_timeout),
      NULL },

    { ngx_string("omni_request_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, request_timeout),
      NULL },

    { ngx_string("omni_passive_health_on"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_omni_passive_health_on,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("omni_model_path"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, model_path),
      NULL },

    { ngx_string("omni_tokenize_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, tokenize_timeout),
      NULL },

    { ngx_string("omni_tokenize_timeout_per_kb"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, tokenize_timeout_per_kb),
      NULL },

    { ngx_string("omni_token_reuse"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, token_reuse),
      &ngx_http_omni_token_reuse },

    { ngx_string("omni_tokenize_max_body"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, tokenize_max_body),
      NULL },

    { ngx_string("omni_tokenize_max_inflight"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, tokenize_max_inflight),
      NULL },

    { ngx_string("omni_tokenize_learn_max"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, tokenize_learn_max),
      NULL },

    { ngx_string("omni_block_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, block_size),
      NULL },

    { ngx_string("omni_index_max_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, index_max_tokens),
      NULL },

    { ngx_string("omni_cache_blocks"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, cache_blocks),
      NULL },

    { ngx_string("omni_cache_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, cache_ttl),
      NULL },

    { ngx_string("omni_max_model_len"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, max_model_len),
      NULL },

    { ngx_string("omni_engine_tokenize_ns"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, engine_tokenize_ns),
      NULL },

    { ngx_string("omni_decode_max_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, decode_max_tokens),
      NULL },

    { ngx_string("omni_hold_slack"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, hold_slack),
      NULL },

    { ngx_string("omni_slo_ttft"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, slo_ttft),
      NULL },

    { ngx_string("omni_slo_tpot"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, slo_tpot),
      NULL },

    { ngx_string("omni_slo_max"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, slo_max),
      NULL },

    { ngx_string("omni_slo_reject"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_omni_main_conf_t, slo_reject),
      NULL },

    { ngx_string("omni_balance"),
      NGX_HTTP_UPS_CONF|NGX_CONF_TAKE1,
      ngx_http_omni_balance,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("omni_bootstrap"),
      NGX_HTTP_UPS_CONF|NGX_CONF_TAKE2,
      ngx_http_omni_bootstrap,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("omni_proxy"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_omni_set_handler,
      0,
      0,
      ngx_http_omni_handler },

    { ngx_string("omni_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_omni_set_handler,
      0,
      0,
      ngx_http_omni_status_handler },

    { ngx_string("omni_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_omni_set_handler,
      0,
      0,
      ngx_http_omni_metrics_handler },

    { ngx_string("omni_health"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_omni_set_handler,
      0,
      0,
      ngx_http_omni_health_handler },

    { ngx_string("omni_ingest"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_omni_set_handler,
      0,
      0,
      ngx_http_omni_ingest_handler },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_omni_module_ctx = {
    ngx_http_omni_add_variables,           /* preconfiguration */
    ngx_http_omni_postconfiguration,       /* postconfiguration */

    ngx_http_omni_create_main_conf,        /* create main configuration */
    ngx_http_omni_init_main_conf,          /* init main configuration */

    ngx_http_omni_create_srv_conf,         /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


ngx_module_t  ngx_http_omni_module = {
    NGX_MODULE_V1,
    &ngx_http_omni_module_ctx,             /* module context */
    ngx_http_omni_commands,                /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_omni_init_module,             /* init module */
    ngx_http_omni_init_process,            /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


#define NGX_HTTP_OMNI_VAR_REQUEST_ID   0
#define NGX_HTTP_OMNI_VAR_PD_MODE      1
#define NGX_HTTP_OMNI_VAR_PREFILL      2
#define NGX_HTTP_OMNI_VAR_DECODE       3
#define NGX_HTTP_OMNI_VAR_PROMPT       4
#define NGX_HTTP_OMNI_VAR_QUEUE_MS     5
#define NGX_HTTP_OMNI_VAR_PREFILL_MS   6
#define NGX_HTTP_OMNI_VAR_TTFT_MS      7
#define NGX_HTTP_OMNI_VAR_TOTAL_MS     8
#define NGX_HTTP_OMNI_VAR_ERROR        9
#define NGX_HTTP_OMNI_VAR_CACHED       10
#define NGX_HTTP_OMNI_VAR_PREFILL_PRED 11
#define NGX_HTTP_OMNI_VAR_RELEASE      12
#define NGX_HTTP_OMNI_VAR_START_US     13
#define NGX_HTTP_OMNI_VAR_PRED_WAIT    14
#define NGX_HTTP_OMNI_VAR_CLIENT_ID    15
#define NGX_HTTP_OMNI_VAR_ENGINE_CACHED 16
#define NGX_HTTP_OMNI_VAR_CONVERSATION 17


static ngx_http_variable_t  ngx_http_omni_vars[] = {

    { ngx_string("omni_request_id"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_REQUEST_ID, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_pd_mode"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_PD_MODE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_prefill_addr"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_PREFILL, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_decode_addr"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_DECODE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_prompt_tokens"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_PROMPT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_queue_ms"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_QUEUE_MS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_prefill_ms"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_PREFILL_MS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_ttft_ms"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_TTFT_MS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_total_ms"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_TOTAL_MS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_error"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_ERROR, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_cached_tokens"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_CACHED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_engine_cached_tokens"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_ENGINE_CACHED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_prefill_pred_ms"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_PREFILL_PRED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_release_reason"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_RELEASE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_start_us"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_START_US, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_prefill_pred_wait_ms"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_PRED_WAIT, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_client_request_id"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_CLIENT_ID, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("omni_conversation"), NULL, ngx_http_omni_variable,
      NGX_HTTP_OMNI_VAR_CONVERSATION, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


/* NGX_HTTP_OMNI_REL_*, as $omni_release_reason and the status counters */
const char  *ngx_http_omni_release_names[] = {
    "", "now", "order", "starved", "plan", "lost"
};


static const char  *ngx_http_omni_mode_names[] = {
    "sequential", "parallel", "aggregated"
};


static ngx_int_t
ngx_http_omni_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_omni_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_omni_postconfiguration(ngx_conf_t *cf)
{
    if (ngx_http_omni_ingest_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_omni_filters_init(cf);
}


static void *
ngx_http_omni_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_omni_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_omni_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     mcf->shm_zone = NULL;
     *     mcf->model_path = { 0, NULL };
     *     mcf->tiers[] = NULL;
     */

    mcf->zone_size = NGX_CONF_UNSET_SIZE;
    mcf->pd_policy = NGX_CONF_UNSET_UINT;
    mcf->schedule_policy = NGX_CONF_UNSET_UINT;
    mcf->queue_order = NGX_CONF_UNSET_UINT;
    mcf->max_batch_num_token = NGX_CONF_UNSET_UINT;
    mcf->prefill_max_num_seqs = NGX_CONF_UNSET_UINT;
    mcf->prefill_step_tokens = NGX_CONF_UNSET_UINT;
    mcf->decode_max_num_seqs = NGX_CONF_UNSET_UINT;
    mcf->starvation_timeout = NGX_CONF_UNSET_MSEC;
    mcf->queue_max = NGX_CONF_UNSET_UINT;
    mcf->queue_timeout = NGX_CONF_UNSET_MSEC;
    mcf->request_timeout = NGX_CONF_UNSET_MSEC;
    mcf->passive_health = NGX_CONF_UNSET_UINT;
    mcf->block_size = NGX_CONF_UNSET_UINT;
    mcf->index_max_tokens = NGX_CONF_UNSET_UINT;
    mcf->cache_blocks = NGX_CONF_UNSET_UINT;
    mcf->cache_ttl = NGX_CONF_UNSET_MSEC;
    mcf->decode_max_tokens = NGX_CONF_UNSET_UINT;
    mcf->max_model_len = NGX_CONF_UNSET_UINT;
    mcf->engine_tokenize_ns = NGX_CONF_UNSET_UINT;
    mcf->hold_slack = NGX_CONF_UNSET_MSEC;
    mcf->slo_ttft = NGX_CONF_UNSET_MSEC;
    mcf->slo_tpot = NGX_CONF_UNSET_MSEC;
    mcf->slo_max = NGX_CONF_UNSET_MSEC;
    mcf->slo_reject = NGX_CONF_UNSET;
    mcf->tokenize_timeout = NGX_CONF_UNSET_MSEC;
    mcf->tokenize_timeout_per_kb = NGX_CONF_UNSET_MSEC;
    mcf->tokenize_max_body = NGX_CONF_UNSET_SIZE;
    mcf->tokenize_max_inflight = NGX_CONF_UNSET_UINT;
    mcf->tokenize_learn_max = NGX_CONF_UNSET_SIZE;
    mcf->token_reuse = NGX_CONF_UNSET_UINT;

    return mcf;
}


static char *
ngx_http_omni_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_omni_main_conf_t  *mcf = conf;

    ngx_conf_init_size_value(mcf->zone_size, 64 * 1024 * 1024);
    ngx_conf_init_uint_value(mcf->pd_policy, NGX_HTTP_OMNI_SEQUENTIAL);
    ngx_conf_init_uint_value(mcf->schedule_policy, NGX_HTTP_OMNI_SCHED_OMNI);
    ngx_conf_init_uint_value(mcf->queue_order, NGX_HTTP_OMNI_ORDER_SJF);
    ngx_conf_init_uint_value(mcf->max_batch_num_token, 16384);
    ngx_conf_init_uint_value(mcf->prefill_max_num_seqs, 16);
    ngx_conf_init_uint_value(mcf->prefill_step_tokens, 8192);
    ngx_conf_init_uint_value(mcf->decode_max_num_seqs, 256);
    ngx_conf_init_msec_value(mcf->starvation_timeout, 5000);
    ngx_conf_init_uint_value(mcf->queue_max, 4096);
    ngx_conf_init_msec_value(mcf->queue_timeout, 600000);
    /* the OpenAI clients' default timeout: conf.py request_timeout */
    ngx_conf_init_msec_value(mcf->request_timeout, 600000);

    if (mcf->passive_health == NGX_CONF_UNSET_UINT) {
        mcf->passive_health = NGX_HTTP_OMNI_PH_ERROR|NGX_HTTP_OMNI_PH_TIMEOUT
                              |NGX_HTTP_OMNI_PH_5XX;
        ngx_str_set(&mcf->passive_health_text, "error,timeout,5xx");
    }
    ngx_conf_init_uint_value(mcf->block_size, 256);
    ngx_conf_init_uint_value(mcf->index_max_tokens, 131072);
    ngx_conf_init_uint_value(mcf->cache_blocks, 0);
    ngx_conf_init_msec_value(mcf->cache_ttl, 600000);
    ngx_conf_init_uint_value(mcf->decode_max_tokens, 0);
    ngx_conf_init_uint_value(mcf->max_model_len, 0);
    ngx_conf_init_uint_value(mcf->engine_tokenize_ns, 4400);
    ngx_conf_init_msec_value(mcf->hold_slack, 20);
    ngx_conf_init_msec_value(mcf->slo_ttft, 0);
    ngx_conf_init_msec_value(mcf->slo_tpot, 0);
    ngx_conf_init_msec_value(mcf->slo_max, 60000);
    ngx_conf_init_value(mcf->slo_reject, 0);
    ngx_conf_init_msec_value(mcf->tokenize_timeout, 50);
    ngx_conf_init_msec_value(mcf->tokenize_timeout_per_kb, 1);
    ngx_conf_init_size_value(mcf->tokenize_max_body, 64 * 1024 * 1024);
    ngx_conf_init_uint_value(mcf->tokenize_max_inflight, 4);
    ngx_conf_init_size_value(mcf->tokenize_learn_max, 64 * 1024);
    ngx_conf_init_uint_value(mcf->token_reuse, 1);

    if (mcf->tokenize_learn_max > 1024 * 1024 - 16) {
        /* one datagram each; the service reads up to 1 MB */
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_tokenize_learn_max\" must be at most "
                           "1048560 (1 MB less the datagram's header)");
        return NGX_CONF_ERROR;
    }

    if (mcf->engine_tokenize_ns > 1000000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_engine_tokenize_ns\" must be at most "
                           "1000000");
        return NGX_CONF_ERROR;
    }

    if (mcf->prefill_step_tokens > 16777216) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_prefill_step_tokens\" must be at most "
                           "16777216");
        return NGX_CONF_ERROR;
    }

    if (mcf->block_size == 0 || mcf->block_size > OMNI_HASH_MAX_BLOCK_SIZE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_block_size\" must be between 1 and %d",
                           OMNI_HASH_MAX_BLOCK_SIZE);
        return NGX_CONF_ERROR;
    }

    if (mcf->queue_max == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_queue_max\" must be at least 1");
        return NGX_CONF_ERROR;
    }

    if (mcf->zone_size < sizeof(ngx_http_omni_shctx_t) + 64 * 1024)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_zone_size\" must be at least %uzk",
                           (sizeof(ngx_http_omni_shctx_t) + 64 * 1024)
                           / 1024 + 1);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_omni_shm_add(cf, mcf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_omni_create_srv_conf(ngx_conf_t *cf)
{
    ngx_http_omni_upstream_conf_t  *ucf;

    ucf = ngx_pcalloc(cf->pool, sizeof(ngx_http_omni_upstream_conf_t));
    if (ucf == NULL) {
        return NULL;
    }

    ucf->role = NGX_CONF_UNSET_UINT;

    return ucf;
}


static char *
ngx_http_omni_set_handler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler != NULL) {
        return "is duplicate or conflicts with another content handler";
    }

    clcf->handler = (ngx_http_handler_pt) cmd->post;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_omni_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
    uintptr_t data)
{
    u_char               *p;
    ngx_str_t            *conv;
    ngx_msec_t            from, to;
    ngx_http_omni_ctx_t  *ctx;
    ngx_http_omni_leg_t  *leg;

    ctx = ngx_http_omni_get_ctx(r);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    switch (data) {

    case NGX_HTTP_OMNI_VAR_REQUEST_ID:
        v->data = ctx->request_id;
        v->len = ctx->request_id_len;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_CLIENT_ID:
        v->data = ctx->client_id;
        v->len = ctx->client_id_len;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_CONVERSATION:
        conv = ngx_http_omni_tokenize_conversation(ctx);
        v->data = conv->data;
        v->len = conv->len;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_PD_MODE:
        v->data = (u_char *) ngx_http_omni_mode_names[ctx->mode];
        v->len = ngx_strlen(v->data);
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_PREFILL:
    case NGX_HTTP_OMNI_VAR_DECODE:
        leg = &ctx->legs[data == NGX_HTTP_OMNI_VAR_PREFILL
                         ? NGX_HTTP_OMNI_PREFILL : NGX_HTTP_OMNI_DECODE];

        if (leg->state == NGX_HTTP_OMNI_LEG_NONE
            || ctx->mcf->tiers[leg->tier] == NULL
            || leg->index >= ctx->mcf->tiers[leg->tier]->n)
        {
            break;
        }

        v->data = ctx->mcf->tiers[leg->tier]->peers[leg->index]->name.data;
        v->len = ctx->mcf->tiers[leg->tier]->peers[leg->index]->name.len;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_PROMPT:
    case NGX_HTTP_OMNI_VAR_CACHED:
        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%uL", data == NGX_HTTP_OMNI_VAR_PROMPT
                                       ? ctx->prompt_tokens
                                       : ctx->cached_tokens)
                 - p;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_PRED_WAIT:
    case NGX_HTTP_OMNI_VAR_PREFILL_PRED:
        /* the predictor's completion estimate for this request's prefill,
         * or its wait before the prefill's first step, at release */
        leg = &ctx->legs[ctx->mode == NGX_HTTP_OMNI_AGGREGATED
                         ? NGX_HTTP_OMNI_DECODE : NGX_HTTP_OMNI_PREFILL];

        if (leg->predicted_us == 0) {
            break;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN + 4);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%uL",
                             (data == NGX_HTTP_OMNI_VAR_PRED_WAIT
                              ? leg->predicted_wait_us
                              : leg->predicted_us) / 1000)
                 - p;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_RELEASE:
        if (ctx->release_reason == NGX_HTTP_OMNI_REL_NONE
            || ctx->release_reason >= NGX_HTTP_OMNI_RELEASE_REASONS)
        {
            break;
        }

        v->data = (u_char *) ngx_http_omni_release_names[ctx->release_reason];
        v->len = ngx_strlen(v->data);
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_START_US:
        /* arrival, Unix microseconds (nginx's request start time) */
        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%uL", (uint64_t) r->start_sec * 1000000
                                       + (uint64_t) r->start_msec * 1000)
                 - p;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_ENGINE_CACHED:
        if (ctx->engine_cached < 0) {
            break;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%L", ctx->engine_cached) - p;
        return NGX_OK;

    case NGX_HTTP_OMNI_VAR_ERROR:
        if (ctx->error == NULL) {
            break;
        }

        v->data = (u_char *) ctx->error;
        v->len = ngx_strlen(ctx->error);
        return NGX_OK;

    default:
        switch (data) {
        case NGX_HTTP_OMNI_VAR_QUEUE_MS:
            from = ctx->t_start;
            to = ctx->t_released;
            break;
        case NGX_HTTP_OMNI_VAR_PREFILL_MS:
            from = ctx->legs[NGX_HTTP_OMNI_PREFILL].dispatched;
            to = ctx->legs[NGX_HTTP_OMNI_PREFILL].finished;
            break;
        case NGX_HTTP_OMNI_VAR_TTFT_MS:
            from = ctx->t_start;
            to = ctx->t_first_byte;
            break;
        default: /* NGX_HTTP_OMNI_VAR_TOTAL_MS */
            from = ctx->t_start;
            to = ctx->t_end ? ctx->t_end : ngx_current_msec;
            break;
        }

        if (from == 0 || to == 0 || to < from) {
            break;
        }

        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%M", to - from) - p;
        return NGX_OK;
    }

    v->data = (u_char *) "-";
    v->len = 1;

    return NGX_OK;
}


/* omni_passive_health_on error,timeout,5xx | none */
static char *
ngx_http_omni_passive_health_on(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_omni_main_conf_t  *mcf = conf;

    u_char      *p, *last, *comma;
    size_t       len;
    ngx_str_t   *value;
    ngx_uint_t   mask;

    if (mcf->passive_health != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;
    mask = 0;

    if (ngx_strcmp(value[1].data, "none") != 0) {
        p = value[1].data;
        last = p + value[1].len;

        while (p < last) {
            comma = ngx_strlchr(p, last, ',');
            len = (comma ? comma : last) - p;

            if (len == 5 && ngx_strncmp(p, "error", 5) == 0) {
                mask |= NGX_HTTP_OMNI_PH_ERROR;

            } else if (len == 7 && ngx_strncmp(p, "timeout", 7) == 0) {
                mask |= NGX_HTTP_OMNI_PH_TIMEOUT;

            } else if (len == 3 && ngx_strncmp(p, "5xx", 3) == 0) {
                mask |= NGX_HTTP_OMNI_PH_5XX;

            } else {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid value \"%V\" in \"%V\": a "
                                   "comma-separated list of error, timeout "
                                   "and 5xx, or none", &value[1],
                                   &cmd->name);
                return NGX_CONF_ERROR;
            }

            p += len + 1;
        }
    }

    mcf->passive_health = mask;
    mcf->passive_health_text = value[1];

    return NGX_CONF_OK;
}
