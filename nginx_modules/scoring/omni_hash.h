/*
 * Omni Proxy scoring library: chained block hashes.
 *
 * A prompt of token ids is cut into blocks of `block_size` tokens; only full
 * blocks count.  Block k's hash covers block k's tokens and block k-1's hash
 * (the root value for k == 0), so equal hashes mean equal prefixes, and the
 * prefix index can match a prompt block by block without a tree.
 *
 *   root      = XXH3_64(ROOT_TAG, seed)
 *   hash[k]   = XXH3_64(tokens of block k as little-endian uint32, hash[k-1])
 *
 * The seed is a namespace (model, LoRA, salt): different seeds give unrelated
 * chains.  A hash is never 0 (0 is mapped to 1), so callers may use 0 as
 * "none".  Token ids are opaque uint32 values; nothing assumes a vocabulary,
 * so a text prompt can be hashed as "pseudo tokens" (each 4 bytes of text one
 * little-endian uint32) with omni_hash_text_blocks().
 *
 * xxHash is fast and well distributed but not keyed against an adversary who
 * knows the seed: a crafted collision can only mislead scheduling (a cache hit
 * reported where there is none), never corrupt a request.
 *
 * All functions are pure; nothing allocates.
 */

#ifndef OMNI_HASH_H
#define OMNI_HASH_H

#include "omni_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest block size accepted (tokens). */
#define OMNI_HASH_MAX_BLOCK_SIZE  65536

/* The parent hash of a prompt's first block in namespace `seed`. */
uint64_t omni_hash_root(uint64_t seed);

/* The hash of one block of n tokens whose parent block hashed to `parent`. */
uint64_t omni_hash_block(uint64_t parent, const uint32_t *tokens, size_t n);

/*
 * Hashes of the full blocks of tokens[0, n_tokens), chained from the root of
 * namespace `seed`.  Writes min(n_tokens / block_size, cap) hashes to out and
 * returns that count, or OMNI_EINVAL (block_size 0 or too large, NULL pointers
 * with non-zero sizes).  A short `cap` is not an error: callers that only look
 * at a prompt's first blocks size `out` for those.
 */
int omni_hash_blocks(const uint32_t *tokens, size_t n_tokens,
    uint32_t block_size, uint64_t seed, uint64_t *out, size_t cap);

/* The same, chained from an explicit parent hash (used for KV events whose
 * parent block is already known). */
int omni_hash_blocks_from(uint64_t parent, const uint32_t *tokens,
    size_t n_tokens, uint32_t block_size, uint64_t *out, size_t cap);

/*
 * Hashes of a text prompt as pseudo tokens: each 4 bytes of text[0, len) is
 * one token (little-endian), so a block is 4 * block_size bytes.  Equal to
 * omni_hash_blocks() over those pseudo tokens.  Trailing bytes that do not
 * fill a block are ignored.
 */
int omni_hash_text_blocks(const uint8_t *text, size_t len,
    uint32_t block_size, uint64_t seed, uint64_t *out, size_t cap);

/*
 * A 64-bit key for an engine's block hash that arrives as raw bytes (KV
 * events may carry bytes instead of integers).  Integers are used as they are.
 */
uint64_t omni_hash_engine_key(const uint8_t *bytes, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_HASH_H */
