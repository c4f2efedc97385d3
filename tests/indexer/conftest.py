"""Fixtures of the index tests: the session's trained model, synthetic galleries, one local Ray per module."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from facepq_core.codes import CodeSpec
from indexer.manifest import ModelMeta


@pytest.fixture
def meta() -> ModelMeta:
    """A model description for format-level tests (no encoding happens in them)."""
    return ModelMeta.from_code_spec(CodeSpec(M=8, K=256), fingerprint="f00dfeedf00dfeed", trunk="resnet20")


@pytest.fixture
def rows():
    """(face_ids, persons, sources, codes) for 500 faces of 10 people, 8-byte codes."""
    rng = np.random.default_rng(7)
    n = 500
    ids = rng.integers(1, 2**63, n, dtype=np.uint64)
    persons = [f"person_{i % 10:02d}" for i in range(n)]
    sources = [f"/photos/{i:05d}.jpg" for i in range(n)]
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    return ids, persons, sources, codes


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("indexer")


@pytest.fixture(scope="session")
def synthetic_gallery(work_dir) -> pathlib.Path:
    """Synthetic faces (not real people): 12 identities x 6 photos, 48x48 PNG."""
    from opqn_model.synthetic import write_faces

    return write_faces(work_dir / "synth", 12, 6, size=48, seed=3)


@pytest.fixture(scope="session")
def big_gallery(work_dir) -> pathlib.Path:
    """Synthetic faces, 40 identities x 8 photos (long enough to kill an ingest mid-way)."""
    from opqn_model.synthetic import write_faces

    return write_faces(work_dir / "synth_big", 40, 8, size=40, seed=5)


@pytest.fixture(scope="session")
def trained_model(tiny_model) -> pathlib.Path:
    """A real OPQN checkpoint: the session's tiny model (tests/support/models.py). Ingest only needs a model
    that encodes; training another one here would add a training run to the session and test nothing more."""
    return tiny_model.path


@pytest.fixture(scope="session")
def other_model(work_dir, trained_model) -> pathlib.Path:
    """A second real checkpoint: the first with its head's weights changed (so another fingerprint),
    saved through the checkpoint writer (cheaper than training another)."""
    import torch

    from opqn_model.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(trained_model)
    head = {k: v.clone() for k, v in payload["head"].items()}
    with torch.no_grad():
        head["projection.2.weight"] += 0.01
    path = work_dir / "model_b.pt"
    save_checkpoint(path, payload["model_config"], head, payload["trunk_state"])
    return path


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module; its address lets subprocess ingests join it."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
