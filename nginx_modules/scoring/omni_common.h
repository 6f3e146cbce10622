/*
 * Omni Proxy scoring library: conventions shared by every component.
 *
 * - No global mutable state, no threads, no blocking calls, no clock reads:
 *   time is always an argument (microseconds, caller's monotonic clock).
 * - Memory comes from a caller-supplied allocator.  nginx passes functions
 *   that allocate from its shared-memory slab pool (under the zone lock);
 *   Python passes malloc/free.  Objects that may live in shared memory never
 *   store function pointers or pointers to process-local memory.
 * - Locking is the caller's job.
 * - Errors are negative OMNI_E* codes; omni_strerror() names them.
 */

#ifndef OMNI_COMMON_H
#define OMNI_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define OMNI_VERSION_STRING  "0.1.0"

typedef enum {
    OMNI_OK          =  0,
    OMNI_ENOMEM      = -1,   /* the allocator returned NULL */
    OMNI_EINVAL      = -2,   /* bad argument (NULL, out of range, ...) */
    OMNI_ERANGE      = -3,   /* caller's buffer too small; size reported */
    OMNI_EJSON       = -4,   /* input is not valid JSON (RFC 8259) */
    OMNI_ETYPE       = -5,   /* valid JSON, but not the expected type */
    OMNI_ENOTFOUND   = -6,   /* key, index or instance not present */
    OMNI_EFULL       = -7,   /* a fixed capacity is exhausted */
    OMNI_EINTEGRITY  = -8,   /* check_integrity() found a broken invariant */
    OMNI_EDEPTH      = -9,   /* nesting deeper than the configured limit */
    OMNI_EHOLD       = -10,  /* policy answer: nobody can take it now, hold */
} omni_rc_t;

/*
 * Caller-supplied allocator.  `ctx` is passed back unchanged.  alloc() must
 * return memory aligned for any type, or NULL.  free(ctx, NULL) is a no-op.
 */
typedef struct {
    void  *(*alloc)(void *ctx, size_t size);
    void   (*free)(void *ctx, void *p);
    void   *ctx;
} omni_allocator_t;

/*
 * An allocator over malloc()/free() (ctx unused), for Python and tests.
 * A pointer to constant static data: not mutable state.
 */
const omni_allocator_t *omni_malloc_allocator(void);

/* A static string naming `rc`; never NULL. */
const char *omni_strerror(int rc);

/* The library version, OMNI_VERSION_STRING. */
const char *omni_version(void);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_COMMON_H */
