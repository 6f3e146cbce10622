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
 *   decode           least-loaded placement of one job (prompt + expected
 *                    output tokens) on a decode instance within its limits,
 *                    or hold; the decode queue releases longest first (LPT).
 *   prefill queue    FCFS, or shortest predicted work first with aging: a
 *                    request's key is its work plus `aging` times its
 *                    arrival, so it overtakes any newcomer after a bounded
 *                    time.  A request is starved when its wait plus its
 *                    work reaches the starvation timeout (the TTFT it
 *                    would have if it started now); of the starved the
 *                    oldest goes first (it minimises the largest TTFT
 *                    among them), in every order.
 *   SLO release      with TTFT deadlines: lost requests after those that
 *                    can still meet theirs, the queue order while no
 *                    deadline is at risk, else the most that can be on
 *                    time (Moore-Hodgson); the early 429 and Retry-After
 *                    from the queue's expected drain; decode placement
 *                    that meets a TPOT target when it can.
 *   at once          round robin, least loaded or cache-aware choice for
 *                    the policies that do not hold requests.
 *
 * The nginx module calls exactly these functions (docs/scoring.md, "How the
 * module calls the policies"); a test of them is a test of what nginx does.
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
#define OMNI_POLICY_TRIED       0x4     /* this leg tried it already */
/* Set by omni_policy_prefill_decide(): sent now, the request would share
 * the step waiting there, which starts within the slack (its wait_us is
 * that step's end, its prefill_us what its tokens add to it). */
#define OMNI_POLICY_JOINS       0x8

/* omni_decision_t.reason */
#define OMNI_POLICY_CHOSEN      0   /* choice is set */
#define OMNI_POLICY_HOLD_LIMITS 1   /* every candidate is over a limit */
#define OMNI_POLICY_HOLD_BUSY   2   /* the best one is busy past the slack */
#define OMNI_POLICY_HOLD_NONE   3   /* no usable candidate at all */
#define OMNI_POLICY_HOLD_FULL   4   /* the best one is busy and no instance
                                       has room now: nothing queued behind
                                       can go either */

/* Queue orders. */
#define OMNI_QUEUE_FCFS         0
#define OMNI_QUEUE_SJF          1
#define OMNI_QUEUE_LPT          2   /* the decode queue: most tokens first */

/* At-once policies (omni_policy_pick_now). */
#define OMNI_PICK_ROUND_ROBIN   0
#define OMNI_PICK_LEAST_LOADED  1
#define OMNI_PICK_CACHE_AWARE   2

/* No limit, for the max_* fields. */
#define OMNI_POLICY_UNLIMITED   0

/* SJF: predicted work forgiven per microsecond waited (omni_queue_opts_t) */
#define OMNI_POLICY_AGING       0.25
/* most starved entries omni_policy_queue_next() accepts at once (it takes
 * the oldest; omni_policy_late_scan() says how many to look at) */
#define OMNI_POLICY_LATE_SCAN   64
/* SJF: the starvation bound is at least this percentage of the backlog
 * (omni_queue_opts_t.backlog_us; omni_policy_starvation_bound) */
#define OMNI_POLICY_BACKLOG_PCT 125
/* SJF: the request the order puts first goes before the starved when its
 * predicted work is at most this percentage of the starvation timeout
 * (omni_policy_queue_next) ... */
#define OMNI_POLICY_SHORT_PCT   4
/* ... while the oldest starved one's wait plus work is under the
 * starvation bound plus this percentage of the timeout */
#define OMNI_POLICY_SHORT_LATE_PCT 20
/* SJF: keys are made again when their aging moved by more than this
 * fraction of itself (1/8; omni_policy_queue_rekey) */
#define OMNI_POLICY_AGING_SLACK 8
/* a release pass: entries offered a free instance when the one to release
 * next waits for a busy one (itself included) */
#define OMNI_POLICY_LOOKAHEAD   8
/* cache-aware: the best-matching instance is left when it has this many
 * more requests in flight than the least busy one */
#define OMNI_POLICY_BALANCE     8
/* the mean gap between arrivals: weight of the newest, longest gap counted */
#define OMNI_POLICY_GAP_ALPHA   0.05
#define OMNI_POLICY_MAX_GAP_US  10000000

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
    /* the prefill bound there last (omni_predict_job_t start_us, done_us,
     * service_us); 0: none.  Read by omni_policy_prefill_decide() only. */
    uint64_t  step_start_us;
    uint64_t  step_done_us;
    uint64_t  step_service_us;
} omni_prefill_cand_t;

typedef struct {
    int32_t   choice;     /* index into the candidates; -1 when holding */
    int32_t   best;       /* best candidate within limits, even when holding
                             on a prediction; -1 if none */
    uint32_t  reason;     /* OMNI_POLICY_CHOSEN or _HOLD_* */
    uint32_t  skipped;    /* candidates over a limit or flagged */
    uint64_t  cost_us;    /* predicted TTFT (wait + prefill) of best */
    uint64_t  retry_us;   /* the best is busy past the slack: decide again
                             after this long (prefill_decide: set even when
                             a free instance was taken); 0: on the next
                             completion */
} omni_decision_t;

typedef struct {
    uint64_t  hold_slack_us;    /* bound now if its best is free within */
    double    arrival_gap_us;   /* mean time between arrivals; 0: unknown */
    uint32_t  waiting;          /* requests queued, counting this one */
    uint32_t  force;            /* rather than wait for a busy best one,
                                   take the best free one (see decide) */
    uint64_t  deadline_us;      /* its TTFT deadline (SLO); 0: none */
    uint64_t  front_us;         /* the engine's own work on it before it can
                                   start (tokenizing a text prompt): it may
                                   be sent that much before its instance
                                   frees, on top of hold_slack_us */
    uint32_t  step_tokens;      /* the engines' prefill step budget
                                   (max_num_batched_tokens); 0: unknown,
                                   see omni_policy_prefill_decide() */
    uint32_t  starved;          /* 1: it goes first for having waited past
                                   the starvation bound: the last-step
                                   rule does not bind it early, and its
                                   cost to the others is not weighed */
} omni_prefill_opts_t;

typedef struct {
    uint32_t  prompt_tokens;
    uint32_t  output_tokens;    /* expected output tokens */
    uint64_t  arrival_us;       /* informational */
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
    uint64_t  work_us;          /* SJF: predicted prefill work
                                   (omni_policy_queue_work); LPT: prompt +
                                   expected output tokens; FCFS: unused */
} omni_queue_item_t;

typedef struct {
    uint32_t  order;            /* OMNI_QUEUE_FCFS, _SJF or _LPT */
    uint32_t  pad;
    double    aging;            /* SJF: work forgiven per us waited, >= 0
                                   (the module: OMNI_POLICY_AGING) */
    uint64_t  starvation_us;    /* waited (SJF: + its work) this long:
                                   first; 0: off */
    uint64_t  backlog_us;       /* SJF: the queue's predicted work per
                                   usable instance (how long the instances
                                   take to drain what waits); the bound is
                                   at least OMNI_POLICY_BACKLOG_PCT % of
                                   it (omni_policy_starvation_bound); 0:
                                   the timeout alone */
    uint64_t  bound_max_us;     /* the backlog's share never exceeds this
                                   (the module: half its shortest queue or
                                   request timeout, so a request starves
                                   before it times out); 0: no limit */
} omni_queue_opts_t;

typedef struct {
    uint32_t  flags;            /* UNHEALTHY | DRAINING | TRIED: skipped */
    uint32_t  matched;          /* prefix blocks it holds (cache-aware) */
    uint64_t  running;          /* requests in flight */
    uint64_t  load_tokens;      /* tokens in flight */
} omni_pick_cand_t;

typedef struct {
    uint64_t  last_us;          /* the latest arrival; 0: none yet */
    double    gap_us;           /* mean gap between arrivals; 0: unknown */
} omni_arrivals_t;

/* ---- prefill ------------------------------------------------------------- */

/*
 * Fill cached_tokens, wait_us and prefill_us of c[0, n) for a prompt of
 * prompt_tokens tokens, from the prefix match (cached_blocks[c[i].inst], as
 * omni_index_match_prefix() writes it, n_cached entries; NULL: nothing
 * cached) and the predictor.  At least one token is always computed (an
 * engine recomputes the last one of a fully cached prompt).  The wait is
 * the predictor's, less the last job's predicted transfer there in
 * parallel P/D (omni_predict_transfer_us(); see decide()).
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

/*
 * The held-request decision for the start of a request (what the module
 * binds): prepare(), then, with "the slack" hold_slack_us + front_us (a
 * request whose engine first tokenizes it may be sent that much earlier,
 * so that its tokenization overlaps the work ahead of it):
 *   - room: whether any candidate could start some request now (not
 *     flagged, below max_running, inflight_tokens below max_tokens, free
 *     within the slack);
 *   - engines batch in steps: a candidate free within the slack whose last
 *     prefill (step_*) has not started a slack ago and is not done, and
 *     whose last service was shorter than this request's prefill, waits
 *     until that one is done, plus hold_slack_us (a longer request does
 *     not join a shorter one's step);
 *   - a candidate whose batch budget this request does not fit now is busy
 *     (wait past the slack), not out of the question; max_tokens is then
 *     no limit for choose().  With step_tokens, unless the engine's last
 *     step of its work in flight (those tokens modulo step_tokens) is
 *     predicted to last at least twice hold_slack_us plus 1/32 of its last
 *     prefill's service, and that work has not overrun its predicted end:
 *     then it waits for that end only, so that the request reaches the
 *     engine during the last step, not before it (it would share it).
 *     Not for a `starved` request: bound early, it waits in the engine
 *     when that work overruns its prediction, by up to hundreds of ms for
 *     the long prefills of a tail, for a gain of a few ms.  And for any
 *     request, once that work is predicted done (omni_predict_end_us())
 *     while its answer is still more than hold_slack_us away
 *     (omni_predict_answer_us(): a KV transfer, parallel P/D): the engine
 *     is free, its tokens come back with the answer;
 *   - parallel P/D, once the transfer's time is known: every instance's
 *     wait, and its predicted end in the two rules above, count that
 *     much earlier as the last job's predicted transfer there
 *     (omni_predict_transfer_us()): the proxy hears an end up to a
 *     transfer late, and a request sent that early waits in the engine
 *     at most that long;
 *   - with a deadline: when some candidate (not flagged, below
 *     max_running) would finish it by the deadline (now + wait + prefill),
 *     the ones that would not are flagged DRAINING: placement keeps it on
 *     time before it weighs the cost to the others;
 *   - add_delay(waiting, arrival_gap_us), except for a `starved` request
 *     (it goes ahead of the others whatever it costs them: its own TTFT
 *     alone), choose(hold_slack_us);
 *   - the best is busy past the slack: with no room anywhere, HOLD_FULL;
 *     without `force`, HOLD_BUSY (the caller offers the free instances to
 *     the requests behind); with `force`, HOLD_BUSY too when half the
 *     prompt or more is cached on the best one, else the best candidate
 *     free within the slack (HOLD_BUSY if none is).
 * c is scratch: its fields are updated in place (c[choice].cached_tokens is
 * what the chosen instance holds).  matched/n_matched/block_size as for
 * prepare().
 *
 * Returns OMNI_OK (out->choice), OMNI_EHOLD (out->reason: HOLD_BUSY: this
 * one waits, one behind it may go; HOLD_LIMITS, HOLD_NONE, HOLD_FULL:
 * nothing that needs a free instance can go now), or an error.  Whatever
 * the return, a nonzero out->retry_us is when to decide again.
 */
int omni_policy_prefill_decide(const omni_predict_t *p,
    const uint32_t *matched, size_t n_matched, uint32_t block_size,
    uint32_t prompt_tokens, uint64_t now_us, const omni_prefill_opts_t *o,
    omni_prefill_cand_t *c, size_t n, omni_decision_t *out);

/* ---- decode -------------------------------------------------------------- */

/*
 * Place one job on the least-loaded instance (load_tokens) that is not
 * flagged, below max_running and whose KV budget fits the job's prompt +
 * output tokens (an idle one always fits).  Ties: fewer running, lower index.
 * OMNI_OK with out->choice, or OMNI_EHOLD.
 */
int omni_policy_decode_place(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, omni_decision_t *out);

/*
 * decode_place() with a TPOT target (the request's time per output token,
 * us; 0: none, then exactly decode_place()): step_us[i] is d[i]'s predicted
 * decode step with this job added (omni_predict_decode_step_us() at
 * running + 1 sequences and its KV tokens plus the job's).  Of the
 * instances decode_place() would accept, the least loaded whose step_us
 * meets the target; if none does, decode_place()'s choice (the target is
 * missed anyway; the least loaded misses it least often).
 */
int omni_policy_decode_place_tpot(const omni_decode_inst_t *d, size_t n,
    const omni_decode_job_t *job, const uint64_t *step_us, uint64_t tpot_us,
    omni_decision_t *out);

/* ---- queues -------------------------------------------------------------- */

/*
 * Work the starvation rule may count: the prediction once the instance's
 * model has fitted this many prefills.  Before, it is mostly the built-in
 * prior, a generic guess (several times the service of a long prompt on a
 * fast engine): counted, it starved long prompts after a short wait in the
 * first seconds of every start, ahead of shorter ones.
 */
#define OMNI_POLICY_STARVE_SAMPLES  8

/*
 * SJF work of a prompt: the predicted prefill time, on the instance of
 * inst[0, n) (predictor/index numbers) that holds the longest prefix of it
 * (matched[], n_matched entries, as for prepare(); the first of equals; no
 * match: inst[0]), of the tokens that instance does not hold.  When
 * starve_us is not NULL, the part of it the starvation rule counts
 * (omni_policy_starved): all of it once that instance's model has fitted
 * OMNI_POLICY_STARVE_SAMPLES prefills, else 0.  The order may use the
 * prior's guess (it ranks prompts by size all the same); the starvation
 * bound, a bound on each request's TTFT, may not.
 */
int omni_policy_queue_work(const omni_predict_t *p, const uint32_t *matched,
    size_t n_matched, uint32_t block_size, const uint32_t *inst, size_t n,
    uint32_t prompt_tokens, uint64_t *work_us, uint64_t *starve_us);

/*
 * The static key of a queued request (lower first; equal keys: queued
 * earlier first, omni_policy_queue_before): FCFS arrival_us; SJF work_us +
 * a * arrival_us, a = omni_policy_queue_aging() (work minus a * waited,
 * plus a term the same for everyone: the order needs re-sorting only when
 * a changes); LPT -work.
 */
double omni_policy_queue_key(const omni_queue_opts_t *o, uint64_t arrival_us,
    uint64_t work);

/*
 * SJF: the aging the keys use: o->aging times the starvation timeout over
 * the starvation bound (omni_policy_starvation_bound), so that when the
 * bound follows a backlog the aging weakens as much: a wait is then
 * measured against the bound, and the aging alone no longer turns a deep
 * backlog first come first served.  Other orders, or no bound: o->aging.
 */
double omni_policy_queue_aging(const omni_queue_opts_t *o);

/*
 * Whether keys made with the options `keyed` must be made again under
 * `now` (the SJF aging moved by more than 1/OMNI_POLICY_AGING_SLACK of
 * itself): the caller then recomputes every key with `now` and re-sorts.
 */
int omni_policy_queue_rekey(const omni_queue_opts_t *keyed,
    const omni_queue_opts_t *now);

/* Whether entry a goes before entry b (key, then queue sequence number). */
static inline int
omni_policy_queue_before(double key_a, uint64_t seq_a, double key_b,
    uint64_t seq_b)
{
    return key_a != key_b ? key_a < key_b : seq_a < seq_b;
}

/* The TTFT past which a request is starved: the starvation timeout; in the
 * SJF order at least OMNI_POLICY_BACKLOG_PCT % of the backlog (backlog_us,
 * at most bound_max_us), so that under a backlog deeper than the timeout
 * the order stays shortest first instead of becoming first come first
 * served.  0: off. */
uint64_t omni_policy_starvation_bound(const omni_queue_opts_t *o);

/* Whether a request that arrived at arrival_us is starved at now_us: its
 * wait, plus (SJF) its predicted work work_us, reached the starvation
 * bound (omni_policy_starvation_bound). */
int omni_policy_starved(const omni_queue_opts_t *o, uint64_t arrival_us,
    uint64_t work_us, uint64_t now_us);

/* How many of the oldest entries omni_policy_queue_next() wants to see
 * the starved ones of: 0 (no starvation timeout); 1 for FCFS and LPT (the
 * oldest starves first and is the one released); OMNI_POLICY_LATE_SCAN
 * for SJF (a younger, longer request may starve first). */
size_t omni_policy_late_scan(const omni_queue_opts_t *o);

/*
 * Which entry to release next.  late[0, n): the starved ones among the
 * omni_policy_late_scan() oldest entries, in queue order; head: the entry
 * with the least key (NULL: not known).
 * Returns the index in late[] of the one to release, the oldest (late[0],
 * in every order: it minimises the largest TTFT among them, see
 * omni_policy.c), or OMNI_ENOTFOUND: release the least key.  That is when
 * n == 0, and in the SJF order when the head's predicted work is known
 * (not 0) and at most OMNI_POLICY_SHORT_PCT % of the starvation timeout
 * while late[0]'s wait plus work is under the starvation bound plus
 * OMNI_POLICY_SHORT_LATE_PCT % of the timeout: so short a request goes
 * first, ahead of the starved too, and a stream of them delays those by a
 * bounded time.
 */
int omni_policy_queue_next(const omni_queue_opts_t *o,
    const omni_queue_item_t *late, size_t n, const omni_queue_item_t *head,
    uint64_t now_us);

/*
 * The same over a whole queue q[0, n) in queue order (index = sequence):
 * the index of the item to release next, or OMNI_ENOTFOUND when n == 0.
 */
int omni_policy_queue_pick(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts);

/* order[0, n) = item indices in release order: what repeated picks at
 * now_us give (a release pass in which every bind succeeds). */
int omni_policy_queue_order(const omni_queue_item_t *q, size_t n,
    uint64_t now_us, const omni_queue_opts_t *opts, uint32_t *order);

/* A request to start arrived: update the mean gap between arrivals (an
 * exponential mean, OMNI_POLICY_GAP_ALPHA; gaps capped at
 * OMNI_POLICY_MAX_GAP_US). */
void omni_policy_arrived(omni_arrivals_t *a, uint64_t now_us);

/* ---- SLO-aware release --------------------------------------------------- */

/*
 * With a TTFT objective (SLO) per request, the prefill queue releases so as
 * to maximise the number of requests that meet theirs (goodput); see
 * omni_policy_slo_next().  Without deadlines these functions give exactly
 * the queue functions' answers (the module calls those when no SLO is
 * configured).
 */

/* omni_slo_pick_t.reason */
#define OMNI_SLO_STARVED        0   /* past the starvation timeout */
#define OMNI_SLO_ORDER          1   /* no deadline at risk: the queue order's
                                       first that can still meet its own */
#define OMNI_SLO_PLAN           2   /* a deadline is at risk: released from
                                       the plan that keeps the most on time */
#define OMNI_SLO_LOST           3   /* nothing can meet its deadline: the
                                       queue order */

/* release candidates (in queue order) tried against the on-time plan */
#define OMNI_POLICY_SLO_TRY     8
/* newest entries the module gathers for omni_policy_slo_next() */
#define OMNI_POLICY_SLO_SCAN    256
/* Retry-After, seconds: at least 1, at most this */
#define OMNI_POLICY_RETRY_MAX_S 3600

typedef struct {
    uint64_t  arrival_us;
    uint64_t  work_us;          /* predicted prefill work
                                   (omni_policy_queue_work) */
    uint64_t  deadline_us;      /* TTFT deadline: arrival + its SLO; 0: none */
    uint64_t  seq;              /* queue sequence: ties, and the oldest */
} omni_slo_item_t;

typedef struct {
    int32_t   index;            /* into q[]; -1: q is empty */
    uint32_t  reason;           /* OMNI_SLO_* */
    uint32_t  feasible;         /* items that can still meet their deadline
                                   (no deadline counts) if released now */
    uint32_t  on_time;          /* of them, how many the plan keeps on time
                                   (= feasible unless reason is PLAN) */
} omni_slo_pick_t;

/*
 * Whether an entry is past the starvation timeout with SLOs: its wait
 * since its deadline when it has one (before, the SLO rule serves it if it
 * can be served on time; after, it is lost to goodput but waits at most
 * this much more), else as omni_policy_starved().
 */
int omni_policy_slo_starved(const omni_queue_opts_t *o,
    const omni_slo_item_t *it, uint64_t now_us);

/* Bytes of (8-byte aligned) scratch omni_policy_slo_next() needs for n
 * items and m instances. */
size_t omni_policy_slo_scratch_size(size_t n, size_t m);

/*
 * Which entry of q[0, n) (any order; seq gives queue order) to release
 * next.  wait_us[0, m): each usable instance's predicted time until it is
 * free (omni_predict_wait_us); m = 0 counts as one instance free now.  The
 * plan behind the rule: entries released in a given order each start on
 * the instance predicted free first and take work_us; an entry meets its
 * deadline when now + its start + work_us <= deadline_us.
 *
 *   1. the oldest entries (seq order) past the starvation timeout
 *      (omni_policy_slo_starved), at most omni_policy_late_scan(o) of them
 *      while they are: omni_policy_queue_next() among them, the least
 *      key its head (STARVED; a short head: the rules below choose);
 *   2. feasible: the entries without deadline, and those that would meet
 *      theirs if released now; the others are lost and go after them;
 *   3. if the feasible ones in queue order (the key of
 *      omni_policy_queue_key) all meet their deadlines, the first of them
 *      (ORDER): nothing is at risk, the queue order stands (SJF with aging
 *      stays SJF with aging);
 *   4. else the on-time set: the feasible entries in deadline order (no
 *      deadline last; ties by key, then seq), each kept if the plan of
 *      those kept so far meets every deadline, else the longest of them is
 *      dropped (Moore-Hodgson, which on one instance keeps the most that can
 *      be on time).  Released: the first in queue order, of at most
 *      OMNI_POLICY_SLO_TRY, that keeps the whole set on time when released
 *      first and the rest follow in deadline order; the set's first by
 *      deadline if none does (PLAN);
 *   5. nothing feasible: the least key (LOST).
 *
 * out->index is the item to release.  Returns OMNI_OK (OMNI_ENOTFOUND with
 * index -1 when n == 0), OMNI_ERANGE when scratch is smaller than
 * omni_policy_slo_scratch_size(n, m), OMNI_EINVAL.  Costs O(n log n + f^2)
 * for f feasible entries when nothing is at risk, plus O(f log m) per entry
 * dropped and per candidate tried when something is.
 */
int omni_policy_slo_next(const omni_queue_opts_t *o, const omni_slo_item_t *q,
    size_t n, const uint64_t *wait_us, size_t m, uint64_t now_us,
    void *scratch, size_t scratch_size, omni_slo_pick_t *out);

/*
 * Retry-After for a request refused by a full or overloaded queue: when the
 * instances, each from its predicted free time wait_us[0, m), would have
 * done queued_work_us between them (the work shared out as evenly as it
 * can be: the level T where sum(max(0, T - wait_us[i])) = queued_work_us),
 * less slack_us (an SLO request: its SLO less its own work, the time it can
 * afford to wait), in whole seconds rounded up, at least 1, at most
 * OMNI_POLICY_RETRY_MAX_S.  OMNI_EINVAL when m == 0.
 */
int omni_policy_retry_after(const uint64_t *wait_us, size_t m,
    uint64_t queued_work_us, uint64_t slack_us, uint32_t *seconds);

/*
 * Early refusal (429) of an arriving request req (deadline set; work_us as
 * for the queue) given the queue q[0, n): refuse when admitting it would
 * only add to a queue that cannot meet any SLO, that is when all of
 *   - it could meet its SLO on an idle instance (work_us <= deadline -
 *     arrival: a prompt too long for its SLO is never refused for that),
 *   - it cannot even if released first (now + min wait_us + work_us >
 *     deadline),
 *   - no queued entry can meet its own (each has a deadline, and now + min
 *     wait_us + its work > its deadline).
 * q must hold every queued entry not yet past its deadline (older ones are
 * lost anyway); queued_work_us is the work of the whole queue.
 *
 * Returns 1 (refuse; *retry_after_s from omni_policy_retry_after() with the
 * slack deadline - arrival - work_us), 0 (admit; *retry_after_s 0), or
 * OMNI_EINVAL (a NULL, req without deadline, m == 0).
 */
int omni_policy_slo_admit(const omni_slo_item_t *req,
    const omni_slo_item_t *q, size_t n, const uint64_t *wait_us, size_t m,
    uint64_t now_us, uint64_t queued_work_us, uint32_t *retry_after_s);

/* ---- at once ------------------------------------------------------------- */

/*
 * The at-once choice among c[0, n), scanned from index `start` (round
 * robin's position) round: ROUND_ROBIN the first not flagged; LEAST_LOADED
 * the least load_tokens (the first of equals); CACHE_AWARE the one with the
 * most matched blocks (the first of equals) unless it has
 * OMNI_POLICY_BALANCE more running than the least running, else least
 * loaded.  Returns the index, or OMNI_ENOTFOUND when every one is flagged.
 */
int omni_policy_pick_now(const omni_pick_cand_t *c, size_t n,
    uint32_t policy, size_t start);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_POLICY_H */
