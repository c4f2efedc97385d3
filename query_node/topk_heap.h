/*
 * The top-k min-heap every scan kernel keeps per query (fastscan_kernels.c, popcount_kernels.c): the root is
 * the k-th best hit; a hit is worse than another when its score is lower, or equal with a higher row (rows in
 * scan order break ties, as query_node.scan's numba kernels do).
 */
#ifndef TOPK_HEAP_H
#define TOPK_HEAP_H

#include <stdint.h>

static inline int worse(float sa, int64_t ra, float sb, int64_t rb) {
    return sa < sb || (sa == sb && ra > rb);
}

/* Put (s, r) at the root of the min-heap (hs, hr) of size k and sift it down. */
static inline void replace_root(float *hs, int64_t *hr, int k, float s, int64_t r) {
    int pos = 0;
    for (;;) {
        int child = 2 * pos + 1;
        if (child >= k) break;
        int right = child + 1;
        if (right < k && worse(hs[right], hr[right], hs[child], hr[child])) child = right;
        if (!worse(hs[child], hr[child], s, r)) break;
        hs[pos] = hs[child];
        hr[pos] = hr[child];
        pos = child;
    }
    hs[pos] = s;
    hr[pos] = r;
}

#endif
