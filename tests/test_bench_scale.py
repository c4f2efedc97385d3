"""`facepq bench scale --small` as a real subprocess, at an even smaller size: report structure and exactness."""
import json
import math

import pytest

from tests.support.processes import run_cli


@pytest.mark.slow
@pytest.mark.timeout(1400)  # a guard against a hang, not a performance bound
def test_small_scale_report(tmp_path):
    out = tmp_path / "scale"
    proc = run_cli("bench", "scale", "--small", "--sizes", "20000", "--queries", "16", "--batch", "8", "--nprobe", "1,4",
                   "--cells", "16", "--segment-rows", "5000", "--out", out, "--work", tmp_path / "new" / "work",
                   "--device-scan", "cpu", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "new" / "work").is_dir() and not any((tmp_path / "new" / "work").iterdir())  # made, emptied
    report = json.loads((out / "scale.json").read_text())
    assert report["header"]["sizes"] == [20000] and report["header"]["threads"] == [1, 2]
    assert report["header"]["segment rows"] == 5000  # 4 segments: cells are ranges in each, gathered
    assert report["header"]["device scan"] == "cpu"  # the CUDA path's code, run on the CPU device
    rows = report["rows"]
    methods = {(r["layout"].split()[0], r["method"], str(r["nprobe"])) for r in rows}
    for layout, flat, ivf in (("8bit", "FAISS IndexPQ", "FAISS IndexIVFPQ"),
                              ("4bit", "FAISS IndexPQFastScan", "FAISS IndexIVFPQFastScan")):
        assert {(layout, "ours exhaustive", "all"), (layout, "ours cells", "1"), (layout, "ours cells", "4"),
                (layout, flat, "all"), (layout, ivf, "1"), (layout, ivf, "4"),
                (layout, "ours exhaustive, one query on 2 threads", "all"), (layout, "ours cpu batched scan", "all")} \
            <= methods
    for r in rows:
        assert r["n"] == 20000 and r["data"] == "synthetic"
        for key in ("p50_ms", "p99_ms", "recall10", "recall100", "build_s"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        split = r["method"] == "ours exhaustive, one query on 2 threads"  # a single-query latency row only
        device = r["method"] == "ours cpu batched scan"  # batches from one host thread
        assert r["p99_ms"] >= r["p50_ms"] > 0
        assert r["qps"] == {} if split else set(r["qps"]) == ({"1"} if device else {"1", "2"}) \
            and min(r["qps"].values()) > 0
        assert 0 <= r["recall10"] <= 1 and r["memory_bytes"] > 0
        if r["nprobe"] == "all":  # the exhaustive answer against itself (nprobe = all cells)
            assert r["recall10"] == 1.0 and r["recall100"] == 1.0
        if r["method"] == "ours cells":
            assert r["cells"] == 16 and r["scan_p50_ms"] <= r["p50_ms"]
    text = (out / "scale.md").read_text()
    assert "| synthetic | 8bit M=8 K=256 | 20,000 | ours cells | 16 | 1 |" in text
    assert "![single-query p50 latency against N](latency_vs_n.png)" in text
    assert (out / "latency_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("device,says", [("cuda", "torch sees no CUDA device"), ("nonsense", "not a torch device")])
def test_a_device_scan_this_machine_cannot_run_is_an_error_not_a_traceback(tmp_path, device, says):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: --device-scan cuda is valid here")
    proc = run_cli("bench", "scale", "--small", "--device-scan", device, "--out", tmp_path / "out", timeout=120)
    assert proc.returncode != 0
    assert f"--device-scan {device}" in proc.stderr and says in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_work_folder_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    proc = run_cli("bench", "scale", "--small", "--work", tmp_path / "a-file" / "work", "--out", tmp_path / "out",
                   timeout=120)
    assert proc.returncode != 0
    assert "--work" in proc.stderr and "cannot make the folder" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
