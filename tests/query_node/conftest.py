"""Fixtures of the query node's tests."""
import pytest

from query_node import fastscan


@pytest.fixture
def avx2():
    """The AVX2 kernels, as on a CPU without AVX-512 (the test runs them on AVX-512 CPUs too)."""
    fastscan.use_simd("avx2")
    yield
    fastscan.use_simd(None)
