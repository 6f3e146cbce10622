/*
 * Omni Proxy scoring library: error strings and version.
 */

#include <stdlib.h>

#include "omni_common.h"


static void *
omni_malloc_alloc(void *ctx, size_t size)
{
    (void) ctx;
    return malloc(size);
}


static void
omni_malloc_free(void *ctx, void *p)
{
    (void) ctx;
    free(p);
}


static const omni_allocator_t  omni_malloc = {
    omni_malloc_alloc, omni_malloc_free, NULL
};


const omni_allocator_t *
omni_malloc_allocator(void)
{
    return &omni_malloc;
}


const char *
omni_strerror(int rc)
{
    switch (rc) {
    case OMNI_OK:         return "success";
    case OMNI_ENOMEM:     return "out of memory";
    case OMNI_EINVAL:     return "invalid argument";
    case OMNI_ERANGE:     return "buffer too small";
    case OMNI_EJSON:      return "invalid JSON";
    case OMNI_ETYPE:      return "unexpected JSON type";
    case OMNI_ENOTFOUND:  return "not found";
    case OMNI_EFULL:      return "capacity exhausted";
    case OMNI_EINTEGRITY: return "integrity check failed";
    case OMNI_EDEPTH:     return "nesting too deep";
    case OMNI_EHOLD:      return "hold: no instance can take the request now";
    }

    return "unknown error";
}


const char *
omni_version(void)
{
    return OMNI_VERSION_STRING;
}
