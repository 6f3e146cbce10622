/*
 * Omni Proxy scoring library: the prefix index (see omni_index.h).
 *
 * Layout of the one memory block, every part 64-byte aligned:
 *
 *   header     omni_index_s: configuration, tables, counters
 *   instances  omni_index_inst_t[max_instances]: two LRU lists each
 *   entries    omni_index_entry_t[max_entries], 28 bytes: one per (block,
 *              instance), naming the block by its record; free ones form a
 *              singly linked list
 *   records    one per distinct block: { hash, holder bitmap[words] }, hash 0
 *              when free; free ones form a doubly linked list (links in the
 *              bitmap) so any free record can be taken in O(1)
 *   node table block hash -> record
 *   key table  (record, instance) -> entry
 *   eng table  (engine hash, instance) -> entry, precise entries only
 *
 * Locality: records never move, and a block's record is taken next to its
 * parent block's record when that one is free, so a prompt inserted in one
 * go occupies a run of neighbouring records.  Match and insert first try the
 * records right after and before the previous block's (one cache line away)
 * and use the node table only when that guess fails, so a long prompt is read
 * nearly sequentially instead of with one cache and TLB miss per block.
 *
 * Tables: open addressing with linear probing in Robin Hood order and
 * backward-shift deletion (no tombstones, so they never degrade), at most 2/3
 * full, home slot = high
 * bits of a mixed key scaled to the table size.  A slot is a uint32: the
 * reference + 1 in the low bits and, in the bits the references do not need,
 * how far the slot is from its home (4 or 6 bits, saturating) and a fingerprint
 * (low bits of the mixed key).  So a lookup reads almost only the entry it
 * is looking for, and a deletion shifts slots without reading any entry
 * (unless a distance saturated).
 */

#include <string.h>

#include "omni_index.h"
#include "omni_hash.h"


#define OMNI_INDEX_MAGIC     0x32584449494e4d4fULL   /* "OMNIIDX2" */
#define OMNI_INDEX_LAYOUT    2
#define OMNI_INDEX_NIL       UINT32_MAX
#define OMNI_INDEX_FREE      2
#define OMNI_INDEX_MAX_WORDS (OMNI_INDEX_MAX_INSTANCES / 64)

/* Tables. */
#define OMNI_INDEX_T_NODE    0
#define OMNI_INDEX_T_KEY     1
#define OMNI_INDEX_T_ENG     2

/* Tests may build with -DOMNI_INDEX_DMAX_CAP=0 or 1 to exercise saturated
 * slot distances everywhere. */

/* How many request blocks ahead match and insert prefetch table slots. */
#ifndef OMNI_INDEX_PREFETCH
#define OMNI_INDEX_PREFETCH  8
#endif


typedef struct {
    uint32_t  node;          /* record of the block */
    uint32_t  engine[2];     /* precise: the engine's hash, low/high half */
    uint32_t  prev;          /* instance list; unused when free */
    uint32_t  next;          /* instance list, or the free list */
    uint32_t  last_access;   /* now_us >> 10 at the last touch */
    uint16_t  inst;
    uint8_t   kind;          /* OMNI_INDEX_PRECISE, _APPROX or _FREE */
    uint8_t   pad;
} omni_index_entry_t;

typedef struct {
    uint32_t  head[2];         /* [kind]: most recent */
    uint32_t  tail[2];         /* [kind]: least recent */
    uint32_t  tail_access[2];  /* last_access of tail[kind], kept here so a
                                  global victim search reads no entries */
    uint32_t  count[2];
    uint32_t  capacity;
    uint32_t  pad;
    uint64_t  evicted;
} omni_index_inst_t;

typedef struct {
    uint64_t  off;
    uint32_t  slots;
    uint32_t  ref_bits;        /* low bits: reference + 1 */
    uint32_t  ref_mask;
    uint32_t  dist_mask;       /* next bits: distance from home, */
    uint32_t  dmax;            /*   saturated: "this far or more" */
    uint32_t  fp_shift;        /* high bits: fingerprint */
    uint32_t  fp_mask;
} omni_index_tab_t;

struct omni_index_s {
    uint64_t            magic;
    uint32_t            layout;
    uint32_t            words;        /* bitmap words per record */
    uint64_t            size;
    omni_index_cfg_t    cfg;          /* resolved */
    omni_index_tab_t    tab[3];
    uint64_t            off_inst;
    uint64_t            off_entry;
    uint64_t            off_rec;
    uint32_t            ttl_units;    /* approx TTL in 1024 us units; 0 off */
    uint32_t            free_entry;
    uint32_t            free_rec;
    uint32_t            n_entries;
    uint32_t            n_nodes;
    uint32_t            n_precise;
    omni_index_stats_t  stats;        /* event counters; sizes filled on read */
};

typedef struct {
    uint64_t  alive[OMNI_INDEX_MAX_WORDS];
    uint32_t  words;
    uint32_t  pos;
    uint32_t  last;            /* record of the previous block, or NIL */
    int       scattered;       /* the last guess failed: prefetch ahead */
    int       done;
} omni_index_walk_t;


/* ---- small helpers ------------------------------------------------------- */

static inline uint64_t
omni_index_mix(uint64_t x)
{
    /* A 64-bit finalizer: callers may pass weak keys (small engine hashes). */
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}


static inline uint32_t
omni_index_stamp(uint64_t now_us)
{
    return (uint32_t) (now_us >> 10);
}


/* a is strictly older than b (wrap-safe over ~24 days). */
static inline int
omni_index_older(uint32_t a, uint32_t b)
{
    return (int32_t) (b - a) > 0;
}


static inline size_t
omni_index_align(size_t n)
{
    return (n + 63) & ~(size_t) 63;
}


static inline omni_index_entry_t *
omni_index_entries(const omni_index_t *idx)
{
    return (omni_index_entry_t *) ((char *) idx + idx->off_entry);
}


static inline omni_index_inst_t *
omni_index_insts(const omni_index_t *idx)
{
    return (omni_index_inst_t *) ((char *) idx + idx->off_inst);
}


static inline uint64_t *
omni_index_rec(const omni_index_t *idx, uint32_t r)
{
    return (uint64_t *) ((char *) idx + idx->off_rec)
           + (size_t) r * (1 + idx->words);
}


static inline uint32_t *
omni_index_slots(const omni_index_t *idx, int t)
{
    return (uint32_t *) ((char *) idx + idx->tab[t].off);
}


static inline uint64_t
omni_index_engine(const omni_index_entry_t *e)
{
    return (uint64_t) e->engine[1] << 32 | e->engine[0];
}


static inline uint32_t
omni_index_scale(uint64_t mixed, uint32_t slots)
{
    return (uint32_t) (((mixed >> 32) * (uint64_t) slots) >> 32);
}


/* The mixed keys of the three tables: high bits give the home slot, low
 * bits the fingerprint. */

static inline uint64_t
omni_index_node_key(uint64_t hash)
{
    return omni_index_mix(hash);
}


static inline uint64_t
omni_index_key_key(uint32_t rec, uint32_t inst)
{
    /* rec in the low 32 bits, so key >> 3 is (instance, group of 8) */
    return (uint64_t) inst << 32 | rec;
}


static inline uint64_t
omni_index_eng_key(uint64_t ehash, uint32_t inst)
{
    return omni_index_mix(ehash
                          + (uint64_t) (inst + 1) * 0xd6e8feb86659fd93ULL);
}


/*
 * The key table is the exception: records are taken in groups of 8
 * neighbours, and each (group, instance) pair gets a random window of 8
 * slots, the record's place in its group giving the slot in the window.  So
 * an instance's entries for a run of neighbouring records share a cache line
 * (and a new entry lands where its evicted predecessor was: it reuses its
 * record), while the entries of many instances for the same popular records
 * are spread out.  (Windows placed by record alone pile every holder of a
 * popular prompt into one run; wider windows make longer runs: 16 doubled
 * the probe length for little gain.)
 * Its "mixed key" is the record and instance themselves; the fingerprint is
 * taken from a real mix.
 */
static inline uint32_t
omni_index_home(const omni_index_t *idx, int t, uint64_t key)
{
    uint32_t  slots = idx->tab[t].slots, home;

    if (t != OMNI_INDEX_T_KEY) {
        return omni_index_scale(key, slots);
    }

    home = omni_index_scale(omni_index_mix(key >> 3), slots) + (key & 7);
    return home >= slots ? home - slots : home;
}


static inline uint32_t
omni_index_fp(int t, uint64_t key)
{
    return t == OMNI_INDEX_T_KEY ? (uint32_t) omni_index_mix(key)
                                 : (uint32_t) key;
}


/* The mixed key of reference `ref` in table t (reads the entry/record). */
static uint64_t
omni_index_ref_key(const omni_index_t *idx, int t, uint32_t ref)
{
    const omni_index_entry_t  *e = omni_index_entries(idx);

    switch (t) {
    case OMNI_INDEX_T_NODE:
        return omni_index_node_key(omni_index_rec(idx, ref)[0]);
    case OMNI_INDEX_T_KEY:
        return omni_index_key_key(e[ref].node, e[ref].inst);
    default:
        return omni_index_eng_key(omni_index_engine(&e[ref]), e[ref].inst);
    }
}


/* ---- configuration and layout ------------------------------------------ */

typedef struct {
    omni_index_cfg_t  cfg;
    uint32_t          words;
    omni_index_tab_t  tab[3];
    uint64_t          off_inst;
    uint64_t          off_entry;
    uint64_t          off_rec;
    uint64_t          size;
} omni_index_layout_t;


static void
omni_index_plan_tab(omni_index_tab_t *t, uint64_t items, uint64_t off,
    uint32_t want_dist_bits)
{
    uint32_t  bits = 0, spare, dist_bits;

    while (bits < 32 && ((uint64_t) 1 << bits) <= items) {
        bits++;
    }

    spare = 32 - bits;
    dist_bits = spare < want_dist_bits ? spare : want_dist_bits;

    t->off = off;
    t->slots = (uint32_t) (items + items / 2 + 1);
    t->ref_bits = bits;
    t->ref_mask = (uint32_t) (((uint64_t) 1 << bits) - 1);
    t->dist_mask = (1u << dist_bits) - 1;
    t->dmax = t->dist_mask;
#ifdef OMNI_INDEX_DMAX_CAP
    if (t->dmax > OMNI_INDEX_DMAX_CAP) {
        t->dmax = OMNI_INDEX_DMAX_CAP;
    }
#endif
    t->fp_mask = (uint32_t) (((uint64_t) 1 << (spare - dist_bits)) - 1);
    t->fp_shift = t->fp_mask ? bits + dist_bits : 0;   /* never shift by 32 */
}


static int
omni_index_plan(const omni_index_cfg_t *in, omni_index_layout_t *l)
{
    uint64_t  entries, nodes, off;

    if (in == NULL || in->max_instances == 0
        || in->max_instances > OMNI_INDEX_MAX_INSTANCES
        || in->block_size > OMNI_HASH_MAX_BLOCK_SIZE || in->reserved != 0)
    {
        return OMNI_EINVAL;
    }

    l->cfg = *in;

    entries = in->max_entries;
    if (entries == 0) {
        entries = (uint64_t) in->max_instances * in->instance_capacity;
        if (entries > OMNI_INDEX_MAX_ENTRIES) {
            entries = OMNI_INDEX_MAX_ENTRIES;
        }
    }
    if (entries == 0 || entries > OMNI_INDEX_MAX_ENTRIES) {
        return OMNI_EINVAL;
    }

    nodes = in->max_nodes;
    if (nodes == 0 || nodes > entries) {
        nodes = entries;
    }

    l->cfg.max_entries = (uint32_t) entries;
    l->cfg.max_nodes = (uint32_t) nodes;
    if (l->cfg.instance_capacity == 0
        || l->cfg.instance_capacity > l->cfg.max_entries)
    {
        l->cfg.instance_capacity = l->cfg.max_entries;
    }

    l->words = (in->max_instances + 63) / 64;

    off = omni_index_align(sizeof(omni_index_t));
    l->off_inst = off;
    off += omni_index_align(sizeof(omni_index_inst_t) * in->max_instances);
    l->off_entry = off;
    off += omni_index_align(sizeof(omni_index_entry_t) * entries);
    l->off_rec = off;
    off += omni_index_align((size_t) nodes * 8 * (1 + l->words));

    /* Distance bits: the node table is probed for absent blocks all the time
     * (fingerprints pay); key-table lookups always hit, but its windows
     * collide, so long distances must not saturate (deletions would read
     * entries). */
    omni_index_plan_tab(&l->tab[OMNI_INDEX_T_NODE], nodes, off, 4);
    off += omni_index_align((size_t) l->tab[OMNI_INDEX_T_NODE].slots * 4);
    omni_index_plan_tab(&l->tab[OMNI_INDEX_T_KEY], entries, off, 6);
    off += omni_index_align((size_t) l->tab[OMNI_INDEX_T_KEY].slots * 4);
    omni_index_plan_tab(&l->tab[OMNI_INDEX_T_ENG], entries, off, 4);
    off += omni_index_align((size_t) l->tab[OMNI_INDEX_T_ENG].slots * 4);

    l->size = off;

    return OMNI_OK;
}


size_t
omni_index_size(const omni_index_cfg_t *cfg)
{
    omni_index_layout_t  l;

    if (omni_index_plan(cfg, &l) != OMNI_OK) {
        return 0;
    }

    return (size_t) l.size;
}


int
omni_index_init(void *mem, size_t size, const omni_index_cfg_t *cfg,
    omni_index_t **out)
{
    omni_index_layout_t   l;
    omni_index_t         *idx;
    omni_index_entry_t   *e;
    omni_index_inst_t    *in;
    uint64_t             *r;
    uint32_t              i, n;
    int                   rc;

    if (mem == NULL || ((uintptr_t) mem & 7) != 0 || out == NULL) {
        return OMNI_EINVAL;
    }

    rc = omni_index_plan(cfg, &l);
    if (rc != OMNI_OK) {
        return rc;
    }
    if (size < l.size) {
        return OMNI_ERANGE;
    }

    memset(mem, 0, (size_t) l.size);

    idx = mem;
    idx->layout = OMNI_INDEX_LAYOUT;
    idx->words = l.words;
    idx->size = l.size;
    idx->cfg = l.cfg;
    memcpy(idx->tab, l.tab, sizeof(idx->tab));
    idx->off_inst = l.off_inst;
    idx->off_entry = l.off_entry;
    idx->off_rec = l.off_rec;

    if (l.cfg.approx_ttl_us) {
        uint64_t  units = (l.cfg.approx_ttl_us + 1023) >> 10;
        idx->ttl_units = units > INT32_MAX ? INT32_MAX : (uint32_t) units;
    }

    e = omni_index_entries(idx);
    n = l.cfg.max_entries;
    for (i = 0; i < n; i++) {
        e[i].kind = OMNI_INDEX_FREE;
        e[i].prev = OMNI_INDEX_NIL;
        e[i].next = i + 1 < n ? i + 1 : OMNI_INDEX_NIL;
    }
    idx->free_entry = 0;

    /* Free records in ascending order: the first prompts inserted get runs
     * of neighbouring records. */
    n = l.cfg.max_nodes;
    for (i = 0; i < n; i++) {
        r = omni_index_rec(idx, i);
        r[1] = (uint64_t) (i > 0 ? i - 1 : OMNI_INDEX_NIL) << 32
               | (i + 1 < n ? i + 1 : OMNI_INDEX_NIL);
    }
    idx->free_rec = 0;

    in = omni_index_insts(idx);
    for (i = 0; i < l.cfg.max_instances; i++) {
        in[i].head[0] = in[i].head[1] = OMNI_INDEX_NIL;
        in[i].tail[0] = in[i].tail[1] = OMNI_INDEX_NIL;
        in[i].capacity = l.cfg.instance_capacity;
    }

    /* Written last: attach() trusts a block only once this is set. */
    idx->magic = OMNI_INDEX_MAGIC;

    *out = idx;
    return OMNI_OK;
}


omni_index_t *
omni_index_new(const omni_index_cfg_t *cfg, const omni_allocator_t *a,
    int *rc)
{
    omni_index_t  *idx = NULL;
    size_t         size;
    void          *mem;
    int            r;

    size = omni_index_size(cfg);
    if (size == 0 || a == NULL || a->alloc == NULL) {
        r = OMNI_EINVAL;
        goto done;
    }

    mem = a->alloc(a->ctx, size);
    if (mem == NULL) {
        r = OMNI_ENOMEM;
        goto done;
    }

    r = omni_index_init(mem, size, cfg, &idx);
    if (r != OMNI_OK) {
        a->free(a->ctx, mem);
        idx = NULL;
    }

done:

    if (rc) {
        *rc = r;
    }
    return idx;
}


void
omni_index_free(omni_index_t *idx, const omni_allocator_t *a)
{
    if (idx == NULL || a == NULL || a->free == NULL) {
        return;
    }

    idx->magic = 0;
    a->free(a->ctx, idx);
}


omni_index_t *
omni_index_attach(void *mem, size_t size)
{
    omni_index_t  *idx = mem;

    if (mem == NULL || ((uintptr_t) mem & 7) != 0
        || size < sizeof(omni_index_t) || idx->magic != OMNI_INDEX_MAGIC
        || idx->layout != OMNI_INDEX_LAYOUT || idx->size > size)
    {
        return NULL;
    }

    return idx;
}


void
omni_index_get_cfg(const omni_index_t *idx, omni_index_cfg_t *cfg)
{
    *cfg = idx->cfg;
}


/* ---- tables ------------------------------------------------------------ */

static inline uint32_t
omni_index_slot_val(const omni_index_tab_t *t, uint32_t ref, uint32_t dist,
    uint32_t fp)
{
    return (ref + 1) | ((dist < t->dmax ? dist : t->dmax) << t->ref_bits)
           | ((fp & t->fp_mask) << t->fp_shift);
}


static inline uint32_t
omni_index_slot_dist(const omni_index_tab_t *t, uint32_t v)
{
    return (v >> t->ref_bits) & t->dist_mask;
}


/* Whether a slot at `dist` from the probe's home may hold its key. */
static inline int
omni_index_slot_may(const omni_index_tab_t *t, uint32_t v, uint32_t dist,
    uint32_t fp)
{
    uint32_t  d = omni_index_slot_dist(t, v);

    return (d == dist || (d == t->dmax && dist >= t->dmax))
           && ((v >> t->fp_shift) & t->fp_mask) == (fp & t->fp_mask);
}


/* The real distance from home of slot value v at position i: reads the
 * entry or record only when the stored distance saturated. */
static uint32_t
omni_index_slot_true_dist(const omni_index_t *idx, int which, uint32_t v,
    uint32_t i)
{
    const omni_index_tab_t  *t = &idx->tab[which];
    uint32_t                 d = omni_index_slot_dist(t, v), k;

    if (d < t->dmax) {
        return d;
    }

    k = omni_index_home(idx, which,
                        omni_index_ref_key(idx, which, (v & t->ref_mask) - 1));
    return i >= k ? i - k : i + t->slots - k;
}


/*
 * Robin Hood insertion: walking from home, the new reference takes the
 * place of the first one that sits closer to its own home, which then moves
 * on the same way.  Every run of slots stays ordered by home, so a lookup
 * can stop at the first slot closer to its home than the probe is, and a
 * deletion can stop at the first slot that is at its home.
 */
static void
omni_index_tab_add(omni_index_t *idx, int which, uint64_t key, uint32_t ref)
{
    const omni_index_tab_t  *t = &idx->tab[which];
    uint32_t                *s = omni_index_slots(idx, which);
    uint32_t                 i = omni_index_home(idx, which, key), dist = 0;
    uint32_t                 fp = omni_index_fp(which, key), v, vd;

    for ( ;; ) {
        v = s[i];
        if (v == 0) {
            s[i] = omni_index_slot_val(t, ref, dist, fp);
            return;
        }

        vd = omni_index_slot_dist(t, v);
        if (vd < dist && (vd < t->dmax
                          || (vd = omni_index_slot_true_dist(idx, which, v, i))
                             < dist))
        {
            s[i] = omni_index_slot_val(t, ref, dist, fp);
            ref = (v & t->ref_mask) - 1;
            fp = v >> t->fp_shift;
            dist = vd;
        }

        if (++i == t->slots) {
            i = 0;
        }
        dist++;
    }
}


/* Remove reference `ref` (of mixed key `key`) from table `which`. */
static void
omni_index_tab_del(omni_index_t *idx, int which, uint64_t key, uint32_t ref)
{
    const omni_index_tab_t  *t = &idx->tab[which];
    uint32_t                *s = omni_index_slots(idx, which);
    uint32_t                 i = omni_index_home(idx, which, key), j, v, d;

    /* Found by value: no entry or record is read on the way. */
    while ((s[i] & t->ref_mask) != ref + 1) {
        if (++i == t->slots) {
            i = 0;
        }
    }

    /* Shift the rest of the run back by one, up to the first slot that is
     * empty or at its home. */
    for ( ;; ) {
        j = i + 1 == t->slots ? 0 : i + 1;
        v = s[j];
        if (v == 0) {
            break;
        }
        d = omni_index_slot_true_dist(idx, which, v, j);
        if (d == 0) {
            break;
        }
        s[i] = omni_index_slot_val(t, (v & t->ref_mask) - 1, d - 1,
                                   v >> t->fp_shift);
        i = j;
    }

    s[i] = 0;
}


/* A probe at `dist` from its home meets slot value v: whether the key may be
 * further on (Robin Hood order: not once a slot is closer to its home). */
static inline int
omni_index_slot_goes_on(const omni_index_tab_t *t, uint32_t v, uint32_t dist)
{
    uint32_t  d = omni_index_slot_dist(t, v);

    return d >= dist || d == t->dmax;
}


/* Record of block `hash`, or NIL. */
static uint32_t
omni_index_node_lookup(const omni_index_t *idx, uint64_t hash)
{
    const omni_index_tab_t  *t = &idx->tab[OMNI_INDEX_T_NODE];
    const uint32_t          *s = omni_index_slots(idx, OMNI_INDEX_T_NODE);
    uint64_t                 key = omni_index_node_key(hash);
    uint32_t                 i = omni_index_home(idx, OMNI_INDEX_T_NODE, key);
    uint32_t                 dist, v, r;

    for (dist = 0; ; dist++) {
        v = s[i];
        if (v == 0) {
            return OMNI_INDEX_NIL;
        }
        if (omni_index_slot_may(t, v, dist, (uint32_t) key)) {
            r = (v & t->ref_mask) - 1;
            if (omni_index_rec(idx, r)[0] == hash) {
                return r;
            }
        }
        if (!omni_index_slot_goes_on(t, v, dist)) {
            return OMNI_INDEX_NIL;
        }
        if (++i == t->slots) {
            i = 0;
        }
    }
}


/* The same, trying the neighbours of the previous block's record first. */
static inline uint32_t
omni_index_node_find(const omni_index_t *idx, uint64_t hash, uint32_t hint,
    int *guessed)
{
    if (hint != OMNI_INDEX_NIL) {
        if (hint + 1 < idx->cfg.max_nodes
            && omni_index_rec(idx, hint + 1)[0] == hash)
        {
            *guessed = 1;
            return hint + 1;
        }
        if (hint > 0 && omni_index_rec(idx, hint - 1)[0] == hash) {
            *guessed = 1;
            return hint - 1;
        }
    }

    *guessed = 0;
    return omni_index_node_lookup(idx, hash);
}


static uint32_t
omni_index_key_find(const omni_index_t *idx, uint32_t rec, uint32_t inst)
{
    const omni_index_tab_t    *t = &idx->tab[OMNI_INDEX_T_KEY];
    const uint32_t            *s = omni_index_slots(idx, OMNI_INDEX_T_KEY);
    const omni_index_entry_t  *e = omni_index_entries(idx);
    uint64_t                   key = omni_index_key_key(rec, inst);
    uint32_t                   i = omni_index_home(idx, OMNI_INDEX_T_KEY, key);
    uint32_t                   fp = omni_index_fp(OMNI_INDEX_T_KEY, key);
    uint32_t                   dist, v, ei;

    for (dist = 0; ; dist++) {
        v = s[i];
        if (v == 0) {
            return OMNI_INDEX_NIL;
        }
        if (omni_index_slot_may(t, v, dist, fp)) {
            ei = (v & t->ref_mask) - 1;
            if (e[ei].node == rec && e[ei].inst == inst) {
                return ei;
            }
        }
        if (!omni_index_slot_goes_on(t, v, dist)) {
            return OMNI_INDEX_NIL;
        }
        if (++i == t->slots) {
            i = 0;
        }
    }
}


static uint32_t
omni_index_eng_find(const omni_index_t *idx, uint64_t ehash, uint32_t inst)
{
    const omni_index_tab_t    *t = &idx->tab[OMNI_INDEX_T_ENG];
    const uint32_t            *s = omni_index_slots(idx, OMNI_INDEX_T_ENG);
    const omni_index_entry_t  *e = omni_index_entries(idx);
    uint64_t                   key = omni_index_eng_key(ehash, inst);
    uint32_t                   i = omni_index_home(idx, OMNI_INDEX_T_ENG, key);
    uint32_t                   dist, v, ei;

    for (dist = 0; ; dist++) {
        v = s[i];
        if (v == 0) {
            return OMNI_INDEX_NIL;
        }
        if (omni_index_slot_may(t, v, dist, (uint32_t) key)) {
            ei = (v & t->ref_mask) - 1;
            if (omni_index_engine(&e[ei]) == ehash && e[ei].inst == inst) {
                return ei;
            }
        }
        if (!omni_index_slot_goes_on(t, v, dist)) {
            return OMNI_INDEX_NIL;
        }
        if (++i == t->slots) {
            i = 0;
        }
    }
}


/* ---- records ------------------------------------------------------------ */

static inline uint32_t
omni_index_rec_prev(const uint64_t *r)
{
    return (uint32_t) (r[1] >> 32);
}


static inline uint32_t
omni_index_rec_next(const uint64_t *r)
{
    return (uint32_t) r[1];
}


static void
omni_index_rec_set_links(uint64_t *r, uint32_t prev, uint32_t next)
{
    r[1] = (uint64_t) prev << 32 | next;
}


static void
omni_index_rec_unlink(omni_index_t *idx, uint32_t ri)
{
    uint64_t  *r = omni_index_rec(idx, ri), *x;
    uint32_t   p = omni_index_rec_prev(r), n = omni_index_rec_next(r);

    if (p != OMNI_INDEX_NIL) {
        x = omni_index_rec(idx, p);
        omni_index_rec_set_links(x, omni_index_rec_prev(x), n);
    } else {
        idx->free_rec = n;
    }

    if (n != OMNI_INDEX_NIL) {
        x = omni_index_rec(idx, n);
        omni_index_rec_set_links(x, p, omni_index_rec_next(x));
    }
}


/* A record for a new block, next to `hint` (the parent block's) if free. */
static uint32_t
omni_index_rec_alloc(omni_index_t *idx, uint64_t hash, uint32_t hint)
{
    uint32_t   ri = idx->free_rec;
    uint64_t  *r;

    if (hint != OMNI_INDEX_NIL) {
        if (hint + 1 < idx->cfg.max_nodes
            && omni_index_rec(idx, hint + 1)[0] == 0)
        {
            ri = hint + 1;
        } else if (hint > 0 && omni_index_rec(idx, hint - 1)[0] == 0) {
            ri = hint - 1;
        }
    }

    omni_index_rec_unlink(idx, ri);

    r = omni_index_rec(idx, ri);
    r[0] = hash;
    memset(r + 1, 0, 8 * idx->words);

    omni_index_tab_add(idx, OMNI_INDEX_T_NODE, omni_index_node_key(hash), ri);
    idx->n_nodes++;

    return ri;
}


static void
omni_index_rec_free(omni_index_t *idx, uint32_t ri)
{
    uint64_t  *r = omni_index_rec(idx, ri), *h;

    omni_index_tab_del(idx, OMNI_INDEX_T_NODE, omni_index_node_key(r[0]), ri);

    r[0] = 0;
    omni_index_rec_set_links(r, OMNI_INDEX_NIL, idx->free_rec);
    if (idx->free_rec != OMNI_INDEX_NIL) {
        h = omni_index_rec(idx, idx->free_rec);
        omni_index_rec_set_links(h, ri, omni_index_rec_next(h));
    }
    idx->free_rec = ri;
    idx->n_nodes--;
}


static inline int
omni_index_rec_has(const omni_index_t *idx, uint32_t ri, uint32_t inst)
{
    return (omni_index_rec(idx, ri)[1 + inst / 64] >> (inst % 64)) & 1;
}


/* ---- LRU lists ----------------------------------------------------------- */

static void
omni_index_unlink(omni_index_t *idx, uint32_t ei)
{
    omni_index_entry_t  *e = omni_index_entries(idx);
    omni_index_inst_t   *in = &omni_index_insts(idx)[e[ei].inst];
    int                  k = e[ei].kind;
    uint32_t             p = e[ei].prev, n = e[ei].next;

    if (p != OMNI_INDEX_NIL) {
        e[p].next = n;
    } else {
        in->head[k] = n;
    }

    if (n != OMNI_INDEX_NIL) {
        e[n].prev = p;
    } else {
        in->tail[k] = p;
        in->tail_access[k] = p != OMNI_INDEX_NIL ? e[p].last_access : 0;
    }

    in->count[k]--;
}


/* Link ei into its kind's list right behind `after`, or at the head when
 * `after` is NIL, is ei itself, or is in the other list. */
static void
omni_index_link(omni_index_t *idx, uint32_t ei, uint32_t after)
{
    omni_index_entry_t  *e = omni_index_entries(idx);
    omni_index_inst_t   *in = &omni_index_insts(idx)[e[ei].inst];
    int                  k = e[ei].kind;
    uint32_t             n;

    if (after == ei || (after != OMNI_INDEX_NIL && e[after].kind != k)) {
        after = OMNI_INDEX_NIL;
    }

    if (after == OMNI_INDEX_NIL) {
        n = in->head[k];
        in->head[k] = ei;
    } else {
        n = e[after].next;
        e[after].next = ei;
    }

    e[ei].prev = after;
    e[ei].next = n;

    if (n != OMNI_INDEX_NIL) {
        e[n].prev = ei;
    } else {
        in->tail[k] = ei;
        in->tail_access[k] = e[ei].last_access;
    }

    in->count[k]++;
}


/* Is ei where omni_index_link(idx, ei, after) would put it? */
static int
omni_index_linked_at(omni_index_t *idx, uint32_t ei, uint32_t after)
{
    omni_index_entry_t  *e = omni_index_entries(idx);

    if (after == ei
        || (after != OMNI_INDEX_NIL && e[after].kind != e[ei].kind))
    {
        after = OMNI_INDEX_NIL;
    }

    if (after == OMNI_INDEX_NIL) {
        return omni_index_insts(idx)[e[ei].inst].head[e[ei].kind] == ei;
    }

    return e[ei].prev == after;
}


/* Remove entry ei from everything and put it on the free list. */
static void
omni_index_drop(omni_index_t *idx, uint32_t ei)
{
    omni_index_entry_t  *e = omni_index_entries(idx);
    uint64_t            *r;
    uint32_t             ri = e[ei].node, inst = e[ei].inst, w;
    uint64_t             any;

    omni_index_unlink(idx, ei);
    omni_index_tab_del(idx, OMNI_INDEX_T_KEY, omni_index_key_key(ri, inst), ei);
    if (e[ei].kind == OMNI_INDEX_PRECISE) {
        omni_index_tab_del(idx, OMNI_INDEX_T_ENG,
            omni_index_eng_key(omni_index_engine(&e[ei]), inst), ei);
        idx->n_precise--;
    }

    r = omni_index_rec(idx, ri);
    r[1 + inst / 64] &= ~((uint64_t) 1 << (inst % 64));
    for (any = 0, w = 0; w < idx->words; w++) {
        any |= r[1 + w];
    }
    if (!any) {
        omni_index_rec_free(idx, ri);
    }

    e[ei].kind = OMNI_INDEX_FREE;
    e[ei].node = OMNI_INDEX_NIL;
    e[ei].engine[0] = e[ei].engine[1] = 0;
    e[ei].prev = OMNI_INDEX_NIL;
    e[ei].next = idx->free_entry;
    idx->free_entry = ei;
    idx->n_entries--;
}


/*
 * Start loading what evicting the next victims will touch, in stages: `ei`
 * (the next victim, its entry already in cache) gets its node-table slot
 * (its record was fetched a step ago) and key slot; the one after it gets
 * its record; the one after that its entry.
 */
static inline void
omni_index_prefetch_victim(const omni_index_t *idx, uint32_t ei)
{
    const omni_index_entry_t  *e = omni_index_entries(idx);
    uint32_t                   p;

    if (ei == OMNI_INDEX_NIL) {
        return;
    }

    __builtin_prefetch(omni_index_slots(idx, OMNI_INDEX_T_NODE)
        + omni_index_home(idx, OMNI_INDEX_T_NODE,
              omni_index_node_key(omni_index_rec(idx, e[ei].node)[0])));
    __builtin_prefetch(omni_index_slots(idx, OMNI_INDEX_T_KEY)
        + omni_index_home(idx, OMNI_INDEX_T_KEY,
                          omni_index_key_key(e[ei].node, e[ei].inst)));

    p = e[ei].prev;
    if (p != OMNI_INDEX_NIL) {
        __builtin_prefetch(omni_index_rec(idx, e[p].node));
        if (e[p].prev != OMNI_INDEX_NIL) {
            __builtin_prefetch(&e[e[p].prev]);
        }
    }
}


/* ---- victims, expiry ----------------------------------------------------- */

static uint32_t
omni_index_inst_victim(const omni_index_t *idx, uint32_t inst)
{
    const omni_index_inst_t  *in = &omni_index_insts(idx)[inst];
    uint32_t                  a = in->tail[OMNI_INDEX_APPROX];
    uint32_t                  p = in->tail[OMNI_INDEX_PRECISE];

    if (a == OMNI_INDEX_NIL) {
        return p;
    }
    if (p == OMNI_INDEX_NIL) {
        return a;
    }

    return omni_index_older(in->tail_access[OMNI_INDEX_PRECISE],
                            in->tail_access[OMNI_INDEX_APPROX]) ? p : a;
}


/* The oldest list tail of all instances: O(instances), reads no entries. */
static uint32_t
omni_index_global_victim(const omni_index_t *idx)
{
    const omni_index_inst_t  *in = omni_index_insts(idx);
    uint32_t                  best = OMNI_INDEX_NIL, best_at = 0, i;
    int                       k;

    for (i = 0; i < idx->cfg.max_instances; i++) {
        for (k = OMNI_INDEX_APPROX; k >= OMNI_INDEX_PRECISE; k--) {
            if (in[i].tail[k] == OMNI_INDEX_NIL) {
                continue;
            }
            if (best == OMNI_INDEX_NIL
                || omni_index_older(in[i].tail_access[k], best_at))
            {
                best = in[i].tail[k];
                best_at = in[i].tail_access[k];
            }
        }
    }

    return best;
}


static void
omni_index_evicted(omni_index_t *idx, uint32_t ei)
{
    omni_index_insts(idx)[omni_index_entries(idx)[ei].inst].evicted++;
    omni_index_drop(idx, ei);
}


static uint32_t
omni_index_expire_inst(omni_index_t *idx, uint32_t inst, uint32_t now)
{
    omni_index_inst_t  *in = &omni_index_insts(idx)[inst];
    uint32_t            n = 0;

    while (in->tail[OMNI_INDEX_APPROX] != OMNI_INDEX_NIL
           && (int32_t) (now - in->tail_access[OMNI_INDEX_APPROX])
              >= (int32_t) idx->ttl_units)
    {
        omni_index_evicted(idx, in->tail[OMNI_INDEX_APPROX]);
        n++;
    }

    idx->stats.expired += n;
    return n;
}


int
omni_index_expire(omni_index_t *idx, uint64_t now_us)
{
    omni_index_inst_t  *in;
    uint32_t            i, n = 0, now = omni_index_stamp(now_us);

    if (idx == NULL) {
        return OMNI_EINVAL;
    }
    if (idx->ttl_units == 0) {
        return 0;
    }

    in = omni_index_insts(idx);
    for (i = 0; i < idx->cfg.max_instances; i++) {
        if (in[i].count[OMNI_INDEX_APPROX]) {
            n += omni_index_expire_inst(idx, i, now);
        }
    }

    return (int) n;
}


/* ---- match --------------------------------------------------------------- */

static void
omni_index_walk_begin(const omni_index_t *idx, omni_index_walk_t *w,
    uint32_t *out, size_t n_out)
{
    uint32_t  n = idx->cfg.max_instances, i;

    if (n_out < n) {
        n = (uint32_t) n_out;
    }

    memset(out, 0, n_out * sizeof(uint32_t));
    memset(w->alive, 0, sizeof(w->alive));
    w->words = idx->words;
    w->pos = 0;
    w->last = OMNI_INDEX_NIL;
    w->scattered = 0;
    w->done = n == 0;

    for (i = 0; i < n / 64; i++) {
        w->alive[i] = ~(uint64_t) 0;
    }
    if (n % 64) {
        w->alive[n / 64] = ((uint64_t) 1 << (n % 64)) - 1;
    }
}


/*
 * Prefetch for block j while the walk is at j - PREFETCH: its home slot in
 * the node table, and (one stage later) the record that slot points to.
 * Only done while guesses fail; a prompt stored as a run needs none.
 */
static inline void
omni_index_walk_prefetch(const omni_index_t *idx, const uint64_t *hashes,
    size_t i, size_t n)
{
    const omni_index_tab_t  *t = &idx->tab[OMNI_INDEX_T_NODE];
    const uint32_t          *s = omni_index_slots(idx, OMNI_INDEX_T_NODE);
    size_t                   j;
    uint32_t                 v;

    j = i + 2 * OMNI_INDEX_PREFETCH;
    if (j < n) {
        __builtin_prefetch(s + omni_index_home(idx, OMNI_INDEX_T_NODE,
                                   omni_index_node_key(hashes[j])));
    }

    j = i + OMNI_INDEX_PREFETCH;
    if (j < n) {
        v = s[omni_index_home(idx, OMNI_INDEX_T_NODE,
                              omni_index_node_key(hashes[j]))];
        if (v != 0) {
            __builtin_prefetch(omni_index_rec(idx, (v & t->ref_mask) - 1));
        }
    }
}


static void
omni_index_walk(const omni_index_t *idx, omni_index_walk_t *w,
    const uint64_t *hashes, size_t n, uint32_t *out)
{
    const uint64_t  *bits;
    uint64_t         a, keep, gone, any;
    uint32_t         r, wi;
    size_t           i;
    int              guessed;

    for (i = 0; i < n && !w->done; i++) {
        if (w->scattered) {
            omni_index_walk_prefetch(idx, hashes, i, n);
        }

        r = hashes[i] ? omni_index_node_find(idx, hashes[i], w->last,
                                             &guessed)
                      : OMNI_INDEX_NIL;
        if (r == OMNI_INDEX_NIL) {
            w->done = 1;
            break;
        }

        if (w->last != OMNI_INDEX_NIL) {
            w->scattered = !guessed;
        }
        w->last = r;

        bits = omni_index_rec(idx, r) + 1;
        any = 0;
        for (wi = 0; wi < w->words; wi++) {
            a = w->alive[wi];
            keep = a & bits[wi];
            gone = a & ~keep;
            while (gone) {
                out[wi * 64 + (uint32_t) __builtin_ctzll(gone)] = w->pos;
                gone &= gone - 1;
            }
            w->alive[wi] = keep;
            any |= keep;
        }

        if (!any) {
            w->done = 1;
            break;
        }

        w->pos++;
    }
}


static int
omni_index_walk_end(omni_index_walk_t *w, uint32_t *out)
{
    uint64_t  a;
    uint32_t  wi;

    for (wi = 0; wi < w->words; wi++) {
        a = w->alive[wi];
        while (a) {
            out[wi * 64 + (uint32_t) __builtin_ctzll(a)] = w->pos;
            a &= a - 1;
        }
    }

    /* Whoever was still in the running when the walk stopped holds pos
     * blocks; everyone else dropped out earlier. */
    return (int) w->pos;
}


int
omni_index_match_prefix(omni_index_t *idx, const uint64_t *hashes, size_t n,
    uint64_t now_us, uint32_t *out, size_t n_out)
{
    omni_index_walk_t  w;

    if (idx == NULL || (n > 0 && hashes == NULL)
        || (n_out > 0 && out == NULL) || n > INT32_MAX)
    {
        return OMNI_EINVAL;
    }

    (void) omni_index_expire(idx, now_us);

    omni_index_walk_begin(idx, &w, out, n_out);
    omni_index_walk(idx, &w, hashes, n, out);

    return omni_index_walk_end(&w, out);
}


int
omni_index_match_prefix_tokens(omni_index_t *idx, const uint32_t *tokens,
    size_t n_tokens, uint64_t now_us, uint32_t *out, size_t n_out)
{
    omni_index_walk_t  w;
    uint64_t           buf[256], parent;
    size_t             bs, n, k;
    int                got;

    if (idx == NULL || (n_out > 0 && out == NULL) || idx->cfg.block_size == 0
        || (n_tokens > 0 && tokens == NULL))
    {
        return OMNI_EINVAL;
    }

    (void) omni_index_expire(idx, now_us);

    bs = idx->cfg.block_size;
    n = n_tokens / bs;
    if (n > INT32_MAX) {
        n = INT32_MAX;
    }

    omni_index_walk_begin(idx, &w, out, n_out);
    parent = omni_hash_root(idx->cfg.seed);

    /* Hash a chunk, walk it, stop hashing as soon as the walk stops. */
    for (k = 0; k < n && !w.done; k += (size_t) got) {
        got = omni_hash_blocks_from(parent, tokens + k * bs, (n - k) * bs,
                                    (uint32_t) bs, buf, 256);
        if (got <= 0) {
            break;
        }
        parent = buf[got - 1];
        omni_index_walk(idx, &w, buf, (size_t) got, out);
    }

    return omni_index_walk_end(&w, out);
}


/* ---- insert ------------------------------------------------------------- */

/*
 * The steady state of a full instance: a block nobody holds comes in, and
 * the instance's victim is the only holder of its block.  Evicting it and
 * inserting the new block would free an entry and a record and take them
 * straight back (same instance, same record: the same key-table slot), so
 * the victim's entry and record are reused in place instead: the record is
 * re-keyed in the block table, the entry relinked.  The result is the one of
 * evict-then-insert.  Returns the entry, or NIL when this does not apply.
 */
static uint32_t
omni_index_recycle(omni_index_t *idx, uint32_t inst, uint64_t hash, int kind,
    uint64_t ehash, uint32_t prev, uint32_t now)
{
    omni_index_entry_t  *e = omni_index_entries(idx);
    uint64_t            *r;
    uint32_t             v, ri, w;

    v = omni_index_inst_victim(idx, inst);
    if (v == prev || v == OMNI_INDEX_NIL) {
        return OMNI_INDEX_NIL;
    }

    ri = e[v].node;
    r = omni_index_rec(idx, ri);
    for (w = 0; w < idx->words; w++) {
        if (r[1 + w] != (w == inst / 64 ? (uint64_t) 1 << (inst % 64) : 0)) {
            return OMNI_INDEX_NIL;          /* others hold it too */
        }
    }

    omni_index_unlink(idx, v);
    if (e[v].kind == OMNI_INDEX_PRECISE) {
        omni_index_tab_del(idx, OMNI_INDEX_T_ENG,
            omni_index_eng_key(omni_index_engine(&e[v]), inst), v);
        idx->n_precise--;
    }

    omni_index_tab_del(idx, OMNI_INDEX_T_NODE, omni_index_node_key(r[0]), ri);
    r[0] = hash;
    omni_index_tab_add(idx, OMNI_INDEX_T_NODE, omni_index_node_key(hash), ri);

    e[v].kind = (uint8_t) kind;
    e[v].engine[0] = kind == OMNI_INDEX_PRECISE ? (uint32_t) ehash : 0;
    e[v].engine[1] = kind == OMNI_INDEX_PRECISE ? (uint32_t) (ehash >> 32)
                                                : 0;
    if (kind == OMNI_INDEX_PRECISE) {
        omni_index_tab_add(idx, OMNI_INDEX_T_ENG,
                           omni_index_eng_key(ehash, inst), v);
        idx->n_precise++;
    }
    e[v].last_access = now;
    omni_index_link(idx, v, prev);

    omni_index_insts(idx)[inst].evicted++;
    idx->stats.evicted_instance++;
    idx->stats.inserted++;
    omni_index_prefetch_victim(idx, omni_index_inst_victim(idx, inst));

    return v;
}


/*
 * Put block `hash` on instance inst as `kind`, behind entry `prev` in its
 * list.  Returns the entry, or NIL when making room would evict `prev` (the
 * block the caller is extending): the caller stops there.
 */
static uint32_t
omni_index_upsert(omni_index_t *idx, uint32_t inst, uint64_t hash, int kind,
    uint64_t ehash, uint32_t prev, uint32_t now)
{
    omni_index_entry_t  *e = omni_index_entries(idx);
    omni_index_inst_t   *in = &omni_index_insts(idx)[inst];
    uint32_t             ri, ei, v, hint;
    int                  guessed, linked;

    hint = prev != OMNI_INDEX_NIL ? e[prev].node : OMNI_INDEX_NIL;
    ri = omni_index_node_find(idx, hash, hint, &guessed);

    if (ri != OMNI_INDEX_NIL && omni_index_rec_has(idx, ri, inst)) {
        ei = omni_index_key_find(idx, ri, inst);
        linked = 1;

        if (kind == OMNI_INDEX_PRECISE) {
            if (e[ei].kind == OMNI_INDEX_APPROX) {
                /* from the approximate list to the precise one */
                omni_index_unlink(idx, ei);
                linked = 0;

                e[ei].kind = OMNI_INDEX_PRECISE;
                idx->n_precise++;

            } else if (omni_index_engine(&e[ei]) != ehash) {
                omni_index_tab_del(idx, OMNI_INDEX_T_ENG,
                    omni_index_eng_key(omni_index_engine(&e[ei]), inst), ei);
                idx->stats.remapped++;

            } else {
                goto linked;
            }

            e[ei].engine[0] = (uint32_t) ehash;
            e[ei].engine[1] = (uint32_t) (ehash >> 32);
            omni_index_tab_add(idx, OMNI_INDEX_T_ENG,
                               omni_index_eng_key(ehash, inst), ei);
        }

    linked:

        e[ei].last_access = now;
        idx->stats.touched++;

        /*
         * A prompt sent again finds each block already right behind its
         * parent (the first at the head): unlinking and linking it back
         * would give the same list, so only the tail's stamp can change.
         */
        if (linked && omni_index_linked_at(idx, ei, prev)) {
            if (in->tail[e[ei].kind] == ei) {
                in->tail_access[e[ei].kind] = now;
            }

            return ei;
        }

        if (linked) {
            omni_index_unlink(idx, ei);
        }

        omni_index_link(idx, ei, prev);

        return ei;
    }

    /* A new entry: make room first.  Records never move, but a record whose
     * last holder is evicted is freed. */

    if (in->capacity == 0) {
        return OMNI_INDEX_NIL;
    }

    if (ri == OMNI_INDEX_NIL && in->count[0] + in->count[1] == in->capacity) {
        ei = omni_index_recycle(idx, inst, hash, kind, ehash, prev, now);
        if (ei != OMNI_INDEX_NIL) {
            return ei;
        }
    }

    while (in->count[0] + in->count[1] >= in->capacity) {
        v = omni_index_inst_victim(idx, inst);
        if (v == prev) {
            return OMNI_INDEX_NIL;
        }
        omni_index_evicted(idx, v);
        idx->stats.evicted_instance++;
        omni_index_prefetch_victim(idx, omni_index_inst_victim(idx, inst));
    }

    while (idx->n_entries >= idx->cfg.max_entries) {
        v = omni_index_global_victim(idx);
        if (v == prev) {
            return OMNI_INDEX_NIL;
        }
        omni_index_evicted(idx, v);
        idx->stats.evicted_global++;
    }

    if (ri != OMNI_INDEX_NIL && omni_index_rec(idx, ri)[0] != hash) {
        ri = OMNI_INDEX_NIL;
    }

    if (ri == OMNI_INDEX_NIL) {
        while (idx->n_nodes >= idx->cfg.max_nodes) {
            v = omni_index_global_victim(idx);
            if (v == prev) {
                return OMNI_INDEX_NIL;
            }
            omni_index_evicted(idx, v);
            idx->stats.evicted_global++;
        }
        ri = omni_index_rec_alloc(idx, hash, hint);
    }

    omni_index_rec(idx, ri)[1 + inst / 64] |= (uint64_t) 1 << (inst % 64);

    ei = idx->free_entry;
    idx->free_entry = e[ei].next;
    idx->n_entries++;

    e[ei].node = ri;
    e[ei].engine[0] = kind == OMNI_INDEX_PRECISE ? (uint32_t) ehash : 0;
    e[ei].engine[1] = kind == OMNI_INDEX_PRECISE ? (uint32_t) (ehash >> 32)
                                                 : 0;
    e[ei].last_access = now;
    e[ei].inst = (uint16_t) inst;
    e[ei].kind = (uint8_t) kind;

    omni_index_tab_add(idx, OMNI_INDEX_T_KEY, omni_index_key_key(ri, inst), ei);
    if (kind == OMNI_INDEX_PRECISE) {
        omni_index_tab_add(idx, OMNI_INDEX_T_ENG,
                           omni_index_eng_key(ehash, inst), ei);
        idx->n_precise++;
    }

    omni_index_link(idx, ei, prev);
    idx->stats.inserted++;

    return ei;
}


int
omni_index_insert(omni_index_t *idx, uint32_t inst, const uint64_t *hashes,
    size_t n, uint64_t now_us)
{
    uint32_t  now = omni_index_stamp(now_us), prev = OMNI_INDEX_NIL;
    size_t    k;

    if (idx == NULL || inst >= idx->cfg.max_instances
        || (n > 0 && hashes == NULL) || n > INT32_MAX)
    {
        return OMNI_EINVAL;
    }
    for (k = 0; k < n; k++) {
        if (hashes[k] == 0) {
            return OMNI_EINVAL;
        }
    }

    if (idx->ttl_units) {
        (void) omni_index_expire_inst(idx, inst, now);
    }

    for (k = 0; k < n; k++) {
        if (k + OMNI_INDEX_PREFETCH < n) {
            __builtin_prefetch(omni_index_slots(idx, OMNI_INDEX_T_NODE)
                + omni_index_home(idx, OMNI_INDEX_T_NODE,
                      omni_index_node_key(hashes[k + OMNI_INDEX_PREFETCH])));
        }

        prev = omni_index_upsert(idx, inst, hashes[k], OMNI_INDEX_APPROX, 0,
                                 prev, now);
        if (prev == OMNI_INDEX_NIL) {
            idx->stats.truncated++;
            break;
        }
    }

    return (int) k;
}


/* Drop inst's entries of the blocks; approx_only: only those the proxy
 * marked itself (a precise entry is the engine's word: a failed request of
 * ours does not change what it holds). */
static int
omni_index_drop_blocks(omni_index_t *idx, uint32_t inst,
    const uint64_t *hashes, size_t n, int approx_only)
{
    uint32_t             ri, ei;
    size_t               k;
    int                  got = 0;
    omni_index_entry_t  *e;

    if (idx == NULL || inst >= idx->cfg.max_instances
        || (n > 0 && hashes == NULL) || n > INT32_MAX)
    {
        return OMNI_EINVAL;
    }

    e = omni_index_entries(idx);

    for (k = 0; k < n; k++) {
        if (hashes[k] == 0) {
            continue;
        }
        ri = omni_index_node_lookup(idx, hashes[k]);
        if (ri == OMNI_INDEX_NIL || !omni_index_rec_has(idx, ri, inst)) {
            continue;
        }
        ei = omni_index_key_find(idx, ri, inst);
        if (approx_only && e[ei].kind != OMNI_INDEX_APPROX) {
            continue;
        }
        omni_index_drop(idx, ei);
        got++;
    }

    idx->stats.removed += (uint64_t) got;
    return got;
}


int
omni_index_remove(omni_index_t *idx, uint32_t inst, const uint64_t *hashes,
    size_t n)
{
    return omni_index_drop_blocks(idx, inst, hashes, n, 0);
}


int
omni_index_withdraw(omni_index_t *idx, uint32_t inst,
    const uint64_t *hashes, size_t n)
{
    return omni_index_drop_blocks(idx, inst, hashes, n, 1);
}


/* ---- precise: KV events -------------------------------------------------- */

int
omni_index_store(omni_index_t *idx, uint32_t inst,
    const uint64_t *engine_hashes, size_t n_blocks, int has_parent,
    uint64_t parent, const uint32_t *tokens, size_t n_tokens,
    uint64_t now_us)
{
    return omni_index_store_chains(idx, inst, engine_hashes, n_blocks,
                                   has_parent, parent, tokens, n_tokens,
                                   now_us, NULL);
}


int
omni_index_store_chains(omni_index_t *idx, uint32_t inst,
    const uint64_t *engine_hashes, size_t n_blocks, int has_parent,
    uint64_t parent, const uint32_t *tokens, size_t n_tokens,
    uint64_t now_us, uint64_t *chains)
{
    omni_index_entry_t  *e;
    uint64_t             chain;
    uint32_t             now = omni_index_stamp(now_us), prev, m;
    size_t               bs, k;

    if (idx == NULL || inst >= idx->cfg.max_instances
        || idx->cfg.block_size == 0 || n_blocks > INT32_MAX
        || (n_blocks > 0 && (engine_hashes == NULL || tokens == NULL)))
    {
        return OMNI_EINVAL;
    }

    bs = idx->cfg.block_size;
    if (n_tokens != n_blocks * bs) {
        return OMNI_EINVAL;
    }

    e = omni_index_entries(idx);

    if (idx->ttl_units) {
        (void) omni_index_expire_inst(idx, inst, now);
    }

    if (has_parent) {
        m = omni_index_eng_find(idx, parent, inst);
        if (m == OMNI_INDEX_NIL) {
            idx->stats.orphan_stores++;
            return OMNI_ENOTFOUND;
        }
        chain = omni_index_rec(idx, e[m].node)[0];

    } else {
        chain = omni_hash_root(idx->cfg.seed);
    }

    prev = OMNI_INDEX_NIL;

    for (k = 0; k < n_blocks; k++) {
        chain = omni_hash_block(chain, tokens + k * bs, bs);

        /* The engine now uses this hash for this block: a mapping of it to
         * another block of ours is stale. */
        m = omni_index_eng_find(idx, engine_hashes[k], inst);
        if (m != OMNI_INDEX_NIL && omni_index_rec(idx, e[m].node)[0] != chain) {
            if (m == prev) {
                prev = OMNI_INDEX_NIL;
            }
            omni_index_drop(idx, m);
            idx->stats.remapped++;
        }

        prev = omni_index_upsert(idx, inst, chain, OMNI_INDEX_PRECISE,
                                 engine_hashes[k], prev, now);
        if (prev == OMNI_INDEX_NIL) {
            idx->stats.truncated++;
            break;
        }

        if (chains != NULL) {
            chains[k] = chain;
        }
    }

    return (int) k;
}


int
omni_index_store_removed(omni_index_t *idx, uint32_t inst,
    const uint64_t *engine_hashes, size_t n)
{
    uint32_t  m;
    size_t    k;
    int       got = 0;

    if (idx == NULL || inst >= idx->cfg.max_instances
        || (n > 0 && engine_hashes == NULL) || n > INT32_MAX)
    {
        return OMNI_EINVAL;
    }

    for (k = 0; k < n; k++) {
        m = omni_index_eng_find(idx, engine_hashes[k], inst);
        if (m == OMNI_INDEX_NIL) {
            idx->stats.unknown_removals++;
            continue;
        }
        omni_index_drop(idx, m);
        got++;
    }

    idx->stats.removed += (uint64_t) got;
    return got;
}


int
omni_index_clear(omni_index_t *idx, uint32_t inst)
{
    omni_index_inst_t  *in;
    int                 k, got = 0;

    if (idx == NULL || inst >= idx->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_index_insts(idx)[inst];
    for (k = 0; k < 2; k++) {
        while (in->head[k] != OMNI_INDEX_NIL) {
            omni_index_drop(idx, in->head[k]);
            got++;
        }
    }

    idx->stats.cleared += (uint64_t) got;
    return got;
}


/* ---- capacity ------------------------------------------------------------ */

int
omni_index_set_capacity(omni_index_t *idx, uint32_t inst, uint32_t capacity)
{
    omni_index_inst_t  *in;
    int                 got = 0;

    if (idx == NULL || inst >= idx->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_index_insts(idx)[inst];
    in->capacity = capacity;

    while (in->count[0] + in->count[1] > capacity) {
        omni_index_evicted(idx, omni_index_inst_victim(idx, inst));
        got++;
    }

    idx->stats.evicted_instance += (uint64_t) got;
    return got;
}


int
omni_index_evict(omni_index_t *idx, uint32_t inst, size_t n)
{
    uint32_t  v;
    size_t    k;

    if (idx == NULL || n > INT32_MAX
        || (inst != OMNI_INDEX_ALL && inst >= idx->cfg.max_instances))
    {
        return OMNI_EINVAL;
    }

    for (k = 0; k < n; k++) {
        v = inst == OMNI_INDEX_ALL ? omni_index_global_victim(idx)
                                   : omni_index_inst_victim(idx, inst);
        if (v == OMNI_INDEX_NIL) {
            break;
        }
        omni_index_evicted(idx, v);
    }

    idx->stats.evicted_explicit += k;
    return (int) k;
}


/* ---- introspection ------------------------------------------------------ */

void
omni_index_stats(const omni_index_t *idx, omni_index_stats_t *out)
{
    *out = idx->stats;
    out->entries = idx->n_entries;
    out->precise = idx->n_precise;
    out->approx = idx->n_entries - idx->n_precise;
    out->nodes = idx->n_nodes;
    out->max_entries = idx->cfg.max_entries;
    out->max_nodes = idx->cfg.max_nodes;
    out->bytes = idx->size;
}


int
omni_index_instance_stats(const omni_index_t *idx, uint32_t inst,
    omni_index_instance_t *out)
{
    const omni_index_inst_t  *in;

    if (idx == NULL || out == NULL || inst >= idx->cfg.max_instances) {
        return OMNI_EINVAL;
    }

    in = &omni_index_insts(idx)[inst];
    out->precise = in->count[OMNI_INDEX_PRECISE];
    out->approx = in->count[OMNI_INDEX_APPROX];
    out->blocks = out->precise + out->approx;
    out->capacity = in->capacity;
    out->evicted = in->evicted;

    return OMNI_OK;
}


int
omni_index_lru(const omni_index_t *idx, uint32_t inst, int kind,
    uint64_t *out, size_t cap)
{
    const omni_index_entry_t  *e;
    uint32_t                   ei;
    size_t                     n = 0;

    if (idx == NULL || inst >= idx->cfg.max_instances
        || (kind != OMNI_INDEX_PRECISE && kind != OMNI_INDEX_APPROX)
        || (cap > 0 && out == NULL))
    {
        return OMNI_EINVAL;
    }

    e = omni_index_entries(idx);
    for (ei = omni_index_insts(idx)[inst].head[kind]; ei != OMNI_INDEX_NIL;
         ei = e[ei].next)
    {
        if (n < cap) {
            out[n] = omni_index_rec(idx, e[ei].node)[0];
        }
        n++;
    }

    return (int) n;
}


/* ---- integrity ----------------------------------------------------------- */

#define OMNI_INDEX_CHECK(cond)                                                \
    do { if (!(cond)) return OMNI_EINTEGRITY; } while (0)


static int
omni_index_check_lists(const omni_index_t *idx, uint64_t *used,
    uint64_t *precise)
{
    const omni_index_entry_t  *e = omni_index_entries(idx);
    const omni_index_inst_t   *in = omni_index_insts(idx);
    uint32_t                   i, ei, prev, count;
    int                        k;

    *used = 0;
    *precise = 0;

    for (i = 0; i < idx->cfg.max_instances; i++) {
        for (k = 0; k < 2; k++) {
            prev = OMNI_INDEX_NIL;
            count = 0;
            for (ei = in[i].head[k]; ei != OMNI_INDEX_NIL; ei = e[ei].next) {
                OMNI_INDEX_CHECK(ei < idx->cfg.max_entries);
                OMNI_INDEX_CHECK(count < idx->cfg.max_entries);
                OMNI_INDEX_CHECK(e[ei].kind == k && e[ei].inst == i);
                OMNI_INDEX_CHECK(e[ei].prev == prev);
                prev = ei;
                count++;
            }
            OMNI_INDEX_CHECK(in[i].tail[k] == prev);
            OMNI_INDEX_CHECK(in[i].count[k] == count);
            OMNI_INDEX_CHECK(prev == OMNI_INDEX_NIL
                             || in[i].tail_access[k] == e[prev].last_access);
            *used += count;
            if (k == OMNI_INDEX_PRECISE) {
                *precise += count;
            }
        }
        OMNI_INDEX_CHECK(in[i].count[0] + in[i].count[1] <= in[i].capacity);
    }

    return OMNI_OK;
}


/* Every slot of table t: a live reference, found by a lookup of its own key
 * (so no gap separates it from its home), with its distance recorded right;
 * returns the count in *n. */
static int
omni_index_check_tab(const omni_index_t *idx, int t, uint64_t *n)
{
    const omni_index_tab_t    *tab = &idx->tab[t];
    const uint32_t            *s = omni_index_slots(idx, t);
    const omni_index_entry_t  *e = omni_index_entries(idx);
    uint64_t                   key;
    uint32_t                   i, v, ref, home, dist, found;

    *n = 0;

    for (i = 0; i < tab->slots; i++) {
        v = s[i];
        if (v == 0) {
            continue;
        }

        ref = (v & tab->ref_mask) - 1;

        switch (t) {
        case OMNI_INDEX_T_NODE:
            OMNI_INDEX_CHECK(ref < idx->cfg.max_nodes);
            OMNI_INDEX_CHECK(omni_index_rec(idx, ref)[0] != 0);
            found = omni_index_node_lookup(idx, omni_index_rec(idx, ref)[0]);
            break;
        case OMNI_INDEX_T_KEY:
            OMNI_INDEX_CHECK(ref < idx->cfg.max_entries);
            OMNI_INDEX_CHECK(e[ref].kind != OMNI_INDEX_FREE);
            found = omni_index_key_find(idx, e[ref].node, e[ref].inst);
            break;
        default:
            OMNI_INDEX_CHECK(ref < idx->cfg.max_entries);
            OMNI_INDEX_CHECK(e[ref].kind == OMNI_INDEX_PRECISE);
            found = omni_index_eng_find(idx, omni_index_engine(&e[ref]),
                                        e[ref].inst);
            break;
        }
        OMNI_INDEX_CHECK(found == ref);

        key = omni_index_ref_key(idx, t, ref);
        home = omni_index_home(idx, t, key);
        dist = i >= home ? i - home : i + tab->slots - home;
        OMNI_INDEX_CHECK(v == omni_index_slot_val(tab, ref, dist,
                                                  omni_index_fp(t, key)));

        (*n)++;
    }

    return OMNI_OK;
}


static int
omni_index_check_records(const omni_index_t *idx, uint64_t *live,
    uint64_t *bits)
{
    const uint64_t  *r;
    uint64_t         any, nfree;
    uint32_t         i, w, prev, last = idx->cfg.max_instances % 64;

    *live = 0;
    *bits = 0;

    for (i = 0; i < idx->cfg.max_nodes; i++) {
        r = omni_index_rec(idx, i);
        if (r[0] == 0) {
            continue;
        }
        for (any = 0, w = 0; w < idx->words; w++) {
            any |= r[1 + w];
            *bits += (uint64_t) __builtin_popcountll(r[1 + w]);
        }
        OMNI_INDEX_CHECK(any != 0);
        OMNI_INDEX_CHECK(last == 0 || (r[idx->words] >> last) == 0);
        (*live)++;
    }

    nfree = 0;
    prev = OMNI_INDEX_NIL;
    for (i = idx->free_rec; i != OMNI_INDEX_NIL;
         i = omni_index_rec_next(omni_index_rec(idx, i)))
    {
        OMNI_INDEX_CHECK(i < idx->cfg.max_nodes);
        OMNI_INDEX_CHECK(nfree < idx->cfg.max_nodes);
        r = omni_index_rec(idx, i);
        OMNI_INDEX_CHECK(r[0] == 0 && omni_index_rec_prev(r) == prev);
        prev = i;
        nfree++;
    }

    OMNI_INDEX_CHECK(*live + nfree == idx->cfg.max_nodes);

    return OMNI_OK;
}


int
omni_index_check_integrity(const omni_index_t *idx)
{
    const omni_index_entry_t  *e;
    uint64_t                   used, precise, keys, engs, nodes, live, bits;
    uint64_t                   fl;
    uint32_t                   ei;
    int                        rc;

    if (idx == NULL) {
        return OMNI_EINVAL;
    }
    OMNI_INDEX_CHECK(idx->magic == OMNI_INDEX_MAGIC);

    e = omni_index_entries(idx);

    /* Free entries: right number, only free ones, no cycle. */
    fl = 0;
    for (ei = idx->free_entry; ei != OMNI_INDEX_NIL; ei = e[ei].next) {
        OMNI_INDEX_CHECK(ei < idx->cfg.max_entries);
        OMNI_INDEX_CHECK(fl < idx->cfg.max_entries);
        OMNI_INDEX_CHECK(e[ei].kind == OMNI_INDEX_FREE);
        fl++;
    }

    rc = omni_index_check_lists(idx, &used, &precise);
    if (rc != OMNI_OK) {
        return rc;
    }

    OMNI_INDEX_CHECK(used == idx->n_entries);
    OMNI_INDEX_CHECK(precise == idx->n_precise);
    OMNI_INDEX_CHECK(used + fl == idx->cfg.max_entries);

    /* Every held entry names a live record that has its bit. */
    for (ei = 0; ei < idx->cfg.max_entries; ei++) {
        if (e[ei].kind == OMNI_INDEX_FREE) {
            continue;
        }
        OMNI_INDEX_CHECK(e[ei].node < idx->cfg.max_nodes);
        OMNI_INDEX_CHECK(omni_index_rec(idx, e[ei].node)[0] != 0);
        OMNI_INDEX_CHECK(omni_index_rec_has(idx, e[ei].node, e[ei].inst));
    }

    rc = omni_index_check_records(idx, &live, &bits);
    if (rc != OMNI_OK) {
        return rc;
    }

    /* Bits and entries are in one-to-one correspondence: every entry has
     * its bit (above), and there are as many bits as entries. */
    OMNI_INDEX_CHECK(bits == used);
    OMNI_INDEX_CHECK(live == idx->n_nodes);

    if ((rc = omni_index_check_tab(idx, OMNI_INDEX_T_NODE, &nodes)) != OMNI_OK
        || (rc = omni_index_check_tab(idx, OMNI_INDEX_T_KEY, &keys)) != OMNI_OK
        || (rc = omni_index_check_tab(idx, OMNI_INDEX_T_ENG, &engs)) != OMNI_OK)
    {
        return rc;
    }

    OMNI_INDEX_CHECK(nodes == live);
    OMNI_INDEX_CHECK(keys == used);
    OMNI_INDEX_CHECK(engs == precise);

    return OMNI_OK;
}
