/*
 * Omni Proxy scoring library: scheduling policies.
 *
 * Pure functions over arrays of instance and request records that the caller
 * fills (from its shared state, the prefix index and the predictor).  They
 * keep no state, allocate nothing and read no clock; a decision over 32
 * instances is a few hundred nanoseconds.
 *
 *   prefill choice   minimise predicted TTFT = wait + prefill time of the
 *                    tokens the instance does not hold, among instances within
 *                    their limits; hold (OMNI_EHOLD) when none is, or when the
 *                    best one is predicted busy for longer than the slack, so
 *                    the request is bound late, when more is known.
 *   decode           longest-processing-time-first order of pending jobs
 *                    (prompt + expected output tokens), each placed on the
 *                    least-loaded decode instance within its limits, or held.
 *   prefill queue    FCFS, or shortest predicted work first with aging: a
 *                    request's score is its work minus `aging` times its wait,
 *                    so it overtakes any newcomer after a bounded time; one
 *                    waiting past the starvation timeout goes first.
 */

#ifndef OMNI_POLICY_H
#define OMNI_POLICY_H

#include "omni_common.h"
#include "omni_predict.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Candidate flags: such an instance is never chosen. */
#define OMNI_POLICY_UNHEALTHY   0x1
#define OMNI_POLICY_DRAINING    0x2

/* omni_decision_t.reason */
#define OMNI_POLICY_CHOSEN      0   /* choice is set */
#define OMNI_POLICY_HOLD_LIMITS 1   /* every candidate is over a limit */
#define OMNI_POLICY_HOLD_BUSY   2   /* the best one is busy past the slack */
#define OMNI_POLICY_HOLD_NONE   3   /* no usable candidate at all */

/* Queue orders. */
#define OMNI_QUEUE_FCFS         0
#define OMNI_QUEUE_SJF          1

/* No limit, for the max_* fields. */
#define OMNI_POLICY_UNLIMITED   0

typedef struct {
    uint32_t  inst;             /* instance number (index, predictor) */
    uint32_t  flags;            /* OMNI_POLICY_UNHEALTHY | _DRAINING */
    uint32_t  cached_tokens;    /* prompt tokens it holds (prefix match) */
    uint32_t  running;          /* requests in flight there */
    uint32_t  max_running;      /* limit; 0: none */
    uint32_t  pad;
    uint64_t  inflight_tokens;  /* uncached tokens in flight there */
    uint64_t  max_tokens;       /* batched-token limit; 0: none */
    uint64_t  wait_us;          /* predicted time until it is free */
    uint64_t  prefill_us;       /* predicted prefill of this request there */
} omni_prefill_cand_t;

typedef struct {
    int32_t   choice;     /* index into the candidates; -1 when holding */
    int32_t   best;       /* best candidate within limits, even when holding
                             on a prediction; -1 if none */
    uint32_t  reason;     /* OMNI_POLICY_CHOSEN or _HOLD_* */
    uint32_t  skipped;    /* candidates over a limit or flagged */
    uint64_t  cost_us;    /* predicted TTFT (wait + prefill) of best */
    uint64_t  retry_us;   /* holding on a prediction: decide again after
                             this long; 0: on the next completion */
} omni_decision_t;

typedef struct {
    uint32_t  prompt_tokens;
    uint32_t  output_tokens;    /* expected output tokens */
    uint64_t  arrival_us;       /* earlier first among equal work */
} omni_decode_job_t;

typedef struct {
    uint32_t  inst;
    uint32_t  flags;
    uint32_t  running;          /* sequences in flight */
    uint32_t  max_running;      /* limit; 0: none */
    uint64_t  load_tokens;      /* work in flight: prompt + expected output
                                   tokens of its sequences */
    uint64_t  max_tokens;       /* KV-token budget; 0: none */
} omni_decode_inst_t;

typedef struct {
    uint64_t  arrival_us;
    uint64_t  work_us;          /* predicted prefill work (or tokens) */
} omni_queue_item_t;

typedef struct {
    uint32_t  order;            /* OMNI_QUEUE_FCFS or OMNI_QUEUE_SJF */
    uint32_t  pad;
    double    aging;            /* SJF: work forgiven per us waited, >= 0 */
    uint64_t  starvation_us;    /* waited this long: first; 0: off */
} omni_queue_opts_t;

/* ---- prefill ------------------------------------------------------------- */

/*
 * Fill cached_tokens, wait_us and prefill_us of c[0, n) for a prompt of
 * prompt_tokens tokens, from the prefix match (cached_blocks[c[i].inst], as
 * omni_index_match_prefix() writes it, n_cached entries; NULL: nothing
 * cached) and the predictor.  At least one token is always computed (an
 * engine recomputes the last one of a fully cached prompt).
 */
int omni_policy_prefill_prepare(const omni_predict_t *p,
    const uint32_t *cached_blocks, size_t n_cached, uint32_t block_size,
    uint32_t prompt_tokens, uint64_t now_us, omni_prefill_cand_t *c,
    size_t n);

/*
 * Choose where to prefill a prompt of prompt_tokens tokens: the candidate
 * with the least wait_us + prefill_us among those not flagged, below
 * max_running, and whose inflight_tokens plus this request's uncached tokens
 * fit max_tokens (an idle instance always fits).  Ties: fewer running, fewer
 * tokens in flight, more cached, lower index.
 *
 * Returns OMNI_OK with out->choice, or OMNI_EHOLD: every candidate is over a
 * limit (reason HOLD_LIMITS, retry on a completion) or the best is predicted
 * busy for more than hold_slack_us (HOLD_BUSY, retry_us says when to decide
 * again).  hold_slack_us = UINT64_MAX never holds on a prediction.
 */
int omni_policy_prefill_choose(const omni_prefill_cand_t *c, size_t n,
    uint32_t prompt_tokens, uint64_t hold_slack_us, omni_decision_t *out);

/*
 * What each candidate's prefill costs the others, added to its prefill_us
 * (so that choose() weighs the request's own TTFT plus that): a prefill of t
 * delays the next (waiting - 1) / n requests queued behind it by about t
 * each or, if more, the t / arrival_gap_us / n that arrive while it runs by
 * t / 2 on average (under a backlog those queue behind the ones waiting, so
 * the larger count stands for both).  The busier the proxy, the more a
 * cache hit (less work) is worth against a shorter wait.  `waiting` counts
 * this request; arrival_gap_us is the mean time between arrivals (0:
 * unknown, not counted).
 */
int omni_policy_prefill_add_delay(omni_prefill_cand_t *c, size_t n,
    uint32_t waiting, double arrival_gap_us);

/* ---- decode -------------------------------------------------------------- */

/* order[0, n) = job indices, longest (prompt + output) first; ties: earlier
 * arrival, lower index. */
int omni_policy_lpt_order(const omni_decode_job_t *jobs, size_t n,
    uint32_t *order);

/*
 * Place one job on the least-loaded instance (load_tokens) that is not
 * flagged, below max_running and whose KV budget fits the job's prompt +
 * output tokens (an idle one always fits).  Ties: fewer running, lower index.
 * OMNI_OK with out->choice, or OMNI_EHOLD.
 */
int omni_policy_decode_place(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, omni_decision_t *out);

/*
 * LPT assignment of a batch: jobs in omni_policy_lpt_order(), each placed
 * with omni_policy_decode_place(); a placed job's tokens and one running
 * sequence are added to its instance in d (the caller's copy, updated in
 * place).  assign[j] = instance index for job j, or -1 when it must wait;
 * with `strict`, the first job that must wait stops the pass (later ones wait
 * too, so small jobs cannot starve a big one).  order: n_jobs scratch slots.
 * Returns the number placed.
 */
int omni_policy_decode_assign(omni_decode_inst_t *d, size_t n_inst,
    const omni_decode_job_t *jobs, size_t n_jobs, int strict,
    uint32_t *order, int32_t *assign);

/* ---- prefill queue ------------------------------------------------------- */

/* The index of the item to release next, or OMNI_ENOTFOUND when n == 0. */
int omni_policy_queue_pick(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts);

/* order[0, n) = item indices in release order (what repeated picks give). */
int omni_policy_queue_order(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts, uint32_t *order);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_POLICY_H */
