/* Loaded with LD_PRELOAD by tests/integration/test_lanememory.py: every
 * malloc the native lane's extension makes fails, but its first (the
 * scratch buffer of the one Lane the test makes).  CPython's own
 * allocations are not touched, which _testcapi.set_nomemory cannot say. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

extern void *__libc_malloc(size_t);
static int lane_calls;

void *
malloc(size_t n)
{
    Dl_info info;
    if (dladdr(__builtin_return_address(0), &info) && info.dli_fname &&
        strstr(info.dli_fname, "/_lane.") && lane_calls++ > 0)
        return NULL;
    return __libc_malloc(n);
}
