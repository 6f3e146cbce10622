/*
 * Omni Proxy scoring library: chained block hashes (see omni_hash.h).
 */

#include <string.h>
#include <xxhash.h>

/*
 * libxxhash built with its x86 dispatcher (Debian's is) exports variants
 * that pick SSE2, AVX2 or AVX-512 by the CPU at run time; the plain entry
 * points are compiled for SSE2 only.  The results are the same bits (XXH3
 * is defined independently of the vector width), and a 1 KB text block
 * (256 pseudo tokens) costs 2.5 times fewer instructions with AVX2.  The
 * build defines OMNI_HASH_DISPATCH only when it found those symbols;
 * including the header makes every XXH3_64bits* call below the dispatching
 * one.
 */
#ifdef OMNI_HASH_DISPATCH
#include <xxh_x86dispatch.h>
#endif

#include "omni_hash.h"


/* Domain tag for the root: keeps seed 0's root away from XXH3(empty, 0). */
static const char  omni_hash_root_tag[] = "omni-proxy/block-chain/v1";


static inline uint64_t
omni_hash_nonzero(uint64_t h)
{
    return h ? h : 1;
}


uint64_t
omni_hash_root(uint64_t seed)
{
    return omni_hash_nonzero(
        XXH3_64bits_withSeed(omni_hash_root_tag,
                             sizeof(omni_hash_root_tag) - 1, seed));
}


/*
 * Hash `len` bytes that are the little-endian encoding of the block's tokens.
 * The parent hash is the XXH3 seed: XXH3 mixes the seed into every lane, so
 * this chains without copying the block next to the parent.
 */
static inline uint64_t
omni_hash_bytes(uint64_t parent, const void *bytes, size_t len)
{
    return omni_hash_nonzero(XXH3_64bits_withSeed(bytes, len, parent));
}


uint64_t
omni_hash_block(uint64_t parent, const uint32_t *tokens, size_t n)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    /* Hash the little-endian encoding so hashes agree across hosts. */
    XXH3_state_t  st;
    uint32_t      le[64];
    size_t        i, k;

    XXH3_64bits_reset_withSeed(&st, parent);
    for (i = 0; i < n; i += k) {
        k = n - i < 64 ? n - i : 64;
        for (size_t j = 0; j < k; j++) {
            le[j] = __builtin_bswap32(tokens[i + j]);
        }
        XXH3_64bits_update(&st, le, k * sizeof(uint32_t));
    }
    return omni_hash_nonzero(XXH3_64bits_digest(&st));
#else
    return omni_hash_bytes(parent, tokens, n * sizeof(uint32_t));
#endif
}


int
omni_hash_blocks_from(uint64_t parent, const uint32_t *tokens,
    size_t n_tokens, uint32_t block_size, uint64_t *out, size_t cap)
{
    size_t  n, k;

    if (block_size == 0 || block_size > OMNI_HASH_MAX_BLOCK_SIZE) {
        return OMNI_EINVAL;
    }

    n = n_tokens / block_size;
    if (n > cap) {
        n = cap;
    }
    if (n > (size_t) INT32_MAX) {
        n = INT32_MAX;
    }
    if (n > 0 && (tokens == NULL || out == NULL)) {
        return OMNI_EINVAL;
    }

    for (k = 0; k < n; k++) {
        parent = omni_hash_block(parent, tokens + k * block_size, block_size);
        out[k] = parent;
    }

    return (int) n;
}


int
omni_hash_blocks(const uint32_t *tokens, size_t n_tokens,
    uint32_t block_size, uint64_t seed, uint64_t *out, size_t cap)
{
    return omni_hash_blocks_from(omni_hash_root(seed), tokens, n_tokens,
                                 block_size, out, cap);
}


int
omni_hash_text_blocks(const uint8_t *text, size_t len,
    uint32_t block_size, uint64_t seed, uint64_t *out, size_t cap)
{
    uint64_t  parent;
    size_t    n, k, bytes;

    if (block_size == 0 || block_size > OMNI_HASH_MAX_BLOCK_SIZE) {
        return OMNI_EINVAL;
    }

    bytes = (size_t) block_size * sizeof(uint32_t);
    n = len / bytes;
    if (n > cap) {
        n = cap;
    }
    if (n > (size_t) INT32_MAX) {
        n = INT32_MAX;
    }
    if (n > 0 && (text == NULL || out == NULL)) {
        return OMNI_EINVAL;
    }

    /* The bytes already are the little-endian pseudo tokens. */
    parent = omni_hash_root(seed);
    for (k = 0; k < n; k++) {
        parent = omni_hash_bytes(parent, text + k * bytes, bytes);
        out[k] = parent;
    }

    return (int) n;
}


uint64_t
omni_hash_engine_key(const uint8_t *bytes, size_t len)
{
    return XXH3_64bits(bytes, len);
}
