/*
 * Omni Proxy scoring library: ingestion of the KV-event agent's batches.
 *
 * `omni-ctl agent` listens to the engines (KV events, /metrics, /health) and
 * sends what it heard as batches in the binary format below.  Whoever holds
 * the prefix index (nginx, under its zone lock; Python in tests) hands each
 * batch to omni_ingest_apply(), which checks the whole batch first and only
 * then applies it: a bad batch changes nothing and is counted.
 *
 * Format, version 1, every integer little-endian, no alignment or padding:
 *
 *   header (24 bytes)
 *     u32 magic        OMNI_INGEST_MAGIC ("OMNB")
 *     u16 version      1
 *     u16 header_len   24 (bytes from the start of the batch to the names)
 *     u32 total_len    the whole batch, header included
 *     u32 block_size   index block size the stores' leads were cut for
 *                      (must equal the index's; 0: no store has a lead)
 *     u16 n_names      instance names that follow
 *     u16 flags        0
 *     u32 n_records
 *   names: n_names x { u16 len (1..255), len bytes "host:port" }
 *   records: n_records x { u8 kind, u8 flags, u16 name, u32 body_len, body }
 *
 *   kind 1 STORE    flags bit 0: has_anchor
 *                   u32 engine_block_size E, u32 n_blocks n, u32 lead L,
 *                   u32 0, u64 anchor, u64 hashes[n], u32 lead_tokens[L],
 *                   u32 tokens[n * E]
 *   kind 2 REMOVE   u32 engine_block_size E, u32 n, u64 hashes[n]
 *   kind 3 CLEAR    (empty)
 *   kind 4 STATE    u32 mode (OMNI_INGEST_PRECISE/_APPROX),
 *                   u32 health (OMNI_INGEST_HEALTH_*)
 *   kind 5 METRICS  u32 running, u32 waiting, u32 kv_usage_ppm (0..1e6),
 *                   u32 valid (OMNI_INGEST_M_* bits), u64 capacity_tokens
 *
 * Engine block sizes.  The index is keyed on token ids cut in its own block
 * size B; engines use theirs (E, usually 16).  E and B must divide one
 * another.  Every index block is named, for removals, after the engine
 * block holding its last token: the engine's own hash when the two end
 * together, else a key derived from that hash and the offset.  When B > E an
 * engine store may start inside an index block: its record then carries the
 * L = (tokens before it) mod B tokens of its ancestors since the last index
 * boundary ("lead") and, as anchor, the engine hash of the block ending at
 * that boundary (no anchor: the prompt's start).  The agent knows the chain;
 * the index only ever sees whole blocks.  Removing an engine block that ends
 * no index block removes nothing (a known imprecision when B > E: engines
 * evict a prompt's last blocks first, which do end index blocks).
 *
 * Instances are named in the batch ("host:port", as in the upstream's
 * server lines); the caller maps names to index instances with a table.
 * Records of unknown names are skipped and counted, not errors.
 */

#ifndef OMNI_INGEST_H
#define OMNI_INGEST_H

#include "omni_common.h"
#include "omni_index.h"
#include "omni_predict.h"

#ifdef __cplusplus
extern "C" {
#endif

#define OMNI_INGEST_MAGIC        0x424e4d4fu     /* "OMNB" little-endian */
#define OMNI_INGEST_VERSION      1
#define OMNI_INGEST_HEADER_LEN   24
#define OMNI_INGEST_MAX_NAMES    1024
#define OMNI_INGEST_MAX_NAME     255
/* Largest block size (index or engine) a batch may use, in tokens. */
#define OMNI_INGEST_MAX_BLOCK    4096

/* Record kinds. */
#define OMNI_INGEST_STORE        1
#define OMNI_INGEST_REMOVE       2
#define OMNI_INGEST_CLEAR        3
#define OMNI_INGEST_STATE        4
#define OMNI_INGEST_METRICS      5

#define OMNI_INGEST_HAS_ANCHOR   1

/* Instance modes: where its index entries come from. */
#define OMNI_INGEST_UNKNOWN      0     /* never heard of (initial state) */
#define OMNI_INGEST_PRECISE      1     /* the engine's events, consistent */
#define OMNI_INGEST_APPROX       2     /* events lost or silent agent: the
                                          proxy's own dispatches */

#define OMNI_INGEST_HEALTH_UNKNOWN  0
#define OMNI_INGEST_HEALTH_UP       1
#define OMNI_INGEST_HEALTH_DOWN     2

/* METRICS `valid` bits. */
#define OMNI_INGEST_M_LOAD       1     /* running, waiting */
#define OMNI_INGEST_M_USAGE      2     /* kv_usage_ppm */
#define OMNI_INGEST_M_CAPACITY   4     /* capacity_tokens */

/* Why a batch was rejected (omni_ingest_stats_t.last_reason). */
typedef enum {
    OMNI_INGEST_R_OK = 0,
    OMNI_INGEST_R_SHORT,         /* shorter than its header or total_len */
    OMNI_INGEST_R_MAGIC,
    OMNI_INGEST_R_VERSION,
    OMNI_INGEST_R_LENGTH,        /* total_len or header_len wrong */
    OMNI_INGEST_R_NAME,          /* a name is empty, too long or cut */
    OMNI_INGEST_R_RECORD,        /* a record header or body is cut */
    OMNI_INGEST_R_KIND,          /* unknown record kind */
    OMNI_INGEST_R_BODY,          /* body length does not match its counts */
    OMNI_INGEST_R_NAME_INDEX,    /* a record names no name of the table */
    OMNI_INGEST_R_BLOCK_SIZE,    /* E and B do not divide one another, or
                                    the batch was cut for another B */
    OMNI_INGEST_R_LEAD,          /* lead not a multiple of E below B */
    OMNI_INGEST_R_VALUE,         /* a field out of its range */
    OMNI_INGEST_R_TRAILING,      /* bytes after the last record */
    OMNI_INGEST_R_MAX
} omni_ingest_reason_t;

/* Caller's name table: batch name -> index instance. */
typedef struct {
    const char  *name;
    size_t       len;
    uint32_t     inst;
} omni_ingest_name_t;

/*
 * Per index instance, kept by the caller (in shared memory for nginx):
 * plain data, no pointers.  Zero it once; omni_ingest_apply() updates it.
 */
typedef struct {
    uint64_t  last_update_us;   /* any record for it */
    uint64_t  capacity_tokens;  /* engine's KV capacity; 0 unknown */
    uint32_t  mode;             /* OMNI_INGEST_UNKNOWN/_PRECISE/_APPROX */
    uint32_t  health;           /* OMNI_INGEST_HEALTH_* */
    uint32_t  running;
    uint32_t  waiting;
    uint32_t  kv_usage_ppm;
    uint32_t  ours;             /* the caller's own work on it when the
                                 * last load report came (OMNI_INGEST_OURS_*) */
    uint32_t  beyond;           /* what that report counted beyond ours */
    uint32_t  beyond_prev;      /* the same of the report before it */
    uint64_t  stores;           /* STORE records applied */
    uint64_t  blocks_stored;    /* index blocks */
    uint64_t  removals;         /* REMOVE records applied */
    uint64_t  blocks_removed;   /* index blocks */
    uint64_t  clears;
    uint64_t  orphans;          /* stores whose anchor the index lacks */
    uint64_t  resyncs;          /* PRECISE -> APPROX transitions */
} omni_ingest_inst_t;

/* Whole-ingestion counters, cumulative (the caller keeps one). */
typedef struct {
    uint64_t  batches;           /* applied */
    uint64_t  rejected;          /* refused as malformed */
    uint64_t  records;           /* records of applied batches */
    uint64_t  unknown_names;     /* records skipped: name not in the table */
    uint64_t  bytes;             /* of applied batches */
    uint32_t  last_reason;       /* omni_ingest_reason_t of the last reject */
    uint32_t  pad;
    uint64_t  last_offset;       /* where in that batch */
    uint64_t  engine_ends;       /* stores that told a prefill's end,
                                    earlier than predicted
                                    (omni_ingest_apply_to) */
} omni_ingest_stats_t;

/*
 * Check the batch buf[0, len) and, if it is well formed, apply it to idx:
 * stores, removals and clears to the index, states and metrics to insts
 * (n_insts of them, indexed by index instance; a METRICS capacity or a
 * change of mode also sets the index capacity of the instance: capacity_tokens
 * / B blocks, times OMNI_INGEST_PRECISE_ROOM while it is PRECISE).  names
 * (n_names) maps the batch's instance names; entries with inst >= n_insts
 * or >= the index's instances are ignored.  now_us: caller's clock.
 *
 * Returns the number of records applied (>= 0), or OMNI_EINVAL with
 * nothing changed but stats->rejected, last_reason and last_offset when the
 * batch is malformed (or an argument is NULL).  Never reads outside buf.
 * The caller holds the index's lock for the whole call.
 */
int omni_ingest_apply(omni_index_t *idx, omni_ingest_inst_t *insts,
    size_t n_insts, const omni_ingest_name_t *names, size_t n_names,
    const uint8_t *buf, size_t len, uint64_t now_us,
    omni_ingest_stats_t *stats);

/*
 * The same, and every block stored is handed to the predictor (when not
 * NULL; its instances are the index's): the last block of a prefill in
 * flight tells its end (omni_predict_prefill_stored), counted in
 * stats->engine_ends.
 */
int omni_ingest_apply_to(omni_index_t *idx, omni_predict_t *predict,
    omni_ingest_inst_t *insts, size_t n_insts,
    const omni_ingest_name_t *names, size_t n_names, const uint8_t *buf,
    size_t len, uint64_t now_us, omni_ingest_stats_t *stats);

/*
 * A silent agent: every PRECISE instance whose last update is older than
 * ttl_us turns APPROX (its index entries stay; new dispatches keep adding
 * approximate ones) and, with idx, gets the approximate index capacity
 * below.  Returns how many changed.  The caller holds the index's lock.
 */
int omni_ingest_expire(omni_index_t *idx, omni_ingest_inst_t *insts,
    size_t n_insts, uint64_t now_us, uint64_t ttl_us);

/*
 * Scheduling with what the agent said.  An instance whose state is
 * approximate (events lost, a silent agent) has its matched prefix
 * (matched[i], blocks, per index instance i < n) divided by
 * OMNI_INGEST_APPROX_DIV: the index only guesses what it holds.  Precise
 * and unknown (no agent) instances keep theirs.  Returns how many changed.
 */
#define OMNI_INGEST_APPROX_DIV   2

/*
 * The index capacity of a PRECISE instance, in multiples of the engine's:
 * the engine's removals keep what it stored within its capacity, and the
 * rest is room for the proxy's marks of prompts sent and not yet stored,
 * so that marking one never evicts a block the engine still holds.
 */
#define OMNI_INGEST_PRECISE_ROOM 2

int omni_ingest_discount(const omni_ingest_inst_t *insts, size_t n_insts,
    uint32_t *matched, size_t n);

/*
 * The running figure of an instance, from a report younger than ttl_us.
 * The engine's running + waiting counts the caller's own work too, as it
 * was at the scrape: a report applied sets `ours` to OMNI_INGEST_OURS_UNSET
 * and the caller then notes its own figure of that moment with
 * omni_ingest_note_ours().  With it noted, the figure is the caller's work
 * now plus what the engine reported beyond the caller's (work other proxies
 * or clients sent), so a report a scrape late adds no phantom load for work
 * that has since finished.  Not noted: the larger of the two.
 *
 * "Beyond" is the least of the last two reports': a leg of ours that ends
 * between the engine's scrape and the report's arrival is counted by the
 * engine but no more by us, and would stand as phantom load for a whole
 * scrape interval; work others sent stays across scrapes and is counted
 * from its second report on.
 */
#define OMNI_INGEST_OURS_UNSET   0xffffffffu

uint32_t omni_ingest_blend_running(const omni_ingest_inst_t *inst,
    uint32_t proxy_running, uint64_t now_us, uint64_t ttl_us);

/* After omni_ingest_apply(): note `ours` on every instance whose load report
 * it just applied (ours == OMNI_INGEST_OURS_UNSET); returns how many. */
int omni_ingest_note_ours(omni_ingest_inst_t *insts, size_t n_insts,
    const uint32_t *ours);

/* The key an index block gets when it ends `offset` tokens into the engine
 * block `engine_hash` (offset < the engine's block size). */
uint64_t omni_ingest_inner_key(uint64_t engine_hash, uint32_t offset);

/* A static string naming an omni_ingest_reason_t; never NULL. */
const char *omni_ingest_strreason(uint32_t reason);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_INGEST_H */
