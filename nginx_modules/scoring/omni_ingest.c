/*
 * Omni Proxy scoring library: ingestion of the KV-event agent's batches
 * (see omni_ingest.h for the format and the block-size mapping).
 *
 * One walk over the batch serves both passes: the first only checks (every
 * read is bounds-checked there), the second applies what the first proved
 * well formed.  So a batch is applied whole or not at all, and no pass reads
 * a byte the check did not cover.
 */

#include <string.h>

#include "omni_ingest.h"


/* Index blocks handed to omni_index_store() per call: the tokens go through
 * a stack buffer (the batch's bytes are neither aligned nor host order). */
#define OMNI_INGEST_CHUNK_BLOCKS  256
#define OMNI_INGEST_CHUNK_TOKENS  OMNI_INGEST_MAX_BLOCK
#define OMNI_INGEST_STORE_FIXED   24
#define OMNI_INGEST_REMOVE_FIXED  8
#define OMNI_INGEST_REC_HEADER    8


typedef struct {
    const uint8_t        *buf;
    size_t                len;
    size_t                pos;
    uint32_t              reason;
    size_t                where;
    uint32_t              block_size;      /* the index's B */
    uint32_t              batch_bs;        /* header's block_size */
    uint32_t              n_names;
    uint32_t              n_records;
    size_t                names_pos;
    /* apply pass only */
    int                   apply;
    omni_index_t         *idx;
    omni_predict_t       *predict;
    omni_ingest_inst_t   *insts;
    size_t                n_insts;
    uint64_t              now_us;
    omni_ingest_stats_t  *stats;
    int                   applied;
    /* last: left unset but for the batch's names */
    uint32_t              map[OMNI_INGEST_MAX_NAMES];
} omni_ingest_walk_t;


static const char *omni_ingest_reasons[] = {
    "ok",
    "batch shorter than its header or its length",
    "bad magic",
    "unsupported version",
    "bad total or header length",
    "bad instance name",
    "record header or body cut",
    "unknown record kind",
    "record body length does not match its counts",
    "record names no instance of the batch",
    "block sizes do not divide one another or batch cut for another size",
    "lead not a multiple of the engine block size below the index's",
    "field out of range",
    "bytes after the last record",
};


static inline uint16_t
omni_ingest_u16(const uint8_t *p)
{
    return (uint16_t) (p[0] | (uint16_t) p[1] << 8);
}


static inline uint32_t
omni_ingest_u32(const uint8_t *p)
{
    return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16
           | (uint32_t) p[3] << 24;
}


static inline uint64_t
omni_ingest_u64(const uint8_t *p)
{
    return (uint64_t) omni_ingest_u32(p)
           | (uint64_t) omni_ingest_u32(p + 4) << 32;
}


static int
omni_ingest_fail(omni_ingest_walk_t *w, uint32_t reason, size_t where)
{
    w->reason = reason;
    w->where = where;
    return OMNI_EINVAL;
}


uint64_t
omni_ingest_inner_key(uint64_t engine_hash, uint32_t offset)
{
    uint64_t  x;

    /* A 64-bit finalizer over the hash and the offset: keys that cannot be
     * mistaken for the engine's own hashes except by chance (2^-64). */
    x = engine_hash ^ ((uint64_t) offset * 0x9e3779b97f4a7c15ULL);
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}


static int
omni_ingest_sizes_ok(uint32_t e, uint32_t b)
{
    return e >= 1 && e <= OMNI_INGEST_MAX_BLOCK
           && (e % b == 0 || b % e == 0);
}


/* ---- apply --------------------------------------------------------------- */

/*
 * The stored tokens, lead first, cut in index blocks; block j is named
 * after the engine block holding its last token.
 */
static void
omni_ingest_store(omni_ingest_walk_t *w, omni_ingest_inst_t *in,
    uint32_t inst, const uint8_t *body, int has_anchor)
{
    uint32_t       e, n, lead, b, c, k;
    uint32_t       tokens[OMNI_INGEST_CHUNK_TOKENS];
    uint64_t       keys[OMNI_INGEST_CHUNK_BLOCKS];
    uint64_t       chains[OMNI_INGEST_CHUNK_BLOCKS];
    uint64_t       parent, total, n_idx, j, end, pos, q, o;
    const uint8_t  *hashes, *tp;
    int            rc;

    e = omni_ingest_u32(body);
    n = omni_ingest_u32(body + 4);
    lead = omni_ingest_u32(body + 8);
    parent = omni_ingest_u64(body + 16);
    hashes = body + OMNI_INGEST_STORE_FIXED;
    tp = hashes + (size_t) n * 8;
    b = w->block_size;

    total = (uint64_t) lead + (uint64_t) n * e;
    n_idx = total / b;
    c = OMNI_INGEST_CHUNK_TOKENS / b;
    if (c > OMNI_INGEST_CHUNK_BLOCKS) {
        c = OMNI_INGEST_CHUNK_BLOCKS;
    }

    in->stores++;

    for (j = 0; j < n_idx; j += k) {
        for (k = 0; k < c && j + k < n_idx; k++) {
            end = (j + k + 1) * b;
            pos = end - lead;           /* > 0: lead < b */
            q = (pos - 1) / e;
            o = pos - q * e;
            keys[k] = omni_ingest_u64(hashes + q * 8);
            if (o != e) {
                keys[k] = omni_ingest_inner_key(keys[k], (uint32_t) o);
            }
        }

        for (q = 0; q < (uint64_t) k * b; q++) {
            tokens[q] = omni_ingest_u32(tp + ((j * b + q) * 4));
        }

        rc = omni_index_store_chains(w->idx, inst, keys, k, has_anchor,
                                     parent, tokens, (size_t) k * b,
                                     w->now_us, chains);
        if (rc == OMNI_ENOTFOUND) {
            /* The anchor fell out of our index (capacity) or never came:
             * this chain cannot be placed. */
            in->orphans++;
            return;
        }
        if (rc < 0) {
            return;
        }
        in->blocks_stored += (uint64_t) rc;

        /* a prefill's last block: the engine tells its end */
        for (q = 0; w->predict != NULL && q < (uint64_t) rc; q++) {
            if (omni_predict_prefill_stored(w->predict, inst, chains[q],
                                            w->now_us)
                > 0)
            {
                w->stats->engine_ends++;
            }
        }

        if ((uint32_t) rc < k) {
            return;                     /* capacity stopped it */
        }
        has_anchor = 1;
        parent = keys[k - 1];
    }
}


static void
omni_ingest_remove(omni_ingest_walk_t *w, omni_ingest_inst_t *in,
    uint32_t inst, const uint8_t *body)
{
    uint32_t  e, n, i, per, o, k;
    uint64_t  keys[OMNI_INGEST_CHUNK_BLOCKS], h;
    int       rc;

    e = omni_ingest_u32(body);
    n = omni_ingest_u32(body + 4);

    /* Engine blocks larger than ours end several index blocks each. */
    per = e > w->block_size ? e / w->block_size : 1;
    k = 0;

    in->removals++;

    for (i = 0; i < n; i++) {
        h = omni_ingest_u64(body + OMNI_INGEST_REMOVE_FIXED + (size_t) i * 8);
        for (o = 0; o < per; o++) {
            keys[k++] = o == 0 ? h
                        : omni_ingest_inner_key(h, o * w->block_size);
            if (k == OMNI_INGEST_CHUNK_BLOCKS) {
                rc = omni_index_store_removed(w->idx, inst, keys, k);
                in->blocks_removed += rc > 0 ? (uint64_t) rc : 0;
                k = 0;
            }
        }
    }

    if (k) {
        rc = omni_index_store_removed(w->idx, inst, keys, k);
        in->blocks_removed += rc > 0 ? (uint64_t) rc : 0;
    }
}


/*
 * The index capacity of instance inst, from the engine's KV capacity and the
 * instance's mode.  Precise: the engine's own removals bound what it holds,
 * so entries it stored never exceed its capacity; the room above is for the
 * proxy's marks of prompts sent but not yet stored.  Without it, marking a
 * prompt on a full instance evicted the index's oldest precise entries,
 * blocks the engine still held (its removals come later and name its own
 * victims), and the index lost hits the engine would have given.
 * Approximate: the index guesses evictions, so the engine's capacity.
 */
static void
omni_ingest_fit(omni_index_t *idx, const omni_ingest_inst_t *in,
    uint32_t inst, uint32_t block_size)
{
    uint64_t  cap;

    if (idx == NULL || block_size == 0 || in->capacity_tokens < block_size) {
        return;
    }

    cap = in->capacity_tokens / block_size;
    if (in->mode == OMNI_INGEST_PRECISE) {
        cap *= OMNI_INGEST_PRECISE_ROOM;
    }

    (void) omni_index_set_capacity(idx, inst,
                                   cap > UINT32_MAX ? UINT32_MAX
                                                    : (uint32_t) cap);
}


static void
omni_ingest_metrics(omni_ingest_walk_t *w, omni_ingest_inst_t *in,
    uint32_t inst, const uint8_t *body)
{
    uint32_t  valid;
    uint64_t  cap;

    valid = omni_ingest_u32(body + 12);

    if (valid & OMNI_INGEST_M_LOAD) {
        in->running = omni_ingest_u32(body);
        in->waiting = omni_ingest_u32(body + 4);
        in->ours = OMNI_INGEST_OURS_UNSET;
    }
    if (valid & OMNI_INGEST_M_USAGE) {
        in->kv_usage_ppm = omni_ingest_u32(body + 8);
    }
    if (valid & OMNI_INGEST_M_CAPACITY) {
        cap = omni_ingest_u64(body + 16);
        if (cap != in->capacity_tokens && cap >= w->block_size) {
            in->capacity_tokens = cap;
            omni_ingest_fit(w->idx, in, inst, w->block_size);
        }
    }
}


static void
omni_ingest_record(omni_ingest_walk_t *w, uint32_t kind, uint32_t flags,
    uint32_t name, const uint8_t *body)
{
    omni_ingest_inst_t  *in;
    uint32_t             inst, mode;

    inst = w->map[name];
    if (inst == UINT32_MAX) {
        w->stats->unknown_names++;
        return;
    }

    in = &w->insts[inst];
    in->last_update_us = w->now_us;
    w->applied++;

    switch (kind) {

    case OMNI_INGEST_STORE:
        omni_ingest_store(w, in, inst, body, flags & OMNI_INGEST_HAS_ANCHOR);
        break;

    case OMNI_INGEST_REMOVE:
        omni_ingest_remove(w, in, inst, body);
        break;

    case OMNI_INGEST_CLEAR:
        (void) omni_index_clear(w->idx, inst);
        in->clears++;
        break;

    case OMNI_INGEST_STATE:
        mode = omni_ingest_u32(body);
        if (mode == OMNI_INGEST_APPROX && in->mode == OMNI_INGEST_PRECISE) {
            in->resyncs++;
        }
        if (mode != in->mode) {
            in->mode = mode;
            omni_ingest_fit(w->idx, in, inst, w->block_size);
        }
        in->health = omni_ingest_u32(body + 4);
        break;

    default: /* OMNI_INGEST_METRICS: the check pass allowed nothing else */
        omni_ingest_metrics(w, in, inst, body);
        break;
    }
}


/* ---- the walk ------------------------------------------------------------ */

static int
omni_ingest_check_body(omni_ingest_walk_t *w, uint32_t kind, uint32_t flags,
    const uint8_t *body, uint32_t body_len, size_t at)
{
    uint32_t  e, n, lead, b = w->block_size;
    uint64_t  want;

    if (kind != OMNI_INGEST_STORE && flags != 0) {
        return omni_ingest_fail(w, OMNI_INGEST_R_VALUE, at);
    }

    switch (kind) {

    case OMNI_INGEST_STORE:
        if (flags & ~(uint32_t) OMNI_INGEST_HAS_ANCHOR) {
            return omni_ingest_fail(w, OMNI_INGEST_R_VALUE, at);
        }
        if (body_len < OMNI_INGEST_STORE_FIXED) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        e = omni_ingest_u32(body);
        n = omni_ingest_u32(body + 4);
        lead = omni_ingest_u32(body + 8);
        if (omni_ingest_u32(body + 12) != 0 || n == 0) {
            return omni_ingest_fail(w, OMNI_INGEST_R_VALUE, at);
        }
        if (!omni_ingest_sizes_ok(e, b)) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BLOCK_SIZE, at);
        }
        want = OMNI_INGEST_STORE_FIXED + (uint64_t) n * 8
               + ((uint64_t) lead + (uint64_t) n * e) * 4;
        if (want != body_len) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        if (lead != 0) {
            if (w->batch_bs == 0) {
                return omni_ingest_fail(w, OMNI_INGEST_R_BLOCK_SIZE, at);
            }
            if (lead >= b || lead % e != 0) {
                return omni_ingest_fail(w, OMNI_INGEST_R_LEAD, at);
            }
        }
        return OMNI_OK;

    case OMNI_INGEST_REMOVE:
        if (body_len < OMNI_INGEST_REMOVE_FIXED) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        e = omni_ingest_u32(body);
        n = omni_ingest_u32(body + 4);
        if (!omni_ingest_sizes_ok(e, b)) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BLOCK_SIZE, at);
        }
        if (OMNI_INGEST_REMOVE_FIXED + (uint64_t) n * 8 != body_len) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        return OMNI_OK;

    case OMNI_INGEST_CLEAR:
        if (body_len != 0) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        return OMNI_OK;

    case OMNI_INGEST_STATE:
        if (body_len != 8) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        e = omni_ingest_u32(body);
        n = omni_ingest_u32(body + 4);
        if ((e != OMNI_INGEST_PRECISE && e != OMNI_INGEST_APPROX)
            || n > OMNI_INGEST_HEALTH_DOWN)
        {
            return omni_ingest_fail(w, OMNI_INGEST_R_VALUE, at);
        }
        return OMNI_OK;

    case OMNI_INGEST_METRICS:
        if (body_len != 24) {
            return omni_ingest_fail(w, OMNI_INGEST_R_BODY, at);
        }
        if (omni_ingest_u32(body + 8) > 1000000
            || omni_ingest_u32(body + 12) > 7)
        {
            return omni_ingest_fail(w, OMNI_INGEST_R_VALUE, at);
        }
        return OMNI_OK;

    default:
        return omni_ingest_fail(w, OMNI_INGEST_R_KIND, at);
    }
}


static int
omni_ingest_walk(omni_ingest_walk_t *w)
{
    const uint8_t  *p = w->buf;
    size_t          pos, at;
    uint32_t        i, kind, flags, name, body_len;
    int             rc;

    pos = w->names_pos;
    for (i = 0; i < w->n_names; i++) {
        if (w->len - pos < 2) {
            return omni_ingest_fail(w, OMNI_INGEST_R_NAME, pos);
        }
        body_len = omni_ingest_u16(p + pos);
        if (body_len == 0 || body_len > OMNI_INGEST_MAX_NAME
            || w->len - pos - 2 < body_len)
        {
            return omni_ingest_fail(w, OMNI_INGEST_R_NAME, pos);
        }
        pos += 2 + body_len;
    }

    for (i = 0; i < w->n_records; i++) {
        at = pos;
        if (w->len - pos < OMNI_INGEST_REC_HEADER) {
            return omni_ingest_fail(w, OMNI_INGEST_R_RECORD, at);
        }
        kind = p[pos];
        flags = p[pos + 1];
        name = omni_ingest_u16(p + pos + 2);
        body_len = omni_ingest_u32(p + pos + 4);
        pos += OMNI_INGEST_REC_HEADER;
        if (w->len - pos < body_len) {
            return omni_ingest_fail(w, OMNI_INGEST_R_RECORD, at);
        }

        if (w->apply) {
            omni_ingest_record(w, kind, flags, name, p + pos);

        } else {
            if (name >= w->n_names) {
                return omni_ingest_fail(w, OMNI_INGEST_R_NAME_INDEX, at);
            }
            rc = omni_ingest_check_body(w, kind, flags, p + pos, body_len,
                                        at);
            if (rc != OMNI_OK) {
                return rc;
            }
        }

        pos += body_len;
    }

    if (pos != w->len) {
        return omni_ingest_fail(w, OMNI_INGEST_R_TRAILING, pos);
    }

    return OMNI_OK;
}


static int
omni_ingest_header(omni_ingest_walk_t *w)
{
    const uint8_t  *p = w->buf;
    uint32_t        header_len;

    if (w->len < OMNI_INGEST_HEADER_LEN) {
        return omni_ingest_fail(w, OMNI_INGEST_R_SHORT, 0);
    }
    if (omni_ingest_u32(p) != OMNI_INGEST_MAGIC) {
        return omni_ingest_fail(w, OMNI_INGEST_R_MAGIC, 0);
    }
    if (omni_ingest_u16(p + 4) != OMNI_INGEST_VERSION) {
        return omni_ingest_fail(w, OMNI_INGEST_R_VERSION, 4);
    }
    header_len = omni_ingest_u16(p + 6);
    if (header_len != OMNI_INGEST_HEADER_LEN) {
        return omni_ingest_fail(w, OMNI_INGEST_R_LENGTH, 6);
    }
    if (omni_ingest_u32(p + 8) != w->len) {
        return omni_ingest_fail(w, w->len < omni_ingest_u32(p + 8)
                                   ? OMNI_INGEST_R_SHORT
                                   : OMNI_INGEST_R_LENGTH, 8);
    }

    w->batch_bs = omni_ingest_u32(p + 12);
    if (w->batch_bs != 0 && w->batch_bs != w->block_size) {
        return omni_ingest_fail(w, OMNI_INGEST_R_BLOCK_SIZE, 12);
    }

    w->n_names = omni_ingest_u16(p + 16);
    if (w->n_names > OMNI_INGEST_MAX_NAMES) {
        return omni_ingest_fail(w, OMNI_INGEST_R_NAME, 16);
    }
    if (omni_ingest_u16(p + 18) != 0) {
        return omni_ingest_fail(w, OMNI_INGEST_R_VALUE, 18);
    }
    w->n_records = omni_ingest_u32(p + 20);
    w->names_pos = header_len;

    return OMNI_OK;
}


static void
omni_ingest_map_names(omni_ingest_walk_t *w, const omni_ingest_name_t *names,
    size_t n_names, uint32_t max_inst)
{
    const uint8_t  *p = w->buf;
    size_t          pos = w->names_pos, k;
    uint32_t        i, len;

    for (i = 0; i < w->n_names; i++) {
        len = omni_ingest_u16(p + pos);
        w->map[i] = UINT32_MAX;
        for (k = 0; k < n_names; k++) {
            if (names[k].len == len && names[k].name != NULL
                && names[k].inst < w->n_insts && names[k].inst < max_inst
                && memcmp(names[k].name, p + pos + 2, len) == 0)
            {
                w->map[i] = names[k].inst;
                break;
            }
        }
        pos += 2 + len;
    }
}


int
omni_ingest_apply(omni_index_t *idx, omni_ingest_inst_t *insts,
    size_t n_insts, const omni_ingest_name_t *names, size_t n_names,
    const uint8_t *buf, size_t len, uint64_t now_us,
    omni_ingest_stats_t *stats)
{
    return omni_ingest_apply_to(idx, NULL, insts, n_insts, names, n_names,
                                buf, len, now_us, stats);
}


int
omni_ingest_apply_to(omni_index_t *idx, omni_predict_t *predict,
    omni_ingest_inst_t *insts, size_t n_insts,
    const omni_ingest_name_t *names, size_t n_names, const uint8_t *buf,
    size_t len, uint64_t now_us, omni_ingest_stats_t *stats)
{
    omni_ingest_walk_t  w;
    omni_index_cfg_t    cfg;
    int                 rc;

    if (idx == NULL || stats == NULL || (n_insts > 0 && insts == NULL)
        || (n_names > 0 && names == NULL) || (len > 0 && buf == NULL))
    {
        return OMNI_EINVAL;
    }

    omni_index_get_cfg(idx, &cfg);

    /* The map is filled only for the names the batch has. */
    memset(&w, 0, offsetof(omni_ingest_walk_t, map));
    w.buf = buf;
    w.len = len;
    w.block_size = cfg.block_size;

    if (w.block_size == 0 || w.block_size > OMNI_INGEST_MAX_BLOCK) {
        rc = omni_ingest_fail(&w, OMNI_INGEST_R_BLOCK_SIZE, 0);

    } else {
        rc = omni_ingest_header(&w);
        if (rc == OMNI_OK) {
            rc = omni_ingest_walk(&w);
        }
    }

    if (rc != OMNI_OK) {
        stats->rejected++;
        stats->last_reason = w.reason;
        stats->last_offset = w.where;
        return rc;
    }

    w.apply = 1;
    w.idx = idx;
    w.predict = predict;
    w.insts = insts;
    w.n_insts = n_insts;
    w.now_us = now_us;
    w.stats = stats;
    omni_ingest_map_names(&w, names, n_names, cfg.max_instances);

    (void) omni_ingest_walk(&w);

    stats->batches++;
    stats->records += w.n_records;
    stats->bytes += len;

    return w.applied;
}


int
omni_ingest_expire(omni_index_t *idx, omni_ingest_inst_t *insts,
    size_t n_insts, uint64_t now_us, uint64_t ttl_us)
{
    size_t            i;
    int               got = 0;
    omni_index_cfg_t  cfg;

    if (n_insts > 0 && insts == NULL) {
        return OMNI_EINVAL;
    }

    cfg.block_size = 0;
    if (idx != NULL) {
        omni_index_get_cfg(idx, &cfg);
    }

    for (i = 0; i < n_insts; i++) {
        if (insts[i].mode == OMNI_INGEST_PRECISE
            && now_us > insts[i].last_update_us
            && now_us - insts[i].last_update_us > ttl_us)
        {
            insts[i].mode = OMNI_INGEST_APPROX;
            insts[i].resyncs++;
            omni_ingest_fit(idx, &insts[i], (uint32_t) i, cfg.block_size);
            got++;
        }
    }

    return got;
}


int
omni_ingest_discount(const omni_ingest_inst_t *insts, size_t n_insts,
    uint32_t *matched, size_t n)
{
    size_t  i;
    int     got = 0;

    if ((n > 0 && matched == NULL) || (n_insts > 0 && insts == NULL)) {
        return OMNI_EINVAL;
    }

    for (i = 0; i < n && i < n_insts; i++) {
        /* The index only guesses what an approximate instance holds (the
         * proxy's own dispatches, possibly evicted since): half weight. */
        if (insts[i].mode == OMNI_INGEST_APPROX && matched[i] > 0) {
            matched[i] /= OMNI_INGEST_APPROX_DIV;
            got++;
        }
    }

    return got;
}


uint32_t
omni_ingest_blend_running(const omni_ingest_inst_t *inst,
    uint32_t proxy_running, uint64_t now_us, uint64_t ttl_us)
{
    uint64_t  engine;

    if (inst == NULL || inst->last_update_us == 0
        || now_us < inst->last_update_us
        || now_us - inst->last_update_us > ttl_us)
    {
        return proxy_running;
    }

    engine = (uint64_t) inst->running + inst->waiting;

    if (inst->ours == OMNI_INGEST_OURS_UNSET) {
        /* our figure at the scrape is unknown: the larger */
        return engine > proxy_running
               ? (engine > UINT32_MAX ? UINT32_MAX : (uint32_t) engine)
               : proxy_running;
    }

    /* the engine counts our work as it was at the scrape; what it reports
     * beyond that is work other proxies (or clients) sent it, if the report
     * before said so too (omni_ingest.h) */
    engine = inst->beyond < inst->beyond_prev ? inst->beyond
                                              : inst->beyond_prev;
    engine += proxy_running;

    return engine > UINT32_MAX ? UINT32_MAX : (uint32_t) engine;
}


int
omni_ingest_note_ours(omni_ingest_inst_t *insts, size_t n_insts,
    const uint32_t *ours)
{
    size_t    i;
    int       noted;
    uint64_t  engine;

    if (insts == NULL || ours == NULL) {
        return OMNI_EINVAL;
    }

    noted = 0;

    for (i = 0; i < n_insts; i++) {
        if (insts[i].ours == OMNI_INGEST_OURS_UNSET) {
            insts[i].ours = ours[i] == OMNI_INGEST_OURS_UNSET
                            ? ours[i] - 1 : ours[i];
            engine = (uint64_t) insts[i].running + insts[i].waiting;
            insts[i].beyond_prev = insts[i].beyond;
            engine = engine > insts[i].ours ? engine - insts[i].ours : 0;
            insts[i].beyond = engine > UINT32_MAX ? UINT32_MAX
                                                  : (uint32_t) engine;
            noted++;
        }
    }

    return noted;
}


const char *
omni_ingest_strreason(uint32_t reason)
{
    if (reason >= OMNI_INGEST_R_MAX) {
        return "unknown reason";
    }
    return omni_ingest_reasons[reason];
}
