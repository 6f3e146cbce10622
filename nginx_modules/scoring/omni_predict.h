/*
 * Omni Proxy scoring library: per-instance online predictor.
 *
 * LLM engines run in steps, so how long an instance takes is a function of
 * the work it is given.  Per instance, two linear models are fitted online by
 * exponentially weighted least squares (a forgetting factor: recent
 * behaviour counts more; the fit follows an instance that slows down):
 *
 *   prefill service time (us) = c0 + c1 * n/1024 + c2 * n * (m + n/2) / 2^20
 *       n = new (uncached) tokens, m = cached context tokens; the last term
 *       is attention over the context (token pairs, in Mi)
 *   decode step time (us)     = d0 + d1 * batch + d2 * kv_tokens/1024
 *
 * Observations are weighted by the inverse square of their duration: the
 * fit minimises relative errors, so short and long prefills count alike.
 * The fit is kept in information form (weighted normal equations, solved
 * for three coefficients at each update) with the prior always counting as
 * 1/prior_var of an observation: until data arrives, and in directions the
 * inputs never vary in, the coefficients are the priors; nothing diverges
 * or winds up on nearly collinear inputs.  Every coefficient is kept >= 0
 * (every term is a cost).  An observation above four times the prediction
 * is clipped first, so one stalled request does not wreck the fit.
 *
 * On top of the models, each instance tracks the prefill work the proxy sent
 * it: dispatch() predicts when the new request completes (it queues behind
 * the work in flight; requests sent while the last one still waits for its
 * step share that step, and add their tokens but not another step's fixed
 * cost) and returns a job record; done() takes that record back
 * with the observed completion time, fits the model on the request's own
 * service time, updates the running error (MAPE) of the predicted completion,
 * and re-anchors the instance's predicted free time on what really happened.
 *
 * Memory: one block sized by omni_predict_size(), no pointers inside, no
 * allocation after creation; may live in shared memory.  No clock reads (time
 * is an argument, microseconds), no locking (the caller's job).
 */

#ifndef OMNI_PREDICT_H
#define OMNI_PREDICT_H

#include "omni_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define OMNI_PREDICT_DIM            3
#define OMNI_PREDICT_MAX_INSTANCES  65536

/* A prefill's answer comes after the transfer of its prompt's KV to another
 * instance, which the engine overlaps with its next work (parallel P/D).
 * The transfer's time per token is learned from the answers (one fit for
 * all the instances) and the instance counts as free that much before each
 * answer; until it is known, an eighth of the work sent before. */
#define OMNI_PREDICT_TRANSFER       1u

typedef struct omni_predict_s  omni_predict_t;

typedef struct {
    uint32_t  max_instances;
    uint32_t  flags;                           /* OMNI_PREDICT_TRANSFER */
    double    forget;                          /* (0.5, 1]; 0: 0.98 */
    double    prior_var;                       /* > 0; 0: 100 (the prior
                                                  weighs 1/prior_var) */
    double    mape_alpha;                      /* (0, 1]; 0: 0.05 */
    double    min_us;                          /* prediction floor; 0: 50 */
    double    prefill_prior[OMNI_PREDICT_DIM]; /* all 0: built-in priors */
    double    decode_prior[OMNI_PREDICT_DIM];  /* all 0: built-in priors */
} omni_predict_cfg_t;

/* What dispatch() predicted; the caller keeps it with the request and gives
 * it back to done(). */
typedef struct {
    uint32_t  n_new;
    uint32_t  n_cached;
    uint64_t  dispatch_us;
    uint64_t  start_us;      /* predicted start of its first engine step */
    uint64_t  service_us;    /* predicted service time (what it adds) */
    uint64_t  done_us;       /* predicted completion (queueing included) */
    uint32_t  shared;        /* 1: shares its first step with the request
                                sent there before it */
    uint32_t  tail_us;       /* predicted trip after its service (in
                                done_us): to the proxy, and a parallel
                                leg's KV transfer; the engine is free */
    uint64_t  sent_at_us;    /* its place in the instance's queue: the
                                service sent there so far, its own too */
} omni_predict_job_t;

/* One instance's model and state, for /omni/status. */
typedef struct {
    double    prefill_coef[OMNI_PREDICT_DIM];
    double    decode_coef[OMNI_PREDICT_DIM];
    uint64_t  prefill_samples;    /* fitted observations */
    uint64_t  decode_samples;
    uint64_t  completion_samples; /* done() calls with ok */
    double    prefill_mape;       /* running MAPE of service time, a priori */
    double    decode_mape;        /* of decode step time */
    double    completion_mape;    /* of predicted completion vs latency */
    uint64_t  free_at_us;         /* predicted end of the prefill work sent */
    uint32_t  inflight;           /* prefill jobs dispatched, not yet done */
    uint32_t  pad;
    double    reach_us;           /* learned time a request sent to an idle
                                     instance takes beyond its service:
                                     fixed part ... */
    double    reach_per_1k_us;    /* ... and per 1,024 prompt tokens */
    double    transfer_per_1k_us; /* OMNI_PREDICT_TRANSFER: the part of an
                                     answer per 1,024 prompt tokens that is
                                     its KV transfer (the engine is free) */
    uint64_t  transfer_samples;   /* fitted on (QUEUED_MIN: in use) */
    uint64_t  transfer_told_samples; /* of them, from the ends the engines
                                     told (their KV events; QUEUED_MIN:
                                     the time per token is theirs) */
    uint64_t  engine_ends;        /* prefill ends the engine told,
                                     earlier than predicted
                                     (omni_predict_prefill_stored) */
} omni_predict_state_t;

size_t omni_predict_size(const omni_predict_cfg_t *cfg);
int omni_predict_init(void *mem, size_t size, const omni_predict_cfg_t *cfg,
    omni_predict_t **out);
omni_predict_t *omni_predict_new(const omni_predict_cfg_t *cfg,
    const omni_allocator_t *a, int *rc);
void omni_predict_free(omni_predict_t *p, const omni_allocator_t *a);
omni_predict_t *omni_predict_attach(void *mem, size_t size);
void omni_predict_get_cfg(const omni_predict_t *p, omni_predict_cfg_t *cfg);

/* Forget everything learned about instance inst (new engine behind it). */
int omni_predict_reset(omni_predict_t *p, uint32_t inst);
/* A configuration's flags (OMNI_PREDICT_TRANSFER) changed on reload. */
int omni_predict_set_flags(omni_predict_t *p, uint32_t flags);

/* ---- models -------------------------------------------------------------- */

/* Predicted prefill service time (us) of n_new tokens after n_cached cached
 * ones, >= min_us; or a negative OMNI_E* code. */
int64_t omni_predict_prefill_us(const omni_predict_t *p, uint32_t inst,
    uint32_t n_new, uint32_t n_cached);

/* Predicted decode step time (us) at this batch size and KV tokens. */
int64_t omni_predict_decode_step_us(const omni_predict_t *p, uint32_t inst,
    uint32_t batch, uint64_t kv_tokens);

/* Fit one observed prefill service time / decode step time. */
int omni_predict_observe_prefill(omni_predict_t *p, uint32_t inst,
    uint32_t n_new, uint32_t n_cached, uint64_t service_us);
int omni_predict_observe_decode(omni_predict_t *p, uint32_t inst,
    uint32_t batch, uint64_t kv_tokens, uint64_t step_us);

/* ---- prefill work in flight -------------------------------------------- */

/*
 * The proxy sends instance inst a prefill of n_new uncached tokens: predicts
 * its service and completion (behind the work in flight) into *job and counts
 * it in flight.
 */
int omni_predict_prefill_dispatch(omni_predict_t *p, uint32_t inst,
    uint32_t n_new, uint32_t n_cached, uint64_t now_us,
    omni_predict_job_t *job);

/*
 * That prefill finished at done_us (ok) or failed/was cancelled (!ok).  With
 * ok, the service time it got (from its start: dispatch, or the previous
 * completion if it queued) is fitted, unless it finished together with the
 * request before it (the engine batched them: no clean sample), and the
 * completion error is folded into the running MAPE.
 */
int omni_predict_prefill_done(omni_predict_t *p, uint32_t inst,
    const omni_predict_job_t *job, uint64_t done_us, int ok);

/*
 * The engine's own word on a prefill's end: its KV events.  An engine
 * publishes the blocks of a prompt as it computes them, the prompt's last
 * full block at the end of its prefill, before the KV transfer of parallel
 * P/D (SGLang checkpoints a finished prefill into its radix tree before it
 * sends the KV; vLLM caches full blocks every step).  expect() notes, for a
 * job just dispatched, the index hash of the last block the engine will
 * store for it (the caller knows the prompt's blocks and how many are
 * cached).  stored() is called for every block instance inst stored, as the
 * events arrive: when it is a job's expected block and no newer news (an
 * answer, another end) came before, the engine has served the work in order
 * up to that job, and the predicted end becomes now plus the service sent
 * after it, when that is earlier than predicted (the events come a few ms
 * after the end: a later end told is that lag as much as a slow engine).
 * Returns 1 when it moved the prediction, 0 otherwise.  A job's
 * mark goes with its done(); an instance keeps OMNI_PREDICT_MARKS of them
 * (the oldest gives way).  An answer after its end was told re-anchors
 * nothing (the end told is nearer the engine than the answer less its
 * predicted transfer).
 */
int omni_predict_prefill_expect(omni_predict_t *p, uint32_t inst,
    const omni_predict_job_t *job, uint64_t hash);
int omni_predict_prefill_stored(omni_predict_t *p, uint32_t inst,
    uint64_t hash, uint64_t now_us);

/*
 * Predicted time (us) until instance inst has finished the prefill work in
 * flight and can start new work at once: 0 when idle; at least min_us while
 * work is in flight; work overdue by X is expected to need X more.
 */
int64_t omni_predict_wait_us(const omni_predict_t *p, uint32_t inst,
    uint64_t now_us);

/*
 * Predicted time (us) until a decode instance can admit a new sequence: 0
 * while batch < max_batch (it joins the next step), else the steps until the
 * sequence with the fewest remaining tokens ends.
 */
int64_t omni_predict_decode_wait_us(const omni_predict_t *p, uint32_t inst,
    uint32_t batch, uint64_t kv_tokens, uint32_t max_batch,
    uint32_t min_remaining_tokens);

/*
 * Predicted end (us, dispatch()'s clock) of the engine's work on the prefill
 * jobs in flight on instance inst, as re-anchored by done() (their answers
 * come back a trip later); 0 when none is in flight.  Unlike wait_us(), an
 * end already past is returned as it is: the work has overrun it.
 */
int64_t omni_predict_end_us(const omni_predict_t *p, uint32_t inst);

/*
 * Whether a prefill of n_new new tokens (predicted at service_us alone:
 * omni_predict_prefill_us()) sent to instance inst now would share the step
 * that the last request sent there waits for (predicted not started yet,
 * and its new tokens with these within step_tokens): 1, with the time until
 * that step starts in *start_us and what these tokens add to it in *cost_us
 * (service_us without the step's fixed cost, as
 * omni_predict_prefill_dispatch() will charge them); 0 when
 * it would not (nothing in flight there included); < 0 on bad arguments.
 */
int omni_predict_join(const omni_predict_t *p, uint32_t inst, uint32_t n_new,
    uint64_t service_us, uint32_t step_tokens, uint64_t now_us,
    uint64_t *start_us, uint64_t *cost_us);

/* Predicted return of the last answer of the prefill jobs in flight on
 * instance inst (their end plus the last one's trip); 0 when none is. */
int64_t omni_predict_answer_us(const omni_predict_t *p, uint32_t inst);

/* OMNI_PREDICT_TRANSFER, once the transfer's time per token is known: the
 * predicted transfer (and trip) of the last prefill job sent to instance
 * inst, which its answer comes after the engine's end, and at least an
 * eighth of the latency of the work in flight there; 0 otherwise, or when
 * none is in flight.  The proxy hears an end no later than that much
 * after it happened: it may be that much earlier than predicted, unseen. */
int64_t omni_predict_transfer_us(const omni_predict_t *p, uint32_t inst);

/* Prefill samples instance inst's model has fitted (0 for an unknown
 * instance): below a few, its predictions are the built-in prior's. */
uint64_t omni_predict_prefill_samples(const omni_predict_t *p, uint32_t inst);

int omni_predict_state(const omni_predict_t *p, uint32_t inst,
    omni_predict_state_t *out);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_PREDICT_H */
