"""The package build generates the gRPC stubs: a wheel built from a fresh checkout (no stubs, no extension)
holds them, and what it installs runs `facepq node` / `coordinator` / `search` imports.

Built offline with this environment's setuptools and grpcio-tools (--no-build-isolation); the README
documents the same check with `pip install .` in a fresh virtualenv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.support.processes import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _fresh_checkout(dst):
    """The files git would give a fresh clone (tracked and new, minus ignored ones: no stubs, no .so)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def test_a_wheel_of_a_fresh_checkout_carries_the_grpc_stubs(tmp_path):
    src = _fresh_checkout(tmp_path / "src")
    assert not (src / "facepq_proto" / "facepq").exists()  # really fresh: nothing generated yet
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=800)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("facepq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("facepq_pb2.py", "facepq_pb2_grpc.py", "__init__.py"):
        assert f"facepq_proto/facepq/v1/{stub}" in names
    assert "facepq_proto/facepq/__init__.py" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # The installed package's own commands import the stubs: run them from outside any checkout.
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    probe = ("import facepq_proto.facepq.v1.facepq_pb2_grpc as g, facepq.client, query_node.node_server, "
             "query_node.coordinator_server, facepq_core.addresses as a; print(g.__file__); print(facepq.client.__file__); "
             "print(a.__file__)")
    ran = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert all(line.startswith(str(tmp_path / "site")) for line in ran.stdout.split()), ran.stdout
    for command in ("node", "coordinator", "search"):
        helped = subprocess.run([sys.executable, "-m", "facepq.cli", command, "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0, helped.stderr[-2000:]
