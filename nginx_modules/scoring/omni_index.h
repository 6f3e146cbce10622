/*
 * Omni Proxy scoring library: the prefix index.
 *
 * Which instance holds which blocks of which prompts.  Blocks are named by
 * their chained hashes (omni_hash.h), so a block's hash already stands for the
 * whole prefix that ends with it: the "tree" is implicit, and a request is
 * matched against every instance in one walk over its own blocks.
 *
 * Two ways in, per (block, instance) entry:
 *   precise      from the engine's KV events: a store names the engine's own
 *                block hashes (opaque 64-bit keys, kept in a map so a later
 *                removal finds our entry) and the parent block's engine hash;
 *                the new blocks extend the parent's chain.
 *   approximate  what the proxy itself dispatched; expires `approx_ttl_us`
 *                after its last touch.  A precise store of the same block
 *                turns it precise; an approximate insert never downgrades a
 *                precise entry.
 *
 * Bounded memory, fixed at creation: a capacity per instance (blocks), a
 * global capacity (entries) and a node capacity (distinct blocks).  Inserting
 * past a capacity evicts the least recently used entry (of the instance, or
 * globally the entry whose age is largest); nothing is dropped silently: the
 * insert functions return how many blocks they stored.
 *
 * LRU order: every instance keeps two lists (precise, approximate), most
 * recent first.  Within one call, block 0 goes to the front and block k right
 * behind block k-1, so a prompt's deepest blocks are evicted before its
 * first ones (evicting block 0 would make the rest unmatchable).  An insert
 * stops early instead of evicting the block it is extending.
 *
 * Memory and concurrency: everything lives in one block sized by
 * omni_index_size(); internal links are 32-bit indices and offsets, never
 * pointers, so the block may live in shared memory mapped by several
 * processes.  Operations never allocate.  Locking is the caller's job; every
 * operation, match included, may modify the index (match drops expired
 * approximate entries first).  Time is the caller's monotonic clock in
 * microseconds; entries keep it at ~1 ms resolution (now_us >> 10, 32 bits),
 * so ages and TTLs are exact up to ~24 days.
 *
 * Memory, all fixed by the configuration: per (block, instance) entry 28
 * bytes plus 6 in each of two lookup tables; per distinct block (max_nodes,
 * default max_entries) a record of 8 + 8 * ceil(max_instances / 64) bytes
 * plus 6 in the block table.  64 instances, no sharing: 62 bytes per entry.
 * A prompt inserted in one call occupies neighbouring records, so matching it
 * reads memory nearly sequentially.
 */

#ifndef OMNI_INDEX_H
#define OMNI_INDEX_H

#include "omni_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define OMNI_INDEX_MAX_INSTANCES  4096
#define OMNI_INDEX_MAX_ENTRIES    (1u << 30)

/* "any instance" for omni_index_evict(). */
#define OMNI_INDEX_ALL            UINT32_MAX

/* Entry kinds (the `kind` argument of omni_index_lru()). */
#define OMNI_INDEX_PRECISE        0
#define OMNI_INDEX_APPROX         1

typedef struct omni_index_s  omni_index_t;

typedef struct {
    uint32_t  max_instances;      /* 1 .. OMNI_INDEX_MAX_INSTANCES */
    uint32_t  block_size;         /* tokens per block, for the token helpers */
    uint64_t  seed;               /* hash namespace (model, LoRA, salt) */
    uint32_t  instance_capacity;  /* default per-instance capacity (blocks) */
    uint32_t  max_entries;        /* global capacity; 0: max_instances *
                                     instance_capacity (capped) */
    uint32_t  max_nodes;          /* distinct blocks; 0: max_entries */
    uint32_t  reserved;           /* must be 0 */
    uint64_t  approx_ttl_us;      /* approximate entries expire; 0: never */
} omni_index_cfg_t;

/* Whole-index counters: O(1), recomputed by omni_index_check_integrity(). */
typedef struct {
    uint64_t  entries;           /* (block, instance) entries held */
    uint64_t  precise;           /*   of which precise */
    uint64_t  approx;            /*   of which approximate */
    uint64_t  nodes;             /* distinct blocks held by anyone */
    uint64_t  max_entries;
    uint64_t  max_nodes;
    uint64_t  bytes;             /* omni_index_size() of this index */
    uint64_t  inserted;          /* entries created */
    uint64_t  touched;           /* existing entries refreshed */
    uint64_t  evicted_instance;  /* by a per-instance capacity */
    uint64_t  evicted_global;    /* by the global entry or node capacity */
    uint64_t  evicted_explicit;  /* by omni_index_evict() */
    uint64_t  expired;           /* approximate entries past their TTL */
    uint64_t  removed;           /* by omni_index_remove*(), _withdraw() */
    uint64_t  cleared;           /* by omni_index_clear() */
    uint64_t  truncated;         /* inserts/stores that stopped early */
    uint64_t  orphan_stores;     /* stores whose parent was unknown */
    uint64_t  unknown_removals;  /* removals of unknown engine hashes */
    uint64_t  remapped;          /* engine hashes moved to another block */
} omni_index_stats_t;

typedef struct {
    uint32_t  blocks;            /* entries held (precise + approx) */
    uint32_t  precise;
    uint32_t  approx;
    uint32_t  capacity;
    uint64_t  evicted;           /* entries of this instance evicted/expired */
} omni_index_instance_t;

/* ---- lifetime --------------------------------------------------------- */

/*
 * Bytes needed for an index with this configuration (0 if it is invalid).
 * The caller may round a shared zone up from this.
 */
size_t omni_index_size(const omni_index_cfg_t *cfg);

/*
 * Build an empty index in caller-owned memory: mem must be 8-byte aligned and
 * at least omni_index_size(cfg) bytes.  *out is mem itself.  The index holds
 * no pointer to anything outside [mem, mem + size); freeing mem frees it.
 */
int omni_index_init(void *mem, size_t size, const omni_index_cfg_t *cfg,
    omni_index_t **out);

/* Allocate one block through `a` and init it.  Free with omni_index_free()
 * and the same allocator. */
omni_index_t *omni_index_new(const omni_index_cfg_t *cfg,
    const omni_allocator_t *a, int *rc);
void omni_index_free(omni_index_t *idx, const omni_allocator_t *a);

/*
 * An index found in memory that outlived its creator (nginx reload): returns
 * mem as an index if it holds one of this library's layout, else NULL.
 */
omni_index_t *omni_index_attach(void *mem, size_t size);

/* The resolved configuration (defaults filled in). */
void omni_index_get_cfg(const omni_index_t *idx, omni_index_cfg_t *cfg);

/* ---- queries ------------------------------------------------------------ */

/*
 * For every instance i < n_out, out[i] = how many leading blocks of
 * hashes[0, n) instance i holds.  One walk over the request's blocks; stops
 * at the first block nobody still in the running holds.  Expired approximate
 * entries are dropped first.  Returns the largest out[i] (>= 0) or an error.
 */
int omni_index_match_prefix(omni_index_t *idx, const uint64_t *hashes,
    size_t n, uint64_t now_us, uint32_t *out, size_t n_out);

/* The same for a prompt of token ids, hashed with the index's block size and
 * seed as the walk goes (no buffer for the hashes is needed). */
int omni_index_match_prefix_tokens(omni_index_t *idx, const uint32_t *tokens,
    size_t n_tokens, uint64_t now_us, uint32_t *out, size_t n_out);

void omni_index_stats(const omni_index_t *idx, omni_index_stats_t *out);
int omni_index_instance_stats(const omni_index_t *idx, uint32_t inst,
    omni_index_instance_t *out);

/*
 * Block hashes of one of instance inst's LRU lists (kind OMNI_INDEX_PRECISE
 * or OMNI_INDEX_APPROX), most recent first: writes min(count, cap), returns
 * the list's length.  For tests and /omni/status.
 */
int omni_index_lru(const omni_index_t *idx, uint32_t inst, int kind,
    uint64_t *out, size_t cap);

/*
 * Recompute every counter, list, table and bitmap from scratch and compare:
 * OMNI_OK or OMNI_EINTEGRITY.  O(size of the index); for tests.
 */
int omni_index_check_integrity(const omni_index_t *idx);

/* ---- approximate: what the proxy dispatched ----------------------------- */

/*
 * Record that instance inst holds hashes[0, n) (a prompt's blocks, in order).
 * Existing entries are refreshed (precise ones stay precise).  Returns the
 * number of leading blocks now held (n unless a capacity forced an early stop)
 * or an error.
 */
int omni_index_insert(omni_index_t *idx, uint32_t inst,
    const uint64_t *hashes, size_t n, uint64_t now_us);

/* Drop instance inst's entries for these blocks (e.g. a failed dispatch).
 * Returns how many existed. */
int omni_index_remove(omni_index_t *idx, uint32_t inst,
    const uint64_t *hashes, size_t n);

/*
 * Drop instance inst's *approximate* entries for these blocks: the engine
 * did not take a prompt we marked as sent there (an error answer).  Precise
 * entries (the engine's own events) stay.  Without this, the marks of a
 * rejected prompt sit in the instance's capacity, which with KV events is
 * the engine's own, and push out blocks the engine still holds.  Returns how
 * many were dropped (counted in stats.removed).
 */
int omni_index_withdraw(omni_index_t *idx, uint32_t inst,
    const uint64_t *hashes, size_t n);

/* ---- precise: KV events -------------------------------------------------- */

/*
 * BlockStored: instance inst cached blocks with engine hashes
 * engine_hashes[0, n_blocks) holding tokens[0, n_tokens), n_tokens ==
 * n_blocks * block_size.  With has_parent, block 0's parent is the block the
 * instance stored under engine hash `parent`; without, block 0 starts a
 * prompt.  Returns the number of blocks stored, OMNI_ENOTFOUND when the
 * parent is unknown for this instance (nothing stored: its chain cannot be
 * known; the events consumer should replay or resynchronise), OMNI_EINVAL.
 */
int omni_index_store(omni_index_t *idx, uint32_t inst,
    const uint64_t *engine_hashes, size_t n_blocks, int has_parent,
    uint64_t parent, const uint32_t *tokens, size_t n_tokens,
    uint64_t now_us);

/* The same, and chains[k] (when not NULL) is the index's own hash of each
 * block k stored: the one omni_hash_blocks() gives the same prompt with
 * the index's seed. */
int omni_index_store_chains(omni_index_t *idx, uint32_t inst,
    const uint64_t *engine_hashes, size_t n_blocks, int has_parent,
    uint64_t parent, const uint32_t *tokens, size_t n_tokens,
    uint64_t now_us, uint64_t *chains);

/* BlockRemoved: returns how many of the engine hashes were known. */
int omni_index_store_removed(omni_index_t *idx, uint32_t inst,
    const uint64_t *engine_hashes, size_t n);

/* AllBlocksCleared (or the instance went away): drop every entry of inst,
 * precise and approximate.  Returns how many. */
int omni_index_clear(omni_index_t *idx, uint32_t inst);

/* ---- capacity ------------------------------------------------------------ */

/* Set instance inst's capacity; evicts down to it at once.  Returns the
 * number evicted. */
int omni_index_set_capacity(omni_index_t *idx, uint32_t inst,
    uint32_t capacity);

/*
 * Evict up to n least recently used entries of instance inst (both lists, the
 * older tail first; approximate on a tie), or with inst == OMNI_INDEX_ALL the
 * globally oldest ones (ties: lowest instance, approximate first).
 * Returns the number evicted.
 */
int omni_index_evict(omni_index_t *idx, uint32_t inst, size_t n);

/* Drop approximate entries past their TTL now.  Returns how many. */
int omni_index_expire(omni_index_t *idx, uint64_t now_us);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_INDEX_H */
