"""Builds the native scan kernels into the extension module query_node._fastscan.

Everything else about the package is in pyproject.toml. The extension is optional: where
it cannot be built (no C compiler, no Python headers) `pip install` still succeeds and
facepq scans with its numba kernels (`query_node.fastscan.status()` says why).
"""
import sys

from setuptools import Extension, setup

# Never -ffast-math, and no FMA contraction, so float sums round exactly like the numba
# kernels; no -mavx2: the AVX2 functions carry target attributes and are picked at import.
# -fno-wrapv undoes the -fwrapv of Python's own CFLAGS (which CPython's code relies on; this
# code does not): with it the 4-bit kernel measured ~5% slower.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-wrapv"]

setup(
    ext_modules=[
        Extension(
            "query_node._fastscan",
            sources=["query_node/_fastscan.c", "query_node/fastscan_kernels.c"],
            depends=["query_node/fastscan_kernels.h"],
            extra_compile_args=FLAGS,
            optional=True,
        )
    ]
)
