/*
 * Omni Proxy scoring library: per-instance online predictor (omni_predict.h).
 */

#include <math.h>       /* isfinite() only: no libm needed */
#include <string.h>

#include "omni_predict.h"


#define OMNI_PREDICT_MAGIC   0x3244455250494d4fULL   /* "OMIPRED2" */
#define OMNI_PREDICT_LAYOUT  8

/* Predictions are clamped below this (about 11.6 days) before they become
 * integers: a converted double out of range would be undefined. */
#define OMNI_PREDICT_MAX_US  1e12

/* An observation further than this many predictions from the prediction is
 * clipped before it is fitted. */
#define OMNI_PREDICT_CLIP    3.0

/* A queued request that finished within this fraction of its predicted
 * service after the previous one was batched with it: not a clean sample. */
#define OMNI_PREDICT_BATCHED 0.5
/* from dispatch to the engine's step, about: requests sent to an idle
 * instance within this long of each other share its first step */
#define OMNI_PREDICT_REACH_US 1000
/* The trip to an idle engine and back is learned (a line in the prompt's
 * tokens, fitted with the model's forgetting factor) once the model has
 * QUEUED_MIN samples timed from the completion before them (which do not
 * include it).  A sample further than CLIP times the line (plus
 * REACH_CLIP_US) is clipped: one prefill mispredicted for other reasons
 * must not move it much. */
#define OMNI_PREDICT_QUEUED_MIN     16
#define OMNI_PREDICT_REACH_CLIP_US  5000.0

/* Parallel P/D: the share of a prefill's predicted latency (service and
 * trip) taken as its KV transfer before the transfer is learned, and the
 * least counted as one after (omni_predict_transfer_us). */
#define OMNI_PREDICT_XFER_SHARE     8

/* Prefills in flight per instance whose end the engine's KV events can
 * tell (omni_predict_prefill_expect); past it, the oldest gives way. */
#define OMNI_PREDICT_MARKS          16

/* Observations are weighted by SCALE^2 / (time^2 + NOISE_US^2): the fit
 * minimises relative errors, so a 100 ms prefill counts as much as a 5 s one.
 * Unweighted, the few long prefills decide the fit, and the fixed cost (c0)
 * soaks up their noise: it came out three times too large, and every short
 * prefill was predicted several times too long.  Under NOISE_US the timing's
 * own noise (the trip, the engine's step) is as large as the service, and
 * the weight stops growing: weighed in relative terms, an 8 ms sample
 * counted 156 times a 100 ms one, and the short prefills timed low decided
 * the fixed cost (predicted 15-27% short).  The scale keeps the weights of
 * typical observations near 1, against which the prior weighs 1/prior_var. */
#define OMNI_PREDICT_SCALE      100000.0
#define OMNI_PREDICT_NOISE_US   20000.0

/* Built-in priors: a mid-size model on one modern GPU.  Only a starting
 * point; the fit replaces them within a few requests. */
static const double  omni_predict_prefill_default[OMNI_PREDICT_DIM] = {
    15000.0,     /* 15 ms fixed per prefill */
    60000.0,     /* 60 ms per 1k new tokens */
    4000.0,      /* 4 ms per Mi token pairs of attention */
};

static const double  omni_predict_decode_default[OMNI_PREDICT_DIM] = {
    12000.0,     /* 12 ms per step */
    50.0,        /* per running sequence */
    20.0,        /* per 1k KV tokens read */
};


/*
 * A model in information form: the forgetting-weighted normal equations
 * info * coef = rhs, to which the prior adds prior_weight * I and
 * prior_weight * prior at every step (so its weight does not fade).  The
 * matrix is then never singular, directions the inputs do not excite stay at
 * the prior, and nothing winds up: the covariance form of recursive least
 * squares lost positive definiteness on nearly collinear inputs (prompts of
 * similar lengths) and diverged.
 */
typedef struct {
    double    coef[OMNI_PREDICT_DIM];
    double    info[OMNI_PREDICT_DIM * OMNI_PREDICT_DIM];
    double    rhs[OMNI_PREDICT_DIM];
    uint64_t  samples;
    double    mape;
} omni_predict_rls_t;

/* A prefill in flight whose end the engine will tell (its KV events): the
 * block the engine stores last for it, and the job's place in the queue. */
typedef struct {
    uint64_t            hash;
    uint64_t            sent_at_us;    /* 0: free */
    uint64_t            told_us;       /* when the engine told that end
                                          (0: not yet); the mark stays
                                          until the job's answer, which
                                          times its transfer from it */
} omni_predict_mark_t;

typedef struct {
    omni_predict_rls_t  prefill;
    omni_predict_rls_t  decode;
    uint64_t            free_at_us;
    uint64_t            pending_us;   /* predicted service still in flight */
    uint64_t            last_done_us;
    uint64_t            last_tail_us;  /* the trip of the job that came
                                          back at last_done_us ... */
    uint64_t            last_tokens;   /* ... and its prompt tokens */
    uint64_t            xfer_us;       /* OMNI_PREDICT_TRANSFER, the
                                          transfer's time per token not yet
                                          known: how much earlier than its
                                          answer less its trip the last job
                                          sent is taken to free the engine
                                          (omni_predict_xfer_us) */
    uint64_t            tail_start_us; /* predicted start of the step the
                                          last request sent waits for ... */
    uint64_t            tail_tokens;   /* ... and the new tokens sent to it */
    double              reach_us;      /* learned: what a request sent to an
                                          idle instance takes beyond its
                                          service (to the engine and back),
                                          fixed part ... */
    double              reach_k_us;    /* ... and per 1,024 prompt tokens */
    double              reach_sum[5];  /* its fit: forgetting sums of w,
                                          w k, w k^2, w r, w k r */
    uint64_t            tail_us;       /* the trip of the last job sent:
                                          the end of its leg the instance
                                          does not spend on it */
    uint64_t            queued_samples; /* fitted, timed from the one before */
    uint64_t            sent_us;       /* the service sent so far, summed:
                                          a job's place in the queue is the
                                          sum at its dispatch, its own in */
    uint64_t            frontier_us;   /* the place of the newest job
                                          answered: the engine serves in
                                          order, so it is past every job
                                          placed before */
    uint64_t            answer_max_us; /* the latest answer predicted for
                                          the jobs sent since it was idle */
    uint64_t            engine_at_us;  /* the place of the newest job the
                                          engine said it finished (its
                                          last block stored) */
    uint64_t            engine_ends;   /* such ends that moved the
                                          prediction */
    omni_predict_mark_t marks[OMNI_PREDICT_MARKS];
    uint64_t            completion_samples;
    double              completion_mape;
    uint32_t            inflight;
    uint32_t            pad;
} omni_predict_inst_t;

struct omni_predict_s {
    uint64_t            magic;
    uint32_t            layout;
    uint32_t            pad;
    uint64_t            size;
    omni_predict_cfg_t  cfg;     /* resolved */
    uint64_t            off_inst;
    /* OMNI_PREDICT_TRANSFER, one fit for all the instances (the transfer is
     * the network's and the model's, and a run gives each instance few
     * samples) of the jobs timed from the answer before theirs: forgetting
     * sums of x x' (row by row) and of x e, where x = (1, the prompt of the
     * job before, its own prompt), in 1,024 tokens, and e is what the
     * service model left over */
    double              xfer_xx[OMNI_PREDICT_DIM * OMNI_PREDICT_DIM];
    double              xfer_xe[OMNI_PREDICT_DIM];
    double              xfer_k_us;      /* their fit: the part of an answer
                                           per 1,024 prompt tokens that is
                                           its KV transfer ... */
    uint64_t            xfer_samples;   /* ... in use from QUEUED_MIN */
    /* the same from the ends the engines told (their KV events), pooled:
     * forgetting sums of w, w x, w x^2, w d, w x d, where x is a job's
     * prompt in 1,024 tokens and d the time from its told end to its
     * answer (omni_predict_told_fit) */
    double              told_sum[5];
    uint64_t            told_samples;   /* ... in use from QUEUED_MIN, and
                                           then the time per token */
};


static int omni_predict_solve_subset(const double *a, const double *b,
    unsigned free, double *c);
static uint64_t omni_predict_unmark(omni_predict_inst_t *in,
    uint64_t sent_at_us);


static inline omni_predict_inst_t *
omni_predict_insts(const omni_predict_t *p)
{
    return (omni_predict_inst_t *) ((char *) p + p->off_inst);
}


static int
omni_predict_resolve(const omni_predict_cfg_t *in, omni_predict_cfg_t *cfg)
{
    int  i, zero;

    if (in == NULL || in->max_instances == 0
        || in->max_instances > OMNI_PREDICT_MAX_INSTANCES
        || (in->flags & ~OMNI_PREDICT_TRANSFER))
    {
        return OMNI_EINVAL;
    }

    *cfg = *in;

    if (cfg->forget == 0) {
        cfg->forget = 0.98;
    }
    if (cfg->prior_var == 0) {
        cfg->prior_var = 100;
    }
    if (cfg->mape_alpha == 0) {
        cfg->mape_alpha = 0.05;
    }
    if (cfg->min_us == 0) {
        cfg->min_us = 50;
    }

    if (!(cfg->forget > 0.5 && cfg->forget <= 1.0)
        || !(cfg->prior_var > 0 && isfinite(cfg->prior_var))
        || !(cfg->mape_alpha > 0 && cfg->mape_alpha <= 1.0)
        || !(cfg->min_us > 0 && isfinite(cfg->min_us)))
    {
        return OMNI_EINVAL;
    }

    for (zero = 1, i = 0; i < OMNI_PREDICT_DIM; i++) {
        if (!isfinite(cfg->prefill_prior[i])) {
            return OMNI_EINVAL;
        }
        zero &= cfg->prefill_prior[i] == 0;
    }
    if (zero) {
        memcpy(cfg->prefill_prior, omni_predict_prefill_default,
               sizeof(cfg->prefill_prior));
    }

    for (zero = 1, i = 0; i < OMNI_PREDICT_DIM; i++) {
        if (!isfinite(cfg->decode_prior[i])) {
            return OMNI_EINVAL;
        }
        zero &= cfg->decode_prior[i] == 0;
    }
    if (zero) {
        memcpy(cfg->decode_prior, omni_predict_decode_default,
               sizeof(cfg->decode_prior));
    }

    return OMNI_OK;
}


static size_t
omni_predict_off_inst(void)
{
    return (sizeof(omni_predict_t) + 63) & ~(size_t) 63;
}


size_t
omni_predict_size(const omni_predict_cfg_t *cfg)
{
    omni_predict_cfg_t  c;

    if (omni_predict_resolve(cfg, &c) != OMNI_OK) {
        return 0;
    }

    return omni_predict_off_inst()
           + sizeof(omni_predict_inst_t) * (size_t) c.max_instances;
}


static void
omni_predict_rls_init(omni_predict_rls_t *r, const double *prior, double var)
{
    int  i;

    memset(r, 0, sizeof(*r));
    memcpy(r->coef, prior, sizeof(r->coef));
    for (i = 0; i < OMNI_PREDICT_DIM; i++) {
        r->info[i * OMNI_PREDICT_DIM + i] = 1.0 / var;
        r->rhs[i] = prior[i] / var;
    }
}


static void
omni_predict_inst_init(const omni_predict_t *p, omni_predict_inst_t *in)
{
    memset(in, 0, sizeof(*in));
    omni_predict_rls_init(&in->prefill, p->cfg.prefill_prior,
                          p->cfg.prior_var);
    omni_predict_rls_init(&in->decode, p->cfg.decode_prior, p->cfg.prior_var);
}


int
omni_predict_init(void *mem, size_t size, const omni_predict_cfg_t *cfg,
    omni_predict_t **out)
{
    omni_predict_t  *p;
    uint32_t         i;
    int              rc;

    if (mem == NULL || ((uintptr_t) mem & 7) != 0 || out == NULL) {
        return OMNI_EINVAL;
    }
    if (omni_predict_size(cfg) == 0) {
        return OMNI_EINVAL;
    }
    if (size < omni_predict_size(cfg)) {
        return OMNI_ERANGE;
    }

    p = mem;
    memset(p, 0, sizeof(*p));
    rc = omni_predict_resolve(cfg, &p->cfg);
    if (rc != OMNI_OK) {
        return rc;
    }

    p->layout = OMNI_PREDICT_LAYOUT;
    p->size = omni_predict_size(cfg);
    p->off_inst = omni_predict_off_inst();

    for (i = 0; i < p->cfg.max_instances; i++) {
        omni_predict_inst_init(p, &omni_predict_insts(p)[i]);
    }

    p->magic = OMNI_PREDICT_MAGIC;
    *out = p;

    return OMNI_OK;
}


omni_predict_t *
omni_predict_new(const omni_predict_cfg_t *cfg, const omni_allocator_t *a,
    int *rc)
{
    omni_predict_t  *p = NULL;
    size_t           size;
    void            *mem;
    int              r;

    size = omni_predict_size(cfg);
    if (size == 0 || a == NULL || a->alloc == NULL) {
        r = OMNI_EINVAL;
        goto done;
    }

    mem = a->alloc(a->ctx, size);
    if (mem == NULL) {
        r = OMNI_ENOMEM;
        goto done;
    }

    r = omni_predict_init(mem, size, cfg, &p);
    if (r != OMNI_OK) {
        a->free(a->ctx, mem);
        p = NULL;
    }

done:

    if (rc) {
        *rc = r;
    }
    return p;
}


void
omni_predict_free(omni_predict_t *p, const omni_allocator_t *a)
{
    if (p == NULL || a == NULL || a->free == NULL) {
        return;
    }

    p->magic = 0;
    a->free(a->ctx, p);
}


omni_predict_t *
omni_predict_attach(void *mem, size_t size)
{
    omni_predict_t  *p = mem;

    if (mem == NULL || ((uintptr_t) mem & 7) != 0 || size < sizeof(*p)
        || p->magic != OMNI_PREDICT_MAGIC || p->layout != OMNI_PREDICT_LAYOUT
        || p->size > size)
    {
        return NULL;
    }

    return p;
}


void
omni_predict_get_cfg(const omni_predict_t *p, omni_predict_cfg_t *cfg)
{
    *cfg = p->cfg;
}


int
omni_predict_set_flags(omni_predict_t *p, uint32_t flags)
{
    if (p == NULL || (flags & ~OMNI_PREDICT_TRANSFER)) {
        return OMNI_EINVAL;
    }

    p->cfg.flags = flags;
    return OMNI_OK;
}


int
omni_predict_reset(omni_predict_t *p, uint32_t inst)
{
    if (p == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    omni_predict_inst_init(p, &omni_predict_insts(p)[inst]);
    return OMNI_OK;
}


/* ---- recursive least squares ------------------------------------------ */

static inline void
omni_predict_prefill_x(double *x, uint32_t n_new, uint32_t n_cached)
{
    double  n = n_new, m = n_cached;

    x[0] = 1.0;
    x[1] = n / 1024.0;
    x[2] = n * (m + n / 2.0) / 1048576.0;
}


static inline void
omni_predict_decode_x(double *x, uint32_t batch, uint64_t kv_tokens)
{
    x[0] = 1.0;
    x[1] = (double) batch;
    x[2] = (double) kv_tokens / 1024.0;
}


static inline double
omni_predict_dot(const double *a, const double *b)
{
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}


static inline double
omni_predict_abs(double v)
{
    return v < 0 ? -v : v;
}


static inline double
omni_predict_floor(const omni_predict_t *p, double y)
{
    return y > p->cfg.min_us ? y : p->cfg.min_us;
}


/* When the engine is done with the work sent (predicted): a trip before its
 * last answer comes back (a parallel leg's includes its KV transfer, which
 * the engine overlaps with its next step), and while the transfer's time is
 * not known, the exploration's margin before that. */
static inline uint64_t
omni_predict_busy(const omni_predict_inst_t *in)
{
    uint64_t  t = in->tail_us + in->xfer_us;

    return in->free_at_us > t ? in->free_at_us - t : 0;
}


static inline int
omni_predict_xfer_known(const omni_predict_t *p)
{
    return (p->cfg.flags & OMNI_PREDICT_TRANSFER)
           && (p->xfer_samples >= OMNI_PREDICT_QUEUED_MIN
               || p->told_samples >= OMNI_PREDICT_QUEUED_MIN);
}


/* The trip of a job of n prompt tokens (cached ones too: a parallel leg
 * transfers the KV of the whole prompt). */
static inline uint64_t
omni_predict_reach(const omni_predict_t *p, const omni_predict_inst_t *in,
    uint64_t n)
{
    double  a, r;

    if (omni_predict_xfer_known(p)) {
        /* the time per token is the transfer's; the requests sent to an
         * idle instance give the rest (their trips less the transfers) */
        a = in->reach_sum[0] > 0
            ? (in->reach_sum[3] - p->xfer_k_us * in->reach_sum[1])
              / in->reach_sum[0]
            : in->reach_us;
        r = (a > 0 ? a : 0) + p->xfer_k_us * ((double) n / 1024.0);

    } else {
        r = in->reach_us + in->reach_k_us * ((double) n / 1024.0);
    }

    if (!(r > 0)) {
        return 0;
    }

    return (uint64_t) (r < OMNI_PREDICT_MAX_US ? r : OMNI_PREDICT_MAX_US);
}


/*
 * One sample (x, y) into the forgetting sums of a line y = a + b x
 * (s: w, w x, w x^2, w y, w x y); its slope into *b when the x seen vary
 * enough to tell one (1), else 0.
 */
static int
omni_predict_line_add(double *s, double lambda, double x, double y,
    double *b)
{
    double  det;

    s[0] = lambda * s[0] + 1.0;
    s[1] = lambda * s[1] + x;
    s[2] = lambda * s[2] + x * x;
    s[3] = lambda * s[3] + y;
    s[4] = lambda * s[4] + x * y;

    det = s[0] * s[2] - s[1] * s[1];
    if (!(det > 1e-6 * s[0] * s[2])) {
        return 0;
    }

    *b = (s[0] * s[4] - s[1] * s[3]) / det;
    return 1;
}


/*
 * One trip observed: r us beyond the service of a job of n prompt tokens
 * sent to an idle instance.  Weighted least squares of r = a + b k (k: n in
 * units of 1,024 tokens), forgetting old samples, neither coefficient below
 * 0 (then the other is fitted alone).
 */
static void
omni_predict_reach_fit(const omni_predict_t *p, omni_predict_inst_t *in,
    uint64_t n, double r)
{
    double  lim, *s = in->reach_sum;

    lim = (1.0 + OMNI_PREDICT_CLIP) * (double) omni_predict_reach(p, in, n)
          + OMNI_PREDICT_REACH_CLIP_US;
    r = r < 0 ? 0 : (r > lim ? lim : r);

    if (omni_predict_line_add(s, p->cfg.forget, (double) n / 1024.0, r,
                              &in->reach_k_us))
    {
        in->reach_us = (s[3] - in->reach_k_us * s[1]) / s[0];

    } else {
        /* all of one size so far: no slope */
        in->reach_k_us = 0;
        in->reach_us = s[3] / s[0];
    }

    if (in->reach_k_us < 0) {
        in->reach_k_us = 0;
        in->reach_us = s[3] / s[0];

    } else if (in->reach_us < 0) {
        in->reach_us = 0;
        in->reach_k_us = s[2] > 0 ? s[4] / s[2] : 0;
    }
}


/*
 * OMNI_PREDICT_TRANSFER: the KV transfer's time per prompt token (k per
 * 1,024), from the jobs that waited for the one before them.  A job's work
 * on the engine and its transfer both grow with its prompt, and its answer
 * alone cannot tell them apart (a request sent to an idle instance shows
 * their sum, and no more).  But a job that waited answers its service after
 * the end of the work before it, and the answer before came that one's
 * transfer after that end: the time y between the two answers is its
 * service plus its transfer, less the transfer of the one before.  So what
 * the service model leaves over of y falls by k for each 1,024 tokens of
 * the prompt before, which has nothing to do with this job's own work.
 * Fitted on that prompt, on this job's own (whose coefficient takes the
 * model's errors and this job's transfer, so that prompts of alike sizes in
 * a row do not bias it) and on a constant, the first coefficient is -k.
 * Without it the instance counted busy until each answer, through every
 * transfer, and the next request went out after it (docs/scheduler.md,
 * "Parallel P/D: the transfer counted busy").
 */
static void
omni_predict_xfer_fit(omni_predict_t *p, const omni_predict_inst_t *in,
    uint64_t n, double y, double predicted)
{
    int     a, b;
    double  lambda = p->cfg.forget, x[OMNI_PREDICT_DIM], c[OMNI_PREDICT_DIM],
            e, lim, det, *m = p->xfer_xx;

    x[0] = 1.0;
    x[1] = (double) in->last_tokens / 1024.0;
    x[2] = (double) n / 1024.0;

    /* one service mispredicted for other reasons must not move it much */
    e = y - predicted;
    lim = OMNI_PREDICT_CLIP * predicted;
    e = e > lim ? lim : (e < -lim ? -lim : e);

    for (a = 0; a < OMNI_PREDICT_DIM; a++) {
        for (b = 0; b < OMNI_PREDICT_DIM; b++) {
            m[a * OMNI_PREDICT_DIM + b] = lambda * m[a * OMNI_PREDICT_DIM + b]
                                          + x[a] * x[b];
        }
        p->xfer_xe[a] = lambda * p->xfer_xe[a] + x[a] * e;
    }

    det = m[0] * (m[4] * m[8] - m[5] * m[7])
          - m[1] * (m[3] * m[8] - m[5] * m[6])
          + m[2] * (m[3] * m[7] - m[4] * m[6]);

    if (!(det > 1e-9 * m[0] * m[4] * m[8])
        || omni_predict_solve_subset(m, p->xfer_xe,
                                     (1u << OMNI_PREDICT_DIM) - 1, c)
           != OMNI_OK)
    {
        return;                     /* the sizes do not vary enough yet */
    }

    if (p->told_samples < OMNI_PREDICT_QUEUED_MIN) {
        p->xfer_k_us = c[1] < 0 ? -c[1] : 0;
    }

    p->xfer_samples++;
}


/*
 * OMNI_PREDICT_TRANSFER with the engines' KV events: a job whose end the
 * engine told (its last block stored) answers its transfer and the way
 * back after that end, and the events came some ms after it (the agent's
 * flush).  So d, from the told end to the answer, is the transfer of its
 * n prompt tokens plus a trip less a lag: a line in n, whose slope is the
 * transfer's time per token, and whose intercept takes the trip and the
 * lag.  Unlike the fit from the gaps between answers (above), the engine's
 * service is not in it: live, with the agent, the proxy sends the next
 * request at the told end, few jobs are timed from the answer before, and
 * the service's own errors (tens of percent) swamp those few (the gap fit
 * learned 0.3-3.9 ms per 1k tokens against 5.3 on the Mooncake trace).
 * Once it has QUEUED_MIN samples, this fit gives the time per token.
 */
static void
omni_predict_told_fit(omni_predict_t *p, uint64_t n, double d)
{
    double  k;

    if (!omni_predict_line_add(p->told_sum, p->cfg.forget,
                               (double) n / 1024.0, d, &k))
    {
        return;                     /* the sizes do not vary enough yet */
    }

    p->told_samples++;

    if (p->told_samples >= OMNI_PREDICT_QUEUED_MIN) {
        p->xfer_k_us = k > 0 ? k : 0;
    }
}


/*
 * The service of a job timed from the answer before it (y, OMNI_PREDICT_
 * TRANSFER): y less the difference of the two transfers, once the time per
 * token is known (by at most half of y: one wrong slope must not wreck
 * the model).  The service model then learns the engine's work alone, and
 * the transfer is the trip's (omni_predict_reach).
 */
static double
omni_predict_xfer_service(const omni_predict_t *p,
    const omni_predict_inst_t *in, const omni_predict_job_t *job, double y)
{
    double  d;

    if (!omni_predict_xfer_known(p)) {
        return y;
    }

    d = p->xfer_k_us * (((double) job->n_new + job->n_cached
                         - (double) in->last_tokens) / 1024.0);
    d = d > y / 2 ? y / 2 : (d < -y / 2 ? -y / 2 : d);

    return y - d;
}


/*
 * The service of a job sent to an idle engine (OMNI_PREDICT_TRANSFER): its
 * latency less its own transfer, once the time per token is known (-1
 * before, or when the transfer would take more than half of it: one wrong
 * slope must not wreck the model).
 */
static double
omni_predict_xfer_service_alone(const omni_predict_t *p,
    const omni_predict_job_t *job, double latency)
{
    double  d;

    if (!omni_predict_xfer_known(p)) {
        return -1;
    }

    d = p->xfer_k_us * (((double) job->n_new + job->n_cached) / 1024.0);

    return d > latency / 2 ? -1 : latency - d;
}


/*
 * OMNI_PREDICT_TRANSFER, until the transfer's time per token is known: a job
 * frees the engine an eighth of its predicted latency before its answer
 * less its trip, so that some jobs go out while the engine still works,
 * which is what times the transfer (sent only after each answer, every job
 * looks sent to an idle engine).
 */
static uint64_t
omni_predict_xfer_us(const omni_predict_t *p, uint64_t service, uint64_t tail)
{
    if (!(p->cfg.flags & OMNI_PREDICT_TRANSFER) || omni_predict_xfer_known(p)) {
        return 0;
    }

    return (service + tail) / OMNI_PREDICT_XFER_SHARE;
}


static void
omni_predict_mape(const omni_predict_t *p, double *mape, uint64_t n,
    double predicted, double actual)
{
    double  err = omni_predict_abs(predicted - actual)
                  / (actual > p->cfg.min_us ? actual : p->cfg.min_us);

    *mape = n == 0 ? err : *mape + p->cfg.mape_alpha * (err - *mape);
}


/*
 * Solve info * c = rhs for the coefficients in `free` (a bit mask), the
 * others being 0, by Gaussian elimination with partial pivoting.
 */
static int
omni_predict_solve_subset(const double *a, const double *b, unsigned free,
    double *c)
{
    double  m[OMNI_PREDICT_DIM][OMNI_PREDICT_DIM + 1], t, f;
    int     idx[OMNI_PREDICT_DIM], n = 0, i, j, k, piv;

    for (i = 0; i < OMNI_PREDICT_DIM; i++) {
        c[i] = 0;
        if (free & (1u << i)) {
            idx[n++] = i;
        }
    }

    for (i = 0; i < n; i++) {
        for (j = 0; j < n; j++) {
            m[i][j] = a[idx[i] * OMNI_PREDICT_DIM + idx[j]];
        }
        m[i][n] = b[idx[i]];
    }

    for (k = 0; k < n; k++) {
        piv = k;
        for (i = k + 1; i < n; i++) {
            if (omni_predict_abs(m[i][k]) > omni_predict_abs(m[piv][k])) {
                piv = i;
            }
        }
        if (!(omni_predict_abs(m[piv][k]) > 1e-300)) {
            return OMNI_EINVAL;
        }
        for (j = 0; j <= n; j++) {
            t = m[k][j]; m[k][j] = m[piv][j]; m[piv][j] = t;
        }
        for (i = k + 1; i < n; i++) {
            f = m[i][k] / m[k][k];
            for (j = k; j <= n; j++) {
                m[i][j] -= f * m[k][j];
            }
        }
    }

    for (k = n - 1; k >= 0; k--) {
        t = m[k][n];
        for (j = k + 1; j < n; j++) {
            t -= m[k][j] * c[idx[j]];
        }
        c[idx[k]] = t / m[k][k];
        if (!isfinite(c[idx[k]])) {
            return OMNI_EINVAL;
        }
    }

    return OMNI_OK;
}


/*
 * Least squares with every coefficient >= 0 (every term is a cost: a fixed
 * overhead, per token, per token pair; a negative attention term would make
 * a long prompt look free).  Active set: solve, fix the most negative
 * coefficient at 0, solve the rest again; three coefficients, three passes.
 */
static int
omni_predict_solve(const double *a, const double *b, double *c)
{
    unsigned  free = (1u << OMNI_PREDICT_DIM) - 1;
    int       pass, i, worst;

    for (pass = 0; pass < OMNI_PREDICT_DIM; pass++) {
        if (omni_predict_solve_subset(a, b, free, c) != OMNI_OK) {
            return OMNI_EINVAL;
        }
        worst = -1;
        for (i = 0; i < OMNI_PREDICT_DIM; i++) {
            if ((free & (1u << i)) && c[i] < 0
                && (worst < 0 || c[i] < c[worst]))
            {
                worst = i;
            }
        }
        if (worst < 0) {
            return OMNI_OK;
        }
        free &= ~(1u << worst);
    }

    for (i = 0; i < OMNI_PREDICT_DIM; i++) {
        c[i] = 0;
    }
    return OMNI_OK;
}


static void
omni_predict_rls_update(const omni_predict_t *p, omni_predict_rls_t *r,
    const double *prior, const double *x, double y)
{
    double  lambda = p->cfg.forget, w = 1.0 / p->cfg.prior_var;
    double  pred, lim, v, c[OMNI_PREDICT_DIM];
    int     i, j;

    if (!isfinite(y) || y < 0) {
        return;
    }

    pred = omni_predict_floor(p, omni_predict_dot(r->coef, x));
    omni_predict_mape(p, &r->mape, r->samples, pred, y);

    /* One stalled request must not wreck the fit: clip it. */
    lim = (1.0 + OMNI_PREDICT_CLIP) * pred;
    if (y > lim) {
        y = lim;
    }

    v = OMNI_PREDICT_SCALE * OMNI_PREDICT_SCALE
        / (y * y + OMNI_PREDICT_NOISE_US * OMNI_PREDICT_NOISE_US);

    for (i = 0; i < OMNI_PREDICT_DIM; i++) {
        for (j = 0; j < OMNI_PREDICT_DIM; j++) {
            r->info[i * OMNI_PREDICT_DIM + j] =
                lambda * r->info[i * OMNI_PREDICT_DIM + j] + v * x[i] * x[j]
                + (i == j ? (1.0 - lambda) * w : 0.0);
        }
        r->rhs[i] = lambda * r->rhs[i] + v * x[i] * y
                    + (1.0 - lambda) * w * prior[i];
    }

    if (omni_predict_solve(r->info, r->rhs, c) == OMNI_OK) {
        memcpy(r->coef, c, sizeof(c));
    }

    r->samples++;
}


/*
 * One prefill's sample.  A prompt so short that its tokens' part of the
 * service (by the larger of the prior's and the fitted costs) is under the
 * timing noise tells the fixed cost only: it is fitted on the fixed term,
 * less what the model gives its tokens.  Fitted whole, two such samples
 * decided the costs per token: 10 and 8 ms at 2 and 31 tokens are a slope
 * below 0, the costs went to 0, and prompts of 17-56k tokens were predicted
 * at 9 ms (docs/scheduler.md, "A prefill model that tiny prompts collapse").
 * A sample shorter than the fitted tokens' part alone is fitted whole: it
 * says the costs per token are too high (an engine faster than the prior on
 * short prompts), which the fixed cost, already at 0, cannot take up; fitted
 * on the fixed cost only, 250-token prompts answered in 0.2 ms stayed
 * predicted at 14 ms and every request was held.
 */
static void
omni_predict_prefill_fit(const omni_predict_t *p, omni_predict_rls_t *r,
    const double *x, double y)
{
    const double  *prior = p->cfg.prefill_prior;
    double         fixed[OMNI_PREDICT_DIM], by_prior, by_fit;

    by_prior = prior[1] * x[1] + prior[2] * x[2];
    by_fit = r->coef[1] * x[1] + r->coef[2] * x[2];

    if ((by_prior > by_fit ? by_prior : by_fit) >= OMNI_PREDICT_NOISE_US
        || y < by_fit)
    {
        omni_predict_rls_update(p, r, prior, x, y);
        return;
    }

    fixed[0] = x[0];
    fixed[1] = 0;
    fixed[2] = 0;
    y -= by_fit;
    omni_predict_rls_update(p, r, prior, fixed, y > 0 ? y : 0);
}


static int64_t
omni_predict_eval(const omni_predict_t *p, const double *coef, const double *x)
{
    double  y = omni_predict_floor(p, omni_predict_dot(coef, x));

    return (int64_t) (y < OMNI_PREDICT_MAX_US ? y : OMNI_PREDICT_MAX_US);
}


int64_t
omni_predict_prefill_us(const omni_predict_t *p, uint32_t inst,
    uint32_t n_new, uint32_t n_cached)
{
    double  x[OMNI_PREDICT_DIM];

    if (p == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    omni_predict_prefill_x(x, n_new, n_cached);
    return omni_predict_eval(p, omni_predict_insts(p)[inst].prefill.coef, x);
}


int64_t
omni_predict_decode_step_us(const omni_predict_t *p, uint32_t inst,
    uint32_t batch, uint64_t kv_tokens)
{
    double  x[OMNI_PREDICT_DIM];

    if (p == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    omni_predict_decode_x(x, batch, kv_tokens);
    return omni_predict_eval(p, omni_predict_insts(p)[inst].decode.coef, x);
}


int
omni_predict_observe_prefill(omni_predict_t *p, uint32_t inst,
    uint32_t n_new, uint32_t n_cached, uint64_t service_us)
{
    double  x[OMNI_PREDICT_DIM];

    if (p == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    omni_predict_prefill_x(x, n_new, n_cached);
    omni_predict_prefill_fit(p, &omni_predict_insts(p)[inst].prefill, x,
                             (double) service_us);
    return OMNI_OK;
}


int
omni_predict_observe_decode(omni_predict_t *p, uint32_t inst,
    uint32_t batch, uint64_t kv_tokens, uint64_t step_us)
{
    double  x[OMNI_PREDICT_DIM];

    if (p == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    omni_predict_decode_x(x, batch, kv_tokens);
    omni_predict_rls_update(p, &omni_predict_insts(p)[inst].decode,
                            p->cfg.decode_prior, x, (double) step_us);
    return OMNI_OK;
}


/* ---- prefill work in flight ---------------------------------------------- */

/* A prefill's service when it shares a step sent before it: its tokens
 * only, that step's fixed cost being paid already. */
static inline int64_t
omni_predict_shared_service(const omni_predict_t *p,
    const omni_predict_inst_t *in, int64_t service)
{
    return (int64_t) omni_predict_floor(p, (double) service
                                           - in->prefill.coef[0]);
}


int
omni_predict_prefill_dispatch(omni_predict_t *p, uint32_t inst,
    uint32_t n_new, uint32_t n_cached, uint64_t now_us,
    omni_predict_job_t *job)
{
    omni_predict_inst_t  *in;
    uint64_t              start, base, busy, tail;
    int64_t               service;
    uint32_t              shared;

    if (p == NULL || job == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_predict_insts(p)[inst];
    service = omni_predict_prefill_us(p, inst, n_new, n_cached);
    tail = omni_predict_reach(p, in, (uint64_t) n_new + n_cached);
    if (tail > UINT32_MAX) {
        tail = UINT32_MAX;
    }
    shared = 0;

    /* the engine is busy until the work sent before ends, not until that
     * work's answer is back */
    busy = omni_predict_busy(in);

    if (in->inflight > 0 && busy > now_us) {
        start = busy;

        if (now_us < in->tail_start_us) {
            /* The request sent before it still waits for its step: this
             * one joins that step, which costs its tokens, not another
             * step's fixed cost. */
            start = in->tail_start_us;
            shared = 1;
            service = omni_predict_shared_service(p, in, service);
            in->tail_tokens += n_new;
        } else {
            in->tail_start_us = start;
            in->tail_tokens = n_new;
        }

        base = busy;

    } else {
        /* An idle engine starts a step as soon as the request reaches it;
         * what is sent in the meantime joins it.  Its answer comes after
         * the trip there and back (and a parallel leg's KV transfer),
         * which the step of a request already waiting in the engine hides,
         * and which does not keep the engine busy. */
        start = now_us;
        base = now_us;
        in->tail_start_us = now_us + OMNI_PREDICT_REACH_US;
        in->tail_tokens = n_new;
    }

    job->n_new = n_new;
    job->n_cached = n_cached;
    job->dispatch_us = now_us;
    job->start_us = start;
    job->service_us = (uint64_t) service;
    job->done_us = base + (uint64_t) service + tail;
    job->shared = shared;
    job->tail_us = (uint32_t) tail;

    in->free_at_us = job->done_us;
    in->tail_us = tail;

    in->xfer_us = omni_predict_xfer_us(p, (uint64_t) service, tail);
    in->pending_us += (uint64_t) service;
    in->sent_us += (uint64_t) service;
    job->sent_at_us = in->sent_us;
    if (job->done_us > in->answer_max_us) {
        in->answer_max_us = job->done_us;
    }
    in->inflight++;

    return OMNI_OK;
}


int
omni_predict_prefill_done(omni_predict_t *p, uint32_t inst,
    const omni_predict_job_t *job, uint64_t done_us, int ok)
{
    omni_predict_inst_t  *in;
    uint64_t              start, service, latency, after, told;
    double                x[OMNI_PREDICT_DIM], r, y;
    int                   newest, in_order;

    if (p == NULL || job == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_predict_insts(p)[inst];

    /*
     * The engine serves in order; the answers need not come back in order.
     * A parallel leg's answer comes after its KV transfer, which grows with
     * its prompt, so a short prompt sent behind a long one is often back
     * first.  The newest job answered (the frontier) tells how far the
     * engine is: every job sent before it is done too, whether its answer
     * is back or not.  A job answered right after the one before it is
     * in order, and only such a job is timed from that one's answer.  A
     * failed job says nothing of the engine (it may never have reached it).
     */
    newest = ok && job->sent_at_us > in->frontier_us;
    in_order = job->sent_at_us - job->service_us == in->frontier_us;

    told = omni_predict_unmark(in, job->sent_at_us);

    if (ok && told != 0 && done_us >= told
        && (p->cfg.flags & OMNI_PREDICT_TRANSFER))
    {
        omni_predict_told_fit(p, (uint64_t) job->n_new + job->n_cached,
                              (double) (done_us - told));
    }

    if (ok && done_us >= job->dispatch_us) {
        latency = done_us - job->dispatch_us;
        omni_predict_mape(p, &in->completion_mape, in->completion_samples,
                          (double) (job->done_us - job->dispatch_us),
                          (double) latency);
        in->completion_samples++;

        /*
         * Serial service: it started when it arrived or when the request
         * before it finished, whichever was later.  That one finished a
         * trip before its answer came back (a parallel leg's KV transfer
         * and the way back): a job sent after that found the engine free,
         * and is timed as sent to an idle one.  Timed from the answer
         * instead, the trip went into the service model and out of the
         * learned trip, so the instance counted busy through every
         * transfer and the next job was sent that much late, each time
         * (docs/scheduler.md, "Parallel P/D: the transfer counted busy").
         */
        start = job->dispatch_us;
        if (in->last_done_us > start && in->last_done_us <= done_us
            && start + in->last_tail_us < in->last_done_us)
        {
            start = in->last_done_us;
        }
        service = done_us - start;

        omni_predict_prefill_x(x, job->n_new, job->n_cached);

        /* a request that shared a step is not timed on its own, nor one
         * answered out of order (its place in the engine is not known) */
        if (job->shared || !in_order) {
            /* nothing to learn */

        } else if (start != job->dispatch_us) {
            /* timed from the completion of the one before: its service
             * and the difference of the two trips */
            if ((double) service >= OMNI_PREDICT_BATCHED
                                    * (double) job->service_us)
            {
                y = (double) service;

                if (p->cfg.flags & OMNI_PREDICT_TRANSFER) {
                    omni_predict_xfer_fit(p, in,
                        (uint64_t) job->n_new + job->n_cached, y,
                        omni_predict_floor(p, omni_predict_dot(
                                                  in->prefill.coef, x)));
                    y = omni_predict_xfer_service(p, in, job, y);
                }

                omni_predict_prefill_fit(p, &in->prefill, x, y);
                in->queued_samples++;
            }

        } else {
            /*
             * It waited for nobody: its latency is the trip to the engine
             * and back plus its service.  Once the model has the others
             * (QUEUED_MIN of them), what it leaves over is the trip.  Its
             * median is tracked (a step towards each sample), so a prefill
             * mispredicted for other reasons moves it by one step only.
             */
            if (in->queued_samples >= OMNI_PREDICT_QUEUED_MIN) {
                r = (double) latency
                    - omni_predict_floor(p, omni_predict_dot(in->prefill.coef,
                                                             x));
                omni_predict_reach_fit(p, in,
                                       (uint64_t) job->n_new + job->n_cached,
                                       r);
            }

            /*
             * And once the transfer's time per token is known (parallel
             * P/D), its latency less its transfer is its service (with the
             * short trip, which the fixed cost takes).  The jobs timed from
             * the answer before them are few there (the answers of short
             * prompts sent behind long ones come out of order); without
             * these the model kept the first 16 jobs' fit, transfers
             * included, and an engine that slowed down while every request
             * reached it idle looked like a longer trip and counted free
             * too early (docs/scheduler.md, "Parallel P/D: counted free a
             * transfer early").  Before the model has the others, it takes
             * the whole latency.
             */
            y = omni_predict_xfer_service_alone(p, job, (double) latency);
            if (y > 0) {
                omni_predict_prefill_fit(p, &in->prefill, x, y);

            } else if (in->queued_samples < OMNI_PREDICT_QUEUED_MIN) {
                omni_predict_prefill_fit(p, &in->prefill, x,
                                         (double) service);
            }
        }
    }

    if (newest) {
        /* the one the next job is timed from (an older job's answer,
         * late, has nothing to do with the next job's start) */
        in->frontier_us = job->sent_at_us;
        in->last_done_us = done_us;
        in->last_tail_us = job->tail_us
                           + omni_predict_xfer_us(p, job->service_us,
                                                  job->tail_us);
        in->last_tokens = (uint64_t) job->n_new + job->n_cached;
    }

    if (in->inflight > 0) {
        in->inflight--;
    }
    in->pending_us = in->pending_us > job->service_us
                     ? in->pending_us - job->service_us : 0;

    /* Re-anchor on what really happened: the work still in flight needs its
     * predicted service, one job after the other, from the end of this
     * one's (its answer less its trip), and the last one's trip. */
    if (in->inflight == 0) {
        in->pending_us = 0;
        in->tail_us = 0;
        in->xfer_us = 0;
        in->free_at_us = done_us;
        in->frontier_us = in->sent_us;
        in->engine_at_us = in->sent_us;
        in->answer_max_us = 0;
        memset(in->marks, 0, sizeof(in->marks));

    } else if (newest && job->sent_at_us <= in->engine_at_us) {
        /* the engine told its end already (its KV events, a transfer and
         * a trip before this answer): that end stands, not one derived
         * from the answer less a predicted transfer */

    } else if (newest) {
        /* the work left is what was sent after it: the jobs sent before it
         * and still in flight are past the engine, in their transfers
         * (counting them, the instance looked busy for their service once
         * more after this one's end: seconds, when a short prompt overtook
         * a long one) */
        after = in->sent_us - job->sent_at_us;
        in->free_at_us = (done_us > job->tail_us ? done_us - job->tail_us : 0)
                         + (after < in->pending_us ? after : in->pending_us)
                         + in->tail_us;

    } else if (!ok && job->sent_at_us > in->frontier_us) {
        /* a failed job not yet passed by the engine: the work left loses
         * its service (it may never have reached the engine; how much of
         * it ran is not known) */
        in->free_at_us = in->free_at_us > done_us + job->service_us
                         ? in->free_at_us - job->service_us : done_us;
    }

    /* (an older job answered late: nothing moves) */

    return OMNI_OK;
}


/* The mark of the job at place sent_at goes (answered, failed); when the
 * engine told its end, that instant (else 0). */
static uint64_t
omni_predict_unmark(omni_predict_inst_t *in, uint64_t sent_at_us)
{
    size_t    i;
    uint64_t  told = 0;

    for (i = 0; i < OMNI_PREDICT_MARKS; i++) {
        if (in->marks[i].sent_at_us == sent_at_us) {
            told = in->marks[i].told_us;
            in->marks[i].sent_at_us = 0;
            in->marks[i].hash = 0;
            in->marks[i].told_us = 0;
        }
    }

    return told;
}


int
omni_predict_prefill_expect(omni_predict_t *p, uint32_t inst,
    const omni_predict_job_t *job, uint64_t hash)
{
    omni_predict_inst_t  *in;
    omni_predict_mark_t  *m;
    size_t                i;

    if (p == NULL || job == NULL || inst >= p->cfg.max_instances
        || job->sent_at_us == 0)
    {
        return OMNI_EINVAL;
    }

    in = &omni_predict_insts(p)[inst];

    /* a free entry, else the oldest job's (its answer still comes) */
    m = &in->marks[0];

    for (i = 0; i < OMNI_PREDICT_MARKS; i++) {
        if (in->marks[i].sent_at_us == 0) {
            m = &in->marks[i];
            break;
        }

        if (in->marks[i].sent_at_us < m->sent_at_us) {
            m = &in->marks[i];
        }
    }

    m->hash = hash;
    m->sent_at_us = job->sent_at_us;
    m->told_us = 0;

    return OMNI_OK;
}


int
omni_predict_prefill_stored(omni_predict_t *p, uint32_t inst, uint64_t hash,
    uint64_t now_us)
{
    omni_predict_inst_t  *in;
    omni_predict_mark_t  *m;
    uint64_t              at, after, end;
    size_t                i;

    if (p == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_predict_insts(p)[inst];

    /* the oldest job waiting for this block (the same prompt sent twice:
     * the engine stores it for the first, and finds it cached for the
     * second) */
    m = NULL;

    for (i = 0; i < OMNI_PREDICT_MARKS; i++) {
        if (in->marks[i].sent_at_us != 0 && in->marks[i].told_us == 0
            && in->marks[i].hash == hash
            && (m == NULL || in->marks[i].sent_at_us < m->sent_at_us))
        {
            m = &in->marks[i];
        }
    }

    if (m == NULL) {
        return 0;
    }

    /* the mark stays, told, until the answer: the time between the two
     * is the job's transfer (omni_predict_told_fit) */
    at = m->sent_at_us;
    m->told_us = now_us > 0 ? now_us : 1;

    /* older news than an answer or an end already heard */
    if (in->inflight == 0 || at <= in->frontier_us || at <= in->engine_at_us) {
        return 0;
    }

    /*
     * The engine served in order up to this job and is on the work sent
     * after it now.  Its answer comes after its KV transfer (in parallel
     * P/D), which the prediction of the engine's end then no longer depends
     * on.  The events come some ms after the end (the agent's flush): an
     * end told later than predicted is that lag as much as a slow engine,
     * and moving the end later by it would hold the next request back for
     * it (the overrun rule and the answers see a slow engine); only an
     * earlier end is taken.
     */
    after = in->sent_us - at;
    if (after > in->pending_us) {
        after = in->pending_us;
    }

    end = now_us + after + in->tail_us + in->xfer_us;
    if (end >= in->free_at_us) {
        return 0;
    }

    in->engine_at_us = at;
    in->free_at_us = end;
    in->engine_ends++;

    return 1;
}


/* The instance a query about its prefills in flight is about, or NULL with
 * the query's answer in *rc: OMNI_EINVAL, or 0 when none is in flight. */
static const omni_predict_inst_t *
omni_predict_in_flight(const omni_predict_t *p, uint32_t inst, int64_t *rc)
{
    const omni_predict_inst_t  *in;

    if (p == NULL || inst >= p->cfg.max_instances) {
        *rc = OMNI_EINVAL;
        return NULL;
    }

    in = &omni_predict_insts(p)[inst];
    if (in->inflight == 0) {
        *rc = 0;
        return NULL;
    }

    return in;
}


int64_t
omni_predict_wait_us(const omni_predict_t *p, uint32_t inst, uint64_t now_us)
{
    const omni_predict_inst_t  *in;
    uint64_t                    busy;
    int64_t                     rc;

    in = omni_predict_in_flight(p, inst, &rc);
    if (in == NULL) {
        return rc;
    }

    /* the engine's work ends a trip before its answer comes back */
    busy = omni_predict_busy(in);
    if (busy > now_us + (uint64_t) p->cfg.min_us) {
        return (int64_t) (busy - now_us);
    }

    /*
     * Nearly done or overdue: still busy.  Work that has overrun its
     * prediction by X is expected to need about X more (the longer it has
     * overrun, the less the prediction says), so an instance that hangs
     * looks busier with every moment rather than "free in min_us" forever,
     * and the requests waiting for it go elsewhere once that costs less.
     */
    if (now_us > in->free_at_us + (uint64_t) p->cfg.min_us) {
        return (int64_t) (now_us - in->free_at_us);
    }

    return (int64_t) p->cfg.min_us;
}


int
omni_predict_join(const omni_predict_t *p, uint32_t inst, uint32_t n_new,
    uint64_t service_us, uint32_t step_tokens, uint64_t now_us,
    uint64_t *start_us, uint64_t *cost_us)
{
    const omni_predict_inst_t  *in;
    int64_t                     rc;

    if (start_us == NULL || cost_us == NULL) {
        return OMNI_EINVAL;
    }

    /* nothing in flight: no step to share (the request starts one) */
    in = omni_predict_in_flight(p, inst, &rc);
    if (in == NULL) {
        return (int) rc;
    }

    /* the same test as omni_predict_prefill_dispatch()'s shared step */
    if (omni_predict_busy(in) <= now_us || now_us >= in->tail_start_us
        || in->tail_tokens + n_new > step_tokens)
    {
        return 0;
    }

    *start_us = in->tail_start_us - now_us;
    *cost_us = (uint64_t) omni_predict_shared_service(p, in,
                                                      (int64_t) service_us);
    return 1;
}


int64_t
omni_predict_end_us(const omni_predict_t *p, uint32_t inst)
{
    uint64_t                    busy;
    const omni_predict_inst_t  *in;
    int64_t                     rc;

    in = omni_predict_in_flight(p, inst, &rc);
    if (in == NULL) {
        return rc;
    }

    busy = omni_predict_busy(in);

    return (int64_t) (busy > 0 ? busy : 1);
}


int64_t
omni_predict_transfer_us(const omni_predict_t *p, uint32_t inst)
{
    const omni_predict_inst_t  *in;
    int64_t                     rc;
    uint64_t                    least;

    in = omni_predict_in_flight(p, inst, &rc);
    if (in == NULL) {
        return rc;
    }

    if (!omni_predict_xfer_known(p)) {
        return 0;
    }

    /*
     * Never less than the share of the work's latency the model gives the
     * transfer before it has learned one (omni_predict_xfer_us()).  Learned
     * from the gaps between answers, the transfer came out at 0.4-4.8 ms
     * per 1k tokens against 5.3 on section 1's trace in parallel P/D (the
     * proxy sends just in time, which leaves that fit few clean samples);
     * near 0, a service predicted long idled the engine through every
     * transfer, and those runs had the highest TTFTs (docs/scheduler.md,
     * "Parallel P/D without the agent").  Counted free too early, a
     * request waits in the engine instead, which costs the engine nothing.
     */
    least = (in->pending_us + in->tail_us) / OMNI_PREDICT_XFER_SHARE;

    return (int64_t) (in->tail_us > least ? in->tail_us : least);
}


int64_t
omni_predict_answer_us(const omni_predict_t *p, uint32_t inst)
{
    const omni_predict_inst_t  *in;
    int64_t                     rc;

    in = omni_predict_in_flight(p, inst, &rc);
    if (in == NULL) {
        return rc;
    }

    /* jobs sent before the newest one answered and still in flight: past
     * the engine, in their transfers, whose answers are still to come */
    if (in->pending_us > in->sent_us - in->frontier_us
        && in->answer_max_us > in->free_at_us)
    {
        return (int64_t) in->answer_max_us;
    }

    return (int64_t) in->free_at_us;
}


int64_t
omni_predict_decode_wait_us(const omni_predict_t *p, uint32_t inst,
    uint32_t batch, uint64_t kv_tokens, uint32_t max_batch,
    uint32_t min_remaining_tokens)
{
    int64_t  step;

    step = omni_predict_decode_step_us(p, inst, batch, kv_tokens);
    if (step < 0) {
        return step;
    }
    if (max_batch == 0 || batch < max_batch) {
        return 0;
    }

    return step * (int64_t) (min_remaining_tokens ? min_remaining_tokens : 1);
}


uint64_t
omni_predict_prefill_samples(const omni_predict_t *p, uint32_t inst)
{
    if (p == NULL || inst >= p->cfg.max_instances) {
        return 0;
    }

    return omni_predict_insts(p)[inst].prefill.samples;
}


int
omni_predict_state(const omni_predict_t *p, uint32_t inst,
    omni_predict_state_t *out)
{
    const omni_predict_inst_t  *in;

    if (p == NULL || out == NULL || inst >= p->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_predict_insts(p)[inst];
    memset(out, 0, sizeof(*out));
    memcpy(out->prefill_coef, in->prefill.coef, sizeof(out->prefill_coef));
    memcpy(out->decode_coef, in->decode.coef, sizeof(out->decode_coef));
    out->prefill_samples = in->prefill.samples;
    out->decode_samples = in->decode.samples;
    out->completion_samples = in->completion_samples;
    out->prefill_mape = in->prefill.mape;
    out->decode_mape = in->decode.mape;
    out->completion_mape = in->completion_mape;
    out->free_at_us = in->free_at_us;
    out->inflight = in->inflight;
    /* the trip in use: with the transfer known, its time per token and
     * the fixed part that goes with it, not the line fitted alone */
    out->reach_us = (double) omni_predict_reach(p, in, 0);
    out->reach_per_1k_us = (double) omni_predict_reach(p, in, 1024)
                           - out->reach_us;
    out->transfer_per_1k_us = p->xfer_k_us;
    out->transfer_samples = p->xfer_samples;
    out->transfer_told_samples = p->told_samples;
    out->engine_ends = in->engine_ends;

    return OMNI_OK;
}
