"""`facepq bench scan` and `facepq bench popcount` run end to end on a small size and check their answers.

The ratios they print are measurements (never asserted: a busy machine moves them); what is asserted is
that each configuration ran, named the kernel and code layout it used, and matched the exact reference.
"""
import pytest

from bench.scan_bench import QUICK_TRAIN_ITERATIONS
from tests.support.processes import run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("simd", [None, "avx2"])
def test_bench_scan_runs_every_configuration_and_checks_it_against_the_reference(simd):
    pytest.importorskip("faiss", reason="the scan benchmark compares with FAISS (faiss-cpu, a dependency)")
    args = ["bench", "scan", "--sizes", "20000", "--queries", "2", "--repeats", "2", "--batch", "4",
            "--train-iterations", str(QUICK_TRAIN_ITERATIONS)]
    done = run_cli(*args, *(["--simd", simd] if simd else []))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "4-bit kernel:" in out and "FAISS:" in out
    assert out.count("matches reference: True") == 3, out
    assert out.count("batched answers equal single answers: True") == 3, out
    assert "matches reference: False" not in out
    if simd == "avx2" and "4-bit kernel: avx2" in out:   # where the native kernels run: the node's layout
        assert "on 32-row blocks" in out


def test_bench_scan_refuses_a_training_of_no_iterations_in_one_line():
    done = run_cli("bench", "scan", "--sizes", "20000", "--train-iterations", "0")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip().splitlines() == ["facepq bench: error: --train-iterations must be >= 1, got 0"], \
        done.stderr


def test_bench_popcount_runs_every_variant_against_faiss():
    pytest.importorskip("faiss", reason="the popcount benchmark compares with FAISS (faiss-cpu, a dependency)")
    done = run_cli("bench", "popcount", "--sizes", "20000", "--queries", "2", "--repeats", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "distances equal FAISS's: True" in done.stdout and "False" not in done.stdout, done.stdout
