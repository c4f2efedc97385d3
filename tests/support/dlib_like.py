"""Photos whose dlib embeddings are generated, not computed: the real frozen-trunk training path, no dlib photos.

`write_dlib_like(root, ...)` writes one small PNG per photo (distinct content, not a face) in person
folders, generates a 128-d embedding per photo (people are clusters in an anisotropic space, so
whitening has something to do) and stores each under its photo's content in a feature cache, keyed as
the dlib trunk with its default pipeline keys them (opqn_model.feature_cache). With FACEPQ_CACHE pointing
at that cache, `train(..., ModelConfig(trunk="dlib"))`, `facepq eval` and `facepq calibrate` read the
generated embeddings as cache hits and never run dlib. The key names the dlib weights' sha256, so the
model file must be present (the test is skipped with the reason otherwise).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import pytest

DIM = 128


@dataclass(frozen=True)
class DlibLike:
    """data: folder of person folders; cache: the feature-cache root; embeddings float32 [n, 128] and
    persons [n] in the order of `paths`."""

    data: pathlib.Path
    cache: pathlib.Path
    paths: list
    persons: list
    embeddings: np.ndarray


def generated_embeddings(people: int, photos: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """float32 [people * photos, 128]: per person a centre, per photo a noisy copy, in a space whose axes
    have variances spread over two orders of magnitude; scaled to about unit length like dlib's."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0, 0.01, DIM)
    centres = rng.standard_normal((people, DIM)) * scales
    x = np.repeat(centres, photos, axis=0) + 0.35 * rng.standard_normal((people * photos, DIM)) * scales
    x /= np.sqrt(np.square(scales).sum())
    return x.astype(np.float32), [f"person_{i // photos:03d}" for i in range(people * photos)]


def write_dlib_like(root: pathlib.Path, people: int = 30, photos: int = 8, seed: int = 0) -> DlibLike:
    from PIL import Image

    from facepq_core.errors import ConfigError
    from opqn_model.feature_cache import FeatureCache, model_key
    from opqn_model.trunks import create_trunk

    trunk = create_trunk("dlib")
    try:
        key = model_key(trunk, trunk.default_pipeline())
    except ConfigError as exc:  # the dlib weights are not on this machine
        pytest.skip(f"the dlib model file is needed for its feature-cache key: {exc}")
    embeddings, persons = generated_embeddings(people, photos, seed)
    rng = np.random.default_rng(seed + 1)
    data, cache = root / "photos", root / "cache"
    paths, entries = [], []
    for i, person in enumerate(persons):
        folder = data / person
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        entries.append((hashlib.sha256(path.read_bytes()).hexdigest(), embeddings[i], None, None))
    store = FeatureCache(cache)
    store.put_many(key, entries)
    store.close()
    return DlibLike(data, cache, paths, persons, embeddings)


@contextlib.contextmanager
def dlib_like_photos(root: pathlib.Path, people: int = 30, photos: int = 8, seed: int = 0):
    """`write_dlib_like`, with FACEPQ_CACHE pointing at its cache (this process and subprocesses started
    meanwhile) until the block ends."""
    made = write_dlib_like(root, people, photos, seed)
    saved = os.environ.get("FACEPQ_CACHE")
    os.environ["FACEPQ_CACHE"] = str(made.cache)
    try:
        yield made
    finally:
        if saved is None:
            os.environ.pop("FACEPQ_CACHE", None)
        else:
            os.environ["FACEPQ_CACHE"] = saved


def train_whitened(dlib_like: DlibLike, out, method: str = "opqn", whitening: int = 32, bits: int = 32, **train):
    """`opqn_model.train.train` of a dlib-trunk model with `--whitening` on the generated photos (every other
    setting the default but a quick OPQ and a CPU; `train` overrides TrainConfig fields); returns its summary."""
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.train import train as run_train

    settings = dict(method=method, device="cpu", opq_iterations=3, refine_bits=32, seed=0)
    settings.update(train)
    return run_train(str(dlib_like.data), out, ModelConfig(trunk="dlib", bits=bits, whitening=whitening),
                     TrainConfig(**settings), progress=False)
