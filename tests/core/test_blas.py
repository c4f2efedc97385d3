"""facepq_core.blas: a serving process runs BLAS on one thread and then takes it for single queries.

The limit is process-wide, so each case runs in its own Python process (the test worker's BLAS is
left as it is).
"""
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from facepq_core import blas
from facepq_core.codecs.base import takes_blas
from facepq_core.codecs.opqn import OPQNCodec

rng = np.random.default_rng(3)
M, d, K, E = 4, 8, 16, 24
codec = OPQNCodec(rng.normal(size=(M * d, E)), rng.normal(size=M * d) * 0.1, rng.normal(size=(M, d, K)) * 3, M, K, d)
x = rng.normal(size=(5, E)).astype(np.float32)
out = {"before": [takes_blas(1), takes_blas(64)], "einsum": codec.query_tables(x).tolist(),
       "codes_einsum": codec.encode(x).tolist()}
out["limited"] = blas.use_one_thread()
out["after"] = [takes_blas(1), takes_blas(64)]
out["threads"] = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
out["blas"] = codec.query_tables(x).tolist()
out["codes_blas"] = codec.encode(x).tolist()
out["batch"] = codec.query_tables(np.repeat(x, 20, axis=0))[::20].tolist()  # 100 rows: BLAS's matrix product
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_thread_makes_small_products_take_blas(run):
    assert run["before"] == [False, True]      # a process that never asked keeps einsum loops for a few rows
    assert run["limited"] is True and run["threads"] and set(run["threads"]) == {1}
    assert run["after"] == [True, True]


def test_single_query_tables_agree_across_the_two_products(run):
    import numpy as np

    # the same tables and codes up to rounding: BLAS and einsum sum in another order
    np.testing.assert_allclose(run["blas"], run["einsum"], rtol=1e-5, atol=1e-5)
    assert run["codes_blas"] == run["codes_einsum"]
    np.testing.assert_allclose(run["blas"], run["batch"], rtol=1e-5, atol=1e-5)
