"""`facepq bench scratch` as a real subprocess at a tiny size on ORL: the report's structure, not its numbers."""
import json
import math

import pytest

from tests.support.processes import run_cli


@pytest.mark.slow
@pytest.mark.timeout(900)  # a guard against a hang, not a performance bound
def test_tiny_scratch_report(tmp_path, att_faces):
    out = tmp_path / "report.json"
    proc = run_cli("bench", "scratch", "--data", att_faces, "--bits", "32", "--methods", "opqn", "dmh", "itq",
                   "--epochs", "1", "--width", "8", "--seeds", "0", "--unseen-people", "8", "--out",
                   tmp_path / "models", "--json", out, env={"OMP_NUM_THREADS": "1"}, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # ORL: 40 people x 10 photos; 8 unseen people give 3 queries each, the rest of their photos is the gallery
    assert (report["train_people"], report["train_photos"]) == (32, 320)
    assert (report["unseen_people"], report["n_queries"], report["n_gallery"]) == (8, 24, 56)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"opqn", "itq", "dmh", "float (opqn)", "float (dmh)"}
    assert rows["opqn"]["codec"] == "opqn" and rows["dmh"]["codec"] == "binary" and rows["itq"]["codec"] == "binary"
    for name in ("opqn", "itq", "dmh"):
        assert rows[name]["code_bytes"] == 4 and rows[name]["bits"] == 32
    assert rows["float (opqn)"]["code_bytes"] % 4 == 0 and rows["float (opqn)"]["code_bytes"] > 4
    for r in report["rows"]:
        assert r["seed"] == 0
        for key in ("map", "p_at_1", "r_at_10"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (key, r)
    assert "| opqn " in proc.stdout and "| float (dmh) " in proc.stdout and "mAP@all" in proc.stdout
