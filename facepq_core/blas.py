"""BLAS in this process: how many threads it may use, and so whether a small product may take it.

numpy's OpenBLAS splits a matrix product over every core and then keeps its threads spinning
for a while. For one query's product (the coordinator's [1, E] x [E, M*d] projection) that spin
burned ~25 ms of a core per query, taken from the query nodes on a shared machine, so products
of a few rows run in numpy's own einsum loops instead (`small_products_use_blas` is False). Those
loops are slow: the demo model's query table cost 0.40 ms of CPU in them, 0.21 ms in BLAS on one thread.
A serving process parallelises over requests, not inside one, so it calls `use_one_thread()` at
start: BLAS then runs on the calling thread, with no spin, and takes every product, small or not.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_one_thread = False


def use_one_thread() -> bool:
    """Limit this process's BLAS libraries to one thread each; from then on small products use BLAS.

    Returns False (and leaves things as they are: small products keep the einsum loops) when
    threadpoolctl cannot set the limit, e.g. a BLAS it does not know.
    """
    global _one_thread
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(1, user_api="blas")
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    _one_thread = bool(blas) and all(lib.get("num_threads") == 1 for lib in blas)
    if not _one_thread:
        log.info("BLAS could not be limited to one thread (%s); single queries keep numpy's own loops",
                 [lib.get("internal_api") for lib in blas] or "no BLAS found")
    return _one_thread


def small_products_use_blas() -> bool:
    """True once `use_one_thread()` has limited BLAS to one thread in this process."""
    return _one_thread
