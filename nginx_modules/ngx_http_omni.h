/*
 * Omni Proxy nginx module: types shared by the module's files.
 *
 * Files, lowest layer first; a file calls only files above it in this list
 * (tests/test_module_seams.py checks it on the built objects):
 *
 *   ngx_http_omni_zone.c      the shared zone: creation, what a reload may
 *                             change, instance slots, metrics, the clock,
 *                             the workers' wake-up eventfds (module init)
 *   ngx_http_omni_ledger.c    the load ledger: the one charge and release of
 *                             a leg (load, predictor job, prefilling), their
 *                             owners, what a dead process held
 *   ngx_http_omni_queue.c     the holding queues as a data structure
 *   ngx_http_omni_sched.c     the decisions: instance choice, binding
 *   ngx_http_omni_order.c     the queue order: keys, the library's queue
 *                             options, keys made again, the next to release
 *   ngx_http_omni_slo.c       SLO-aware release: the next held request with
 *                             deadlines, the early 429, Retry-After
 *   ngx_http_omni_hold.c      holding and waking: the release loop, wake-ups,
 *                             timers, process init and crash recovery
 *   ngx_http_omni_feed.c      observations fed to the predictor
 *   ngx_http_omni_learn.c     a chat answer's text captured as it streams
 *                             and sent to the tokenizer (answer learning)
 *   ngx_http_omni_answer.c    what the client gets when the proxy answers
 *                             (errors, SSE error events, prefill answers)
 *   ngx_http_omni_request.c   what the client sent (body, validation)
 *   ngx_http_omni_legs.c      prefill/decode legs as subrequests through
 *                             nginx's proxy module, and their filters
 *   ngx_http_omni_upstream.c  the upstream balancer (omni_balance)
 *   ngx_http_omni_deadline.c  the request's deadline: out of the queue,
 *                             legs cancelled, 504 or an SSE error event
 *   ngx_http_omni_tokenize.c  the tokenizer service's subrequest: ids for
 *                             the prompt, or a counted fallback
 *   ngx_http_omni_flow.c      the request flow of /v1/completions and
 *                             /v1/chat/completions: the only one that
 *                             decides what a client is answered
 *   ngx_http_omni_status.c    /omni/status, /metrics, /health
 *   ngx_http_omni_ingest.c    the KV-event agent's batches (omni_ingest),
 *                             its TTL and the health it reports
 *   ngx_http_omni_module.c    directives, configuration, variables, init
 *
 * ngx_http_omni_access_module.c is a module of its own in the same .so (the
 * front door's methods, API key and status token checks, access phase); it
 * calls none of the files above and none of them calls it.
 */

#ifndef NGX_HTTP_OMNI_H_INCLUDED_
#define NGX_HTTP_OMNI_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "omni_common.h"
#include "omni_json.h"
#include "omni_hash.h"
#include "omni_index.h"
#include "omni_predict.h"
#include "omni_policy.h"
#include "omni_ingest.h"


#define NGX_HTTP_OMNI_VERSION        "0.1.0"

#define NGX_HTTP_OMNI_PREFILL        0
#define NGX_HTTP_OMNI_DECODE         1
#define NGX_HTTP_OMNI_TIERS          2

#define NGX_HTTP_OMNI_SEQUENTIAL     0
#define NGX_HTTP_OMNI_PARALLEL       1
#define NGX_HTTP_OMNI_AGGREGATED     2

#define NGX_HTTP_OMNI_SCHED_OMNI          0
#define NGX_HTTP_OMNI_SCHED_CACHE_AWARE   1
#define NGX_HTTP_OMNI_SCHED_LEAST_LOADED  2
#define NGX_HTTP_OMNI_SCHED_ROUND_ROBIN   3

#define NGX_HTTP_OMNI_ORDER_SJF      0
#define NGX_HTTP_OMNI_ORDER_FCFS     1

#define NGX_HTTP_OMNI_ROUTE_COMPLETIONS  0
#define NGX_HTTP_OMNI_ROUTE_CHAT         1
#define NGX_HTTP_OMNI_ROUTE_OTHER        2
#define NGX_HTTP_OMNI_ROUTES             3

/* instance slots in the shared zone, all tiers together */
#define NGX_HTTP_OMNI_MAX_SLOTS      1024
#define NGX_HTTP_OMNI_ADDR_LEN       64

/* the internal locations the legs are sent to (see templates/) */
#define NGX_HTTP_OMNI_PREFILL_PREFIX "/_omni/prefill"
#define NGX_HTTP_OMNI_DECODE_PREFIX  "/_omni/decode"

#define NGX_HTTP_OMNI_TOKENIZE_PREFIX "/_omni/tokenize"

/* why a request was scheduled on the estimate (docs/tokenizer.md) */
#define NGX_HTTP_OMNI_TOK_DOWN         0
#define NGX_HTTP_OMNI_TOK_TIMEOUT      1
#define NGX_HTTP_OMNI_TOK_ERROR        2
#define NGX_HTTP_OMNI_TOK_UNSUPPORTED  3
#define NGX_HTTP_OMNI_TOK_TOO_LARGE    4
#define NGX_HTTP_OMNI_TOK_BUSY         5    /* omni_tokenize_max_inflight */
#define NGX_HTTP_OMNI_TOK_REASONS      6

/* why an answer was not sent to the tokenizer to learn */
#define NGX_HTTP_OMNI_LEARN_TOO_LARGE  0    /* over omni_tokenize_learn_max */
#define NGX_HTTP_OMNI_LEARN_BUSY       1    /* the send would block */
#define NGX_HTTP_OMNI_LEARN_DOWN       2    /* no socket, nobody reads it */
#define NGX_HTTP_OMNI_LEARN_ERROR      3    /* unreadable answer, other */
#define NGX_HTTP_OMNI_LEARN_REASONS    4

#define NGX_HTTP_OMNI_REQUEST_ID_LEN 64
/* the longest X-Omni-Request-Timeout a client may send (ms, one day) */
#define NGX_HTTP_OMNI_TIMEOUT_HEADER_MAX  86400000

/* top-level members of a body scanned at first; more: scanned again */
#define NGX_HTTP_OMNI_MEMBERS        32

/* metrics: latency histogram buckets (seconds, upper bounds) */
#define NGX_HTTP_OMNI_BUCKETS        16

#define NGX_HTTP_OMNI_HIST_PREFILL   0   /* prefill leg duration */
#define NGX_HTTP_OMNI_HIST_TTFT      1   /* client: arrival to first byte */
#define NGX_HTTP_OMNI_HIST_TOTAL     2   /* client: arrival to last byte */
#define NGX_HTTP_OMNI_HIST_QUEUE     3   /* time held before dispatch */
#define NGX_HTTP_OMNI_HISTS          4

/* response status classes counted per route and mode */
#define NGX_HTTP_OMNI_STATUSES       12

/* the two holding queues */
#define NGX_HTTP_OMNI_Q_PREFILL      0   /* all modes: waiting for a start */
#define NGX_HTTP_OMNI_Q_DECODE       1   /* sequential: prefill done */
#define NGX_HTTP_OMNI_QUEUES         2

/*
 * A waiting request's predicted work (its key in the prefill queue) is
 * computed again at most this often: it changes while it waits, as the
 * predictor learns and as requests sharing its prefix are sent
 * (ngx_http_omni_queue_rekey_locked, ngx_http_omni_order.c)
 */
#define NGX_HTTP_OMNI_REKEY_US       10000
/* most entries ngx_http_omni_queue_firsts_locked() returns: the look ahead
 * of a release pass */
#define NGX_HTTP_OMNI_FIRSTS_MAX     OMNI_POLICY_LOOKAHEAD

#define NGX_HTTP_OMNI_NONE           ((uint32_t) -1)

/* a silent KV-event agent: its instances' reports count this long */
#define NGX_HTTP_OMNI_INGEST_TTL_US  5000000

/* most worker processes a config may have (one wake-up eventfd each) */
#define NGX_HTTP_OMNI_MAX_WORKERS    256


typedef struct ngx_http_omni_main_conf_s  ngx_http_omni_main_conf_t;


/* One `omni_bootstrap ADDR PORT;` line. */
typedef struct {
    ngx_str_t                      addr;
    in_port_t                      port;
} ngx_http_omni_bootstrap_t;


/* Per upstream{} block that has `omni_balance`. */
typedef struct {
    ngx_uint_t                     role;        /* NGX_CONF_UNSET_UINT: off */
    ngx_array_t                   *bootstrap;   /* ngx_http_omni_bootstrap_t */
    ngx_http_upstream_srv_conf_t  *upstream;
    ngx_http_omni_main_conf_t     *mcf;

    /* instance i of this tier: filled when the upstream is initialised */
    ngx_uint_t                     n;
    ngx_http_upstream_rr_peer_t  **peers;
    in_port_t                     *bootstrap_ports;
    /* instance i -> slot in the shared zone: filled by the zone's init */
    ngx_uint_t                    *slots;
} ngx_http_omni_upstream_conf_t;


struct ngx_http_omni_main_conf_s {
    ngx_shm_zone_t                *shm_zone;
    size_t                         zone_size;

    ngx_uint_t                     pd_policy;
    ngx_uint_t                     schedule_policy;
    ngx_uint_t                     queue_order;

    ngx_uint_t                     max_batch_num_token;
    ngx_uint_t                     prefill_max_num_seqs;
    ngx_uint_t                     prefill_step_tokens;
    ngx_uint_t                     decode_max_num_seqs;
    ngx_msec_t                     starvation_timeout;
    ngx_uint_t                     queue_max;
    ngx_msec_t                     queue_timeout;
    ngx_msec_t                     request_timeout;  /* 0: none */
    /* which failed tries count against an instance (NGX_HTTP_OMNI_PH_*) */
    ngx_uint_t                     passive_health;
    ngx_str_t                      passive_health_text;
    ngx_str_t                      model_path;
    ngx_uint_t                     block_size;      /* tokens per block */
    ngx_uint_t                     index_max_tokens; /* prompt prefix indexed */
    ngx_uint_t                     cache_blocks;    /* per instance */
    ngx_msec_t                     cache_ttl;
    ngx_uint_t                     decode_max_tokens;
    ngx_uint_t                     max_model_len;   /* 0: not checked */
    ngx_uint_t                     engine_tokenize_ns; /* per text token */
    ngx_msec_t                     hold_slack;
    ngx_msec_t                     slo_ttft;        /* 0: none */
    ngx_msec_t                     slo_tpot;        /* 0: none */
    ngx_msec_t                     slo_max;         /* header SLO cap */
    ngx_flag_t                     slo_reject;      /* the early 429 */
    ngx_msec_t                     tokenize_timeout;
    ngx_msec_t                     tokenize_timeout_per_kb;
    size_t                         tokenize_max_body;
    ngx_uint_t                     tokenize_max_inflight; /* a worker's;
                                                             0: no limit */
    ngx_uint_t                     token_reuse;     /* auto: 1, off: 0 */
    size_t                         tokenize_learn_max; /* 0: no learning */

    ngx_http_omni_upstream_conf_t *tiers[NGX_HTTP_OMNI_TIERS];

    /* wake-up eventfd of each worker of this configuration */
    ngx_fd_t                      *wake_fds;
    ngx_uint_t                     n_wake_fds;
};


/* An instance as all workers see it, in the shared zone. */
typedef struct {
    u_char                         addr[NGX_HTTP_OMNI_ADDR_LEN];
    uint16_t                       addr_len;
    uint8_t                        role;
    uint8_t                        used;        /* slot holds an instance */
    uint8_t                        configured;  /* in the running config */
    in_port_t                      bootstrap_port;

    uint32_t                       max_fails;
    ngx_msec_t                     fail_timeout;
    uint32_t                       fails;       /* consecutive failures */
    ngx_msec_t                     down_until;  /* unusable until then */

    uint64_t                       inflight_requests;
    uint64_t                       inflight_tokens;

    uint64_t                       requests_total;
    uint64_t                       errors_total;
    uint64_t                       tokens_total;
    uint64_t                       last_latency_ms;
    ngx_msec_t                     last_seen;
    /* held requests: the predicted start, completion and service time of
     * the prefill bound here last */
    uint64_t                       last_start_us;
    uint64_t                       last_done_us;
    uint64_t                       last_service_us;

    /* aggregated mode: legs whose first byte has not come (prefilling) */
    uint32_t                       prefilling;
    uint64_t                       prefilling_tokens;

    /* the KV-event agent reports it down (ngx_http_omni_ingest.c) */
    uint8_t                        agent_down;

    /* predictions checked against the engine's cached tokens (feed.c) */
    uint64_t                       cache_checked;     /* prefills compared */
    uint64_t                       cache_missing;     /* predicted, not found */
    uint64_t                       cache_unpredicted; /* found, not predicted */
    uint64_t                       cache_predicted;   /* predicted, in all */
} ngx_http_omni_inst_t;


/*
 * What a leg is charged with: its load on one instance and, for the leg that
 * carries a request's prefill, the predictor's job and the `prefilling`
 * count.  The ledger (ngx_http_omni_ledger.c) adds and removes all of it
 * together, so it always follows the instance the leg actually uses.
 */
#define NGX_HTTP_OMNI_CHARGE_JOB         0x01  /* a predictor job */
#define NGX_HTTP_OMNI_CHARGE_PREFILLING  0x02  /* counted in prefilling */

typedef struct {
    uint64_t                       tokens;      /* inflight_tokens */
    uint32_t                       uncached;    /* prefill: new tokens */
    uint32_t                       cached;      /*   and cached ones */
    uint32_t                       flags;       /* what to charge */
    uint64_t                       end_hash;    /* JOB: the block the engine
                                                   stores last for it, whose
                                                   KV event tells its end;
                                                   0: none */
} ngx_http_omni_spec_t;


/* One charge in the zone: a worker that dies leaves it where the next
 * process finds it (its owner's list). */
typedef struct {
    ngx_queue_t                    link;        /* in the owner's list */
    ngx_pid_t                      pid;         /* owner */
    uint32_t                       slot;
    uint32_t                       flags;       /* still held: JOB, ... */
    ngx_http_omni_spec_t           spec;
    omni_predict_job_t             job;
} ngx_http_omni_charge_t;


/* A process that may hold charges and requests in flight. */
#define NGX_HTTP_OMNI_OWNERS         (2 * NGX_HTTP_OMNI_MAX_WORKERS)

typedef struct {
    ngx_pid_t                      pid;         /* 0: free */
    uint64_t                       requests;    /* main requests in flight */
    ngx_queue_t                    charges;
} ngx_http_omni_owner_t;


/* A request held in the proxy, in the shared zone. */
/* why a request to start went when it did ($omni_release_reason) */
#define NGX_HTTP_OMNI_REL_NONE       0
#define NGX_HTTP_OMNI_REL_NOW        1      /* not held: free instance */
#define NGX_HTTP_OMNI_REL_ORDER      2      /* the queue order */
#define NGX_HTTP_OMNI_REL_STARVED    3      /* the starvation timeout */
#define NGX_HTTP_OMNI_REL_PLAN       4      /* SLO: a deadline at risk */
#define NGX_HTTP_OMNI_REL_LOST       5      /* SLO: nothing can make it */
#define NGX_HTTP_OMNI_RELEASE_REASONS 6

#define NGX_HTTP_OMNI_QE_FREE        0
#define NGX_HTTP_OMNI_QE_WAITING     1
#define NGX_HTTP_OMNI_QE_RELEASED    2

typedef struct {
    uint8_t                        state;
    uint8_t                        queue;
    uint8_t                        route;
    uint8_t                        rejected;    /* released with no instance:
                                                   a tier has none usable */
    uint8_t                        mode;        /* owner's P/D policy */
    uint32_t                       worker;      /* owner's ngx_worker */
    ngx_pid_t                      pid;         /* owner */
    uint64_t                       generation;  /* owner's config load */
    uint64_t                       seq;         /* = the owner's ctx->qseq */
    void                          *ctx;         /* owner's pointer: only the
                                                   owner may use it */
    ngx_msec_t                     arrival;
    double                         key;         /* smaller leaves first */
    uint64_t                       work_us;     /* prefill: predicted work */
    uint64_t                       starve_us;   /* the part of it the
                                                   starvation rule counts
                                                   (omni_policy_queue_
                                                   work) */
    uint32_t                       heap_pos;
    uint32_t                       prev;        /* arrival order */
    uint32_t                       next;        /*   (free list: next) */
    uint32_t                       n_hashes;
    uint64_t                      *hashes;      /* slab copy, or NULL */
    uint64_t                       prompt_tokens;
    uint64_t                       output_tokens;
    uint32_t                       front_us;    /* the engine's tokenizing
                                                   of a text prompt */

    /* set when released: the binding, per tier (charged to the owner) */
    uint32_t                       slot[NGX_HTTP_OMNI_TIERS];
    ngx_http_omni_charge_t        *charge[NGX_HTTP_OMNI_TIERS];
    uint32_t                       cached_tokens;
    ngx_msec_t                     released;

    /* SLO: TTFT deadline (arrival * 1000 + its SLO, us; 0: none), TPOT */
    uint64_t                       deadline_us;
    uint64_t                       tpot_us;
    uint8_t                        reason;      /* NGX_HTTP_OMNI_REL_* */
    uint8_t                        dec_starved[2];  /* reason was STARVED */

    /* its last decision per `force` (0, 1), kept while nothing it depends
     * on changed (sched_epoch + 1; 0: none), ngx_http_omni_hold.c */
    uint64_t                       dec_epoch[2];
    uint64_t                       dec_until_us[2];
    uint64_t                       dec_retry_at_us[2];
    double                         dec_gap[2];
    uint32_t                       dec_waiting[2];
    ngx_int_t                      dec_rc[2];
    uint32_t                       decided;     /* policy decisions made */
} ngx_http_omni_qentry_t;


typedef struct {
    uint32_t                       n;           /* waiting */
    uint32_t                       head;        /* oldest */
    uint32_t                       tail;
    uint32_t                      *heap;        /* entry numbers */
    uint32_t                       n_slo;       /* entries with a deadline */
    uint64_t                       work_us;     /* sum of entries' work_us */
    uint64_t                       key_backlog_us;  /* SJF: the backlog the
                                                   keys' aging was made at
                                                   (omni_policy_queue_aging) */
} ngx_http_omni_queue_t;


typedef struct {
    uint64_t                       buckets[NGX_HTTP_OMNI_BUCKETS];
    uint64_t                       count;
    uint64_t                       sum_ms;
} ngx_http_omni_hist_t;


/*
 * The entries another worker released for one worker, so that its wake-up
 * posts exactly those (ngx_http_omni_queue.c); more than fit: `overflow`,
 * the worker looks at all it holds.
 */
#define NGX_HTTP_OMNI_WAKE_RING      16

typedef struct {
    uint32_t                       n;
    uint32_t                       overflow;
    uint32_t                       entry[NGX_HTTP_OMNI_WAKE_RING];
    uint32_t                       seq[NGX_HTTP_OMNI_WAKE_RING]; /* low bits */
} ngx_http_omni_wake_t;


typedef struct {
    uint32_t                       n_slots;     /* highest used slot + 1 */
    uint32_t                       rr[NGX_HTTP_OMNI_TIERS];
    ngx_msec_t                     started;
    uint64_t                       generation;  /* config loads seen */

    uint64_t                       requests_total;
    uint64_t                       inflight_requests;
    uint64_t                       errors_total;
    uint64_t                       held_total;

    uint64_t                       requests[NGX_HTTP_OMNI_ROUTES]
                                       [NGX_HTTP_OMNI_TIERS + 1]
                                       [NGX_HTTP_OMNI_STATUSES];
    ngx_http_omni_hist_t           hists[NGX_HTTP_OMNI_HISTS];

    /* holding: two queues over one pool of entries */
    uint32_t                       q_cap;
    uint32_t                       q_free;      /* free list head */
    uint64_t                       q_seq;
    ngx_http_omni_qentry_t        *entries;
    ngx_http_omni_queue_t          queues[NGX_HTTP_OMNI_QUEUES];
    uint64_t                       rejected_full;
    uint64_t                       timed_out;
    uint64_t                       starved;     /* released by the timeout */
    uint64_t                       released[NGX_HTTP_OMNI_RELEASE_REASONS];
    uint64_t                       rejected_slo; /* early 429 */
    uint64_t                       hash_copy_failed;
    uint64_t                       reaped_total; /* charges of dead
                                                    processes given back */
    uint64_t                       legs_cancelled; /* legs ended by us */

    /* the scheduler's brain (scoring library), addressed by slot */
    omni_index_t                  *index;
    omni_predict_t                *predict;
    /* what the zone was built with (a reload must agree or apply it) */
    uint32_t                       block_size;
    uint32_t                       index_instances;
    uint32_t                       index_entries;
    uint32_t                       cache_blocks;    /* 0: as many as fit */
    uint32_t                       pd_policy;
    ngx_msec_t                     cache_ttl;
    uint64_t                       decisions;
    uint64_t                       decision_us; /* time spent deciding */
    /* bumped by whatever may change a held request's decision: an
     * instance's load or health, the predictor, the queue's head */
    uint64_t                       sched_epoch;
    /* when the prefill queue's keys were last recomputed (us) */
    uint64_t                       rekey_us;
    uint64_t                       rekeys;      /* ... with a key changed */
    uint64_t                       aging_rekeys; /* ... as the SJF aging
                                                   moved (queue_rekey) */
    uint64_t                       decode_step_flushes; /* the zone
                                                   lock taken for decode
                                                   step samples (feed.c) */
    uint64_t                       decisions_reused; /* not re-decided */
    uint64_t                       held_decided;    /* decisions of held */
    uint64_t                       held_finished;   /*   requests, ended */
    uint64_t                       held_decided_max; /* most for one */
    double                         output_ewma[NGX_HTTP_OMNI_ROUTES];
    omni_arrivals_t                arrivals;    /* of requests to start */
    uint64_t                       tokenized_total;
    uint64_t                       tokenize_fallback[NGX_HTTP_OMNI_TOK_REASONS];
    uint64_t                       learn_sent;  /* answers to the tokenizer */
    uint64_t                       learn_dropped[NGX_HTTP_OMNI_LEARN_REASONS];
    omni_ingest_stats_t            ingest_stats; /* the agent's batches */
    uint64_t                       ingest_unauthorized; /* 401, no token */

    ngx_http_omni_inst_t           inst[NGX_HTTP_OMNI_MAX_SLOTS];

    /* after inst[]: not part of the status pages' copy */
    ngx_http_omni_owner_t          owners[NGX_HTTP_OMNI_OWNERS];

    /* what the KV-event agent reported, by slot (omni_ingest_apply) */
    omni_ingest_inst_t             ingest[NGX_HTTP_OMNI_MAX_SLOTS];

    /* per worker: its entries released by others since it last woke */
    ngx_http_omni_wake_t           wake[NGX_HTTP_OMNI_MAX_WORKERS];
} ngx_http_omni_shctx_t;


/* Where a leg stands in its accounting: its charge is added when it is
 * bound (reserved) and removed exactly once through the ledger, by the
 * balancer's free or, when no upstream holds it, by the request's cleanup;
 * a retry to another instance charges that instance anew. */
#define NGX_HTTP_OMNI_LEG_NONE       0
#define NGX_HTTP_OMNI_LEG_RESERVED   1
#define NGX_HTTP_OMNI_LEG_ACTIVE     2
#define NGX_HTTP_OMNI_LEG_DONE       3


typedef struct {
    ngx_uint_t                     state;
    ngx_uint_t                     tier;
    ngx_uint_t                     index;       /* instance in the tier */
    ngx_uint_t                     slot;        /* instance in the zone */
    uint64_t                       tokens;      /* load it was charged */
    ngx_http_omni_charge_t        *charge;      /* NULL: none held */
    ngx_http_omni_spec_t           spec;        /* what it is charged */
    ngx_msec_t                     dispatched;
    ngx_msec_t                     finished;

    ngx_http_request_t            *sr;
    ngx_int_t                      status;      /* upstream HTTP status */
    ngx_int_t                      rc;          /* subrequest's final rc */
    ngx_buf_t                     *response;    /* in-memory response */
    ngx_str_t                      content_type;

    unsigned                       started:1;   /* subrequest created */
    unsigned                       header:1;    /* response header seen */
    unsigned                       complete:1;  /* upstream said it ended */
    unsigned                       done:1;      /* subrequest finished */
    unsigned                       failed:1;
    unsigned                       cancelled:1;
    unsigned                       suppress:1;  /* drop its body bytes */
    unsigned                       first:1;     /* first body byte seen */

    uint64_t                       predicted_us; /* its prefill's predicted
                                                    completion, for the log */
    uint64_t                       predicted_wait_us; /* and its start */
    uint64_t                       last_chunk_us;
    uint64_t                       events;      /* SSE events passed */
} ngx_http_omni_leg_t;


/* The tokenizer service's subrequest of a request. */
typedef struct {
    ngx_http_request_t            *sr;
    ngx_event_t                    timer;       /* the deadline */
    ngx_uint_t                     status;      /* its HTTP status */
    ngx_buf_t                     *response;    /* in memory */
    unsigned                       pending:1;   /* the request waits */
    unsigned                       done:1;      /* subrequest finished */
    unsigned                       timedout:1;
    unsigned                       down:1;      /* never connected */
    unsigned                       ok:1;        /* ids in token_ids */
    unsigned                       inflight:1;  /* counted in the worker's
                                                   subrequests in flight */
    u_char                        *ids_json;    /* vLLM chat: for the */
    size_t                         ids_json_len; /*  decode leg */
    uint64_t                       handle;      /* answer learning: the */
    unsigned                       has_handle:1; /*  service's name of it */
    ngx_str_t                      conversation; /* $omni_conversation */
} ngx_http_omni_tok_t;


/*
 * The answer's text as it streams (ngx_http_omni_learn.c): the string
 * values of "content" keys, unescaped, across buffer boundaries.
 */
typedef struct {
    u_char                        *text;
    size_t                         len;
    size_t                         size;        /* allocated */
    ngx_uint_t                     state;
    ngx_uint_t                     matched;     /* of "content", in a key */
    uint32_t                       hex;         /* a u escape so far */
    ngx_uint_t                     hex_n;
    uint32_t                       high;        /* a high surrogate */
    unsigned                       failed:1;    /* nothing will be sent */
    unsigned                       too_large:1;
} ngx_http_omni_learn_t;


typedef struct {
    ngx_http_request_t            *request;
    ngx_http_omni_main_conf_t     *mcf;

    ngx_uint_t                     route;
    ngx_uint_t                     mode;

    u_char                        *body;
    size_t                         body_len;
    omni_json_member_t            *members;
    size_t                         n_members;

    unsigned                       stream:1;
    unsigned                       include_usage:1;
    unsigned                       header_sent:1;   /* to the client */
    unsigned                       answered:1;      /* last byte queued */
    unsigned                       deadline_hit:1;  /* answer 504 */
    unsigned                       token_prompt:1;
    unsigned                       ids_sent:1;      /* the engines get token
                                                       ids, not text */
    unsigned                       ignore_eos:1;
    unsigned                       timeout_bad:1;   /* X-Omni-Request-Timeout
                                                       does not parse */

    int64_t                        max_tokens;
    uint64_t                       prompt_tokens;   /* counted or estimated */
    uint64_t                       longest_exact;   /* the longest prompt's
                                                       exact token count (0:
                                                       only estimated) */
    uint32_t                      *token_ids;
    size_t                         n_tokens;
    size_t                         batch;           /* prompts in a list */

    u_char                         request_id[NGX_HTTP_OMNI_REQUEST_ID_LEN];
    /* the client's X-Request-Id, sanitised: for logs and the answer only,
     * never sent to an engine (two clients may send the same) */
    u_char                         client_id[NGX_HTTP_OMNI_REQUEST_ID_LEN];
    size_t                         client_id_len;
    size_t                         request_id_len;

    ngx_http_omni_leg_t            legs[NGX_HTTP_OMNI_TIERS];

    ngx_msec_t                     t_start;
    ngx_msec_t                     deadline_ms;     /* from t_start */
    ngx_msec_t                     timeout_header;  /* the client's least
                                                       X-Omni-Request-Timeout
                                                       (0: none) */
    ngx_event_t                    deadline_ev;
    ngx_msec_t                     t_released;
    ngx_msec_t                     t_first_byte;
    ngx_msec_t                     t_end;

    ngx_uint_t                     status;          /* sent to the client */
    const char                    *error;           /* short error kind */

    /* prefix of the prompt, as chained block hashes (scheduling only) */
    uint64_t                      *hashes;
    size_t                         n_hashes;
    uint64_t                       output_tokens;   /* expected */
    uint64_t                       cached_tokens;   /* predicted at the
                                                       chosen instance */
    uint64_t                       slo_ttft_us;     /* 0: none */
    uint64_t                       slo_tpot_us;     /* 0: none */
    ngx_uint_t                     release_reason;  /* NGX_HTTP_OMNI_REL_* */
    uint32_t                       retry_after_s;   /* 0: "1" */
    int64_t                        engine_cached;   /* the engine says
                                                       (-1: not said) */

    /* holding */
    ngx_queue_t                    held;            /* in the worker's list */
    uint32_t                       qentry;          /* NGX_HTTP_OMNI_NONE */
    uint64_t                       qseq;
    ngx_uint_t                     qstage;          /* which queue */
    u_char                        *kv_params;       /* sequential: from */
    size_t                         kv_params_len;   /*   the prefill answer */

    ngx_http_omni_tok_t            tok;
    ngx_http_omni_learn_t         *learn;          /* answer learning */
} ngx_http_omni_ctx_t;


extern ngx_module_t  ngx_http_omni_module;
extern const char  *ngx_http_omni_release_names[];


/* ngx_http_omni_zone.c */
ngx_int_t ngx_http_omni_shm_add(ngx_conf_t *cf,
    ngx_http_omni_main_conf_t *mcf);
ngx_http_omni_shctx_t *ngx_http_omni_shm(ngx_http_omni_main_conf_t *mcf,
    ngx_slab_pool_t **shpool);
void ngx_http_omni_zone_count(ngx_http_omni_main_conf_t *mcf, size_t done,
    size_t failed, ngx_int_t reason);
ngx_uint_t ngx_http_omni_inst_usable(ngx_http_omni_inst_t *in,
    ngx_msec_t now);
void ngx_http_omni_metrics_locked(ngx_http_omni_shctx_t *sh,
    ngx_uint_t route, ngx_uint_t mode, ngx_uint_t status,
    ngx_http_omni_ctx_t *ctx);
extern const double  ngx_http_omni_bucket_bounds[NGX_HTTP_OMNI_BUCKETS];
extern const ngx_uint_t  ngx_http_omni_status_codes[NGX_HTTP_OMNI_STATUSES];

uint64_t ngx_http_omni_now_us(void);
ngx_int_t ngx_http_omni_init_module(ngx_cycle_t *cycle);
/* ngx_http_omni_ledger.c */
#define NGX_HTTP_OMNI_OUTCOME_NONE    0
#define NGX_HTTP_OMNI_OUTCOME_OK      1
#define NGX_HTTP_OMNI_OUTCOME_FAILED  2

ngx_uint_t ngx_http_omni_ledger_start_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool);
ngx_uint_t ngx_http_omni_ledger_reap_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_uint_t starting);
ngx_pid_t ngx_http_omni_ledger_self(void);
ngx_uint_t ngx_http_omni_ledger_dead(ngx_pid_t pid, ngx_uint_t starting);
ngx_http_omni_charge_t *ngx_http_omni_ledger_bind_locked(
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, ngx_pid_t pid,
    uint32_t slot, ngx_http_omni_spec_t *spec, uint64_t now_us);
void ngx_http_omni_ledger_prefill_end_locked(ngx_http_omni_shctx_t *sh,
    ngx_http_omni_charge_t *ch, ngx_uint_t ok);
void ngx_http_omni_ledger_unbind_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_omni_charge_t *ch);
void ngx_http_omni_ledger_adopt(ngx_http_omni_leg_t *leg, ngx_uint_t index,
    ngx_http_omni_charge_t *ch);
ngx_int_t ngx_http_omni_ledger_leg_bind_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_http_omni_upstream_conf_t *ucf,
    ngx_http_omni_leg_t *leg, ngx_uint_t index, ngx_http_omni_spec_t *spec,
    uint64_t now_us);
ngx_int_t ngx_http_omni_ledger_leg_bind(ngx_http_omni_upstream_conf_t *ucf,
    ngx_http_omni_leg_t *leg, ngx_uint_t index);
void ngx_http_omni_ledger_prefill_end(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_leg_t *leg, ngx_uint_t ok);
void ngx_http_omni_ledger_release(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_leg_t *leg, ngx_uint_t outcome, ngx_uint_t prefill_ok);
/*
 * Health: one state per instance (fails, down_until) fed by every source.
 * ok = 0 counts a failure (max_fails of them rest the instance for
 * fail_timeout), ok = 1 clears the count.  source: who saw it (the legs'
 * outcomes, or the agent's active /health probes).  The _locked form is for
 * callers holding the zone's mutex.
 */
#define NGX_HTTP_OMNI_PH_ERROR    0x01
#define NGX_HTTP_OMNI_PH_TIMEOUT  0x02
#define NGX_HTTP_OMNI_PH_5XX      0x04

#define NGX_HTTP_OMNI_HEALTH_PASSIVE  0
#define NGX_HTTP_OMNI_HEALTH_PROBE    1

void ngx_http_omni_health_report(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_inst_t *in, ngx_uint_t ok, ngx_uint_t source,
    ngx_msec_t now);
void ngx_http_omni_health_report_locked(ngx_http_omni_inst_t *in,
    ngx_uint_t ok, ngx_uint_t source, ngx_msec_t now);
void ngx_http_omni_ledger_cancelled(ngx_http_omni_main_conf_t *mcf);
void ngx_http_omni_ledger_request_begin(ngx_http_omni_main_conf_t *mcf);
void ngx_http_omni_ledger_request_end(ngx_http_omni_main_conf_t *mcf,
    ngx_uint_t route, ngx_uint_t mode, ngx_uint_t status,
    ngx_http_omni_ctx_t *ctx);

/* ngx_http_omni_queue.c */
uint32_t ngx_http_omni_entry_alloc_locked(ngx_http_omni_shctx_t *sh,
    ngx_uint_t max);
void ngx_http_omni_entry_free_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e);
void ngx_http_omni_queue_insert_locked(ngx_http_omni_shctx_t *sh,
    uint32_t e);
void ngx_http_omni_wake_push_locked(ngx_http_omni_shctx_t *sh, uint32_t e);
ngx_int_t ngx_http_omni_wake_take(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_uint_t worker, uint32_t *entries,
    uint32_t *seqs);
void ngx_http_omni_queue_remove_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, uint32_t e);
ngx_uint_t ngx_http_omni_queue_reap_locked(ngx_http_omni_shctx_t *sh,
    ngx_slab_pool_t *shpool, ngx_uint_t starting);
void ngx_http_omni_queue_reorder_locked(ngx_http_omni_shctx_t *sh,
    ngx_uint_t q);
ngx_uint_t ngx_http_omni_queue_firsts_locked(ngx_http_omni_shctx_t *sh,
    ngx_uint_t q, uint32_t *out, ngx_uint_t max);

/* ngx_http_omni_sched.c */
uint32_t ngx_http_omni_front_us(ngx_http_omni_ctx_t *ctx);
ngx_uint_t ngx_http_omni_start_tier(ngx_http_omni_main_conf_t *mcf);
ngx_int_t ngx_http_omni_uses_queue(ngx_http_omni_main_conf_t *mcf);
ngx_int_t ngx_http_omni_choose(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier,
    uint64_t tokens);
ngx_int_t ngx_http_omni_choose_retry(ngx_http_request_t *r,
    ngx_http_omni_upstream_conf_t *ucf, uintptr_t *tried, ngx_uint_t *index);
void ngx_http_omni_unmark(ngx_http_omni_ctx_t *ctx, ngx_uint_t slot);
ngx_uint_t ngx_http_omni_tier_usable(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t tier, ngx_msec_t now);
void ngx_http_omni_arrived(ngx_http_omni_shctx_t *sh, uint64_t now_us);
uint32_t *ngx_http_omni_match(ngx_http_omni_shctx_t *sh, uint64_t *hashes,
    size_t n, uint64_t now_us);
ngx_int_t ngx_http_omni_bind_start(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool,
    ngx_http_omni_qentry_t *en, ngx_msec_t now, uint64_t now_us,
    uint64_t *retry_us, ngx_uint_t waiting, ngx_uint_t force);
ngx_int_t ngx_http_omni_bind_decode(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool,
    ngx_http_omni_qentry_t *en, ngx_msec_t now);
ngx_uint_t ngx_http_omni_usable(ngx_http_omni_upstream_conf_t *ucf,
    ngx_uint_t i, ngx_http_omni_inst_t *in, ngx_msec_t now);

/* ngx_http_omni_order.c */
void ngx_http_omni_queue_key_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en);
void ngx_http_omni_queue_opts(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, omni_queue_opts_t *o);
void ngx_http_omni_queue_key_opts(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, omni_queue_opts_t *o);
uint32_t ngx_http_omni_queue_next_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, ngx_msec_t now);
void ngx_http_omni_queue_rekey_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, uint64_t now_us);

/* ngx_http_omni_slo.c */
ngx_int_t ngx_http_omni_slo_init(ngx_cycle_t *cycle);
uint32_t ngx_http_omni_release_next_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_uint_t q, ngx_msec_t now);
uint32_t ngx_http_omni_slo_again_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, uint32_t tried, ngx_msec_t now);
uint32_t ngx_http_omni_retry_after_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_msec_t now);
ngx_int_t ngx_http_omni_slo_admit_locked(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_http_omni_qentry_t *en, ngx_msec_t now,
    uint32_t *retry_after_s);

/* ngx_http_omni_hold.c */
ngx_int_t ngx_http_omni_hold(ngx_http_omni_ctx_t *ctx, ngx_uint_t queue);
ngx_int_t ngx_http_omni_held_wake(ngx_http_omni_ctx_t *ctx);
void ngx_http_omni_unhold(ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_start_now(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t queue);
ngx_int_t ngx_http_omni_decide_start(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, uint32_t e,
    ngx_msec_t now, uint64_t now_us, uint64_t *retry_us, ngx_uint_t waiting,
    ngx_uint_t force, ngx_uint_t *attempts);
ngx_int_t ngx_http_omni_decide_decode(ngx_http_omni_main_conf_t *mcf,
    ngx_http_omni_shctx_t *sh, ngx_slab_pool_t *shpool, uint32_t e,
    ngx_msec_t now, uint64_t now_us, ngx_uint_t *attempts);
void ngx_http_omni_schedule(ngx_http_omni_main_conf_t *mcf);
ngx_int_t ngx_http_omni_init_process(ngx_cycle_t *cycle);

/* ngx_http_omni_feed.c */
void ngx_http_omni_prefill_observed(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_leg_t *leg, ngx_uint_t ok);
void ngx_http_omni_decode_observed(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_leg_t *leg, ngx_uint_t events, ngx_uint_t done);
uint64_t ngx_http_omni_expected_output(ngx_http_omni_ctx_t *ctx);
void ngx_http_omni_cache_observed(ngx_http_omni_ctx_t *ctx,
    ngx_http_omni_leg_t *leg, u_char *resp, omni_json_member_t *members,
    size_t n);

/* ngx_http_omni_learn.c */
ngx_int_t ngx_http_omni_learn_start(ngx_http_omni_ctx_t *ctx);
void ngx_http_omni_learn_capture(ngx_http_omni_ctx_t *ctx, u_char *p,
    u_char *last);
void ngx_http_omni_learn_send(ngx_http_omni_ctx_t *ctx);

/* ngx_http_omni_answer.c */
void ngx_http_omni_retry_after(ngx_http_request_t *r);
ngx_int_t ngx_http_omni_id_headers(ngx_http_request_t *r,
    ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *body, size_t len);
ngx_int_t ngx_http_omni_send_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, const char *fmt, ...);
ngx_int_t ngx_http_omni_leg_error(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier);
ngx_int_t ngx_http_omni_stream_error(ngx_http_omni_ctx_t *ctx,
    ngx_uint_t status, const char *type, const char *msg, size_t len);
ngx_int_t ngx_http_omni_answer_from_prefill(ngx_http_omni_ctx_t *ctx,
    u_char *resp, size_t len);

/* ngx_http_omni_request.c */
ngx_int_t ngx_http_omni_too_long(ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_read_body(ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_parse(ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_hash_prompt(ngx_http_omni_ctx_t *ctx);
void ngx_http_omni_read_headers(ngx_http_omni_ctx_t *ctx);

/* ngx_http_omni_legs.c */
ngx_http_omni_ctx_t *ngx_http_omni_get_ctx(ngx_http_request_t *r);
ngx_int_t ngx_http_omni_start_leg(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier,
    ngx_chain_t *body, off_t len, ngx_uint_t in_memory);
void ngx_http_omni_cancel_leg(ngx_http_omni_ctx_t *ctx, ngx_uint_t tier);
ngx_int_t ngx_http_omni_filters_init(ngx_conf_t *cf);

/* ngx_http_omni_upstream.c */
char *ngx_http_omni_balance(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_http_omni_bootstrap(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/* ngx_http_omni_tokenize.c */
ngx_int_t ngx_http_omni_tokenize(ngx_http_omni_ctx_t *ctx);
ngx_str_t *ngx_http_omni_tokenize_conversation(ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_tokenized(ngx_http_omni_ctx_t *ctx);
void ngx_http_omni_tokenize_cancel(ngx_http_omni_ctx_t *ctx);
void ngx_http_omni_tokenize_release(ngx_http_omni_ctx_t *ctx);
ngx_uint_t ngx_http_omni_tokenize_inflight(void);
ngx_int_t ngx_http_omni_tokenize_kv(ngx_http_omni_ctx_t *ctx, u_char **kv,
    size_t *len);

/* ngx_http_omni_flow.c */
ngx_int_t ngx_http_omni_handler(ngx_http_request_t *r);

/* ngx_http_omni_status.c */
ngx_int_t ngx_http_omni_status_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_omni_metrics_handler(ngx_http_request_t *r);

/* ngx_http_omni_ingest.c */
ngx_int_t ngx_http_omni_ingest_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_omni_ingest_init(ngx_conf_t *cf);
ngx_int_t ngx_http_omni_health_handler(ngx_http_request_t *r);


/* the request's deadline (deadline.c) */
ngx_int_t ngx_http_omni_deadline_arm(ngx_http_omni_ctx_t *ctx);
ngx_int_t ngx_http_omni_deadline_answer(ngx_http_omni_ctx_t *ctx);


#endif /* NGX_HTTP_OMNI_H_INCLUDED_ */
