"""`facepq bench report --small` as a real subprocess: the report has its sections, numeric ratios, valid PNGs."""
import math
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# The synthetic-faces quality section is left out here: on this machine its resnet20+FAISS OPQ run is
# too slow/unstable for CI (see bench/report.py); scan, latency and ingest run for real.
SECTIONS = {"## 1. Scan throughput": 6, "## 3. End-to-end gRPC latency": 2, "## 4. Ingest throughput": 1}


# A guard against a hang, not a performance bound: the run takes about a minute on the 2-core machine at
# load average ~5 and took more than 5 minutes inside a whole-suite run at load 10+. Nothing here may
# depend on how much work fits in a time window.
REPORT_TIMEOUT_S = 1500


@pytest.mark.slow
@pytest.mark.timeout(REPORT_TIMEOUT_S + 120)
def test_small_report(tmp_path):
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, "-m", "facepq.cli", "bench", "report", "--small", "--skip", "quality",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=REPORT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "report.md").read_text()
    assert "FAILED" not in text
    assert "## Machine" in text and "CPU:" in text and "faiss" in text
    parts = re.split(r"(?m)^(?=## )", text)
    for heading, min_ratios in SECTIONS.items():
        body = next((p for p in parts if p.startswith(heading)), None)
        assert body is not None, f"missing section {heading}"
        ratios = [float(x) for x in re.findall(r"\|\s*([0-9]+\.[0-9]+)x\s*(?=\|)", body)]
        assert len(ratios) >= min_ratios, (heading, body)
        assert all(math.isfinite(r) and r > 0 for r in ratios), (heading, ratios)
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert set(pngs) == {"scan_throughput.png", "latency.png"}
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
