"""Feature cache: keyed by content and model, remembers skips, safe with two writing processes."""
from __future__ import annotations

import multiprocessing
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from opqn_model.datasets import PhotoRecord
from opqn_model.face_pipeline import FacePipeline
from opqn_model.feature_cache import FeatureCache, default_root, embed_records
from opqn_model.synthetic import generate_faces


class ColourStatsTrunk:
    """A small frozen trunk: per-channel mean and std of the crop (6 features). Counts its calls."""

    name = "colour_stats"
    input_size = 32
    feature_dim = 6
    trainable = False
    cache_key = "trunk:colour_stats:v1"

    def __init__(self):
        self.crops_seen = 0

    def features(self, crops):
        crops = np.asarray(crops, dtype=np.float32)
        self.crops_seen += len(crops)
        return np.concatenate([crops.mean(axis=(1, 2)), crops.std(axis=(1, 2))], axis=1).astype(np.float32)


@pytest.fixture
def gallery(tmp_path):
    """Synthetic faces (not real people) plus one file of each bad kind."""
    images, labels = generate_faces(3, 2, size=48, seed=4)
    records = []
    for i, (image, person) in enumerate(zip(images, labels)):
        path = tmp_path / f"{person}_{i}.png"
        Image.fromarray(image).save(path)
        records.append(PhotoRecord(str(path), person))
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    Image.new("I;16", (40, 40), 30000).save(tmp_path / "deep.png")
    shutil.copy(records[0].path, tmp_path / "copy_of_first.png")  # same content, other name
    records += [PhotoRecord(str(tmp_path / "text.jpg"), "x"), PhotoRecord(str(tmp_path / "missing.png"), "x"),
                PhotoRecord(str(tmp_path / "deep.png"), "y"), PhotoRecord(str(tmp_path / "copy_of_first.png"), "z")]
    return records


def test_embeds_kept_photos_in_order_and_counts_skips_and_conversions(gallery, tmp_path):
    trunk, pipeline = ColourStatsTrunk(), FacePipeline(size=32, mode="none")
    cache = FeatureCache(tmp_path / "cache")
    features, kept, skipped = embed_records(gallery, trunk, pipeline, cache, progress=False, batch_size=4)
    assert [r.path for r in kept] == [r.path for r in gallery if "text" not in r.path and "missing" not in r.path]
    assert features.shape == (8, 6) and features.dtype == np.float32
    assert skipped.skipped == {"not_an_image": 1, "unreadable": 1} and skipped.converted == {"converted_16bit": 1}
    assert np.array_equal(features[0], features[-1])  # the copy has the same content as the first photo
    assert trunk.crops_seen == 7  # the copy was a cache hit: its content was embedded in an earlier batch


def test_rerun_hits_the_cache_including_skip_markers_and_notes(gallery, tmp_path):
    pipeline = FacePipeline(size=32, mode="none")
    cache = FeatureCache(tmp_path / "cache")
    first = embed_records(gallery, ColourStatsTrunk(), pipeline, cache, progress=False)
    trunk = ColourStatsTrunk()
    again = FeatureCache(tmp_path / "cache")
    features, kept, skipped = embed_records(gallery, trunk, pipeline, again, progress=False)
    assert trunk.crops_seen == 0  # nothing decoded or embedded twice
    assert again.hits == len(gallery) - 1 and again.misses == 0  # the missing file has no content to key on
    assert np.array_equal(features, first[0]) and kept == first[1]
    assert skipped.to_dict()["skipped"] == first[2].skipped and skipped.converted == first[2].converted


def test_other_pipeline_settings_miss_the_cache(gallery, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    embed_records(gallery[:2], ColourStatsTrunk(), FacePipeline(size=32, mode="none"), cache, progress=False)
    trunk = ColourStatsTrunk()
    embed_records(gallery[:2], trunk, FacePipeline(size=32, mode="none", padding=0.3), cache, progress=False)
    assert trunk.crops_seen == 2


def test_pipeline_size_must_match_the_trunk(gallery, tmp_path):
    from facepq_core.errors import FacepqError

    with pytest.raises(FacepqError, match="32 px"):
        embed_records(gallery, ColourStatsTrunk(), FacePipeline(size=64, mode="none"), None, progress=False)


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEPQ_CACHE", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c"
    monkeypatch.delenv("FACEPQ_CACHE")
    assert default_root().parts[-3:] == (".cache", "facepq", "features")


def _writer(root, worker, n):
    cache = FeatureCache(root)
    for start in range(0, n, 50):
        cache.put_many("model", [(f"{worker}-{i}", np.full(128, worker * 100000 + i, np.float32), None, None)
                                 for i in range(start, min(n, start + 50))])
        cache.put_many("model", [(f"shared-{i}", np.full(128, i, np.float32), None, None) for i in range(start, start + 5)])


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    cache.put_many("model", [("seed", np.zeros(4, np.float32), None, None)])  # schema exists before the race
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "cache"), w, 3000)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(cache) == 1 + 2 * 3000 + 300  # 300 keys written by both processes count once
    for worker, i in ((1, 0), (2, 2999), (1, 1234)):
        status, vector, _ = cache.get(f"{worker}-{i}", "model")
        assert status == "ok" and vector.shape == (128,) and (vector == worker * 100000 + i).all()
    assert cache.get("1-0", "other model") is None


def test_cache_pickles_and_reopens(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    cache.put_many("m", [("a", np.arange(3, dtype=np.float32), None, "converted_grey"), ("b", None, "no_face", None)])
    clone = pickle.loads(pickle.dumps(cache))
    status, vector, note = clone.get("a", "m")
    assert status == "ok" and vector.tolist() == [0, 1, 2] and note == "converted_grey"
    assert clone.get("b", "m") == ("skip", "no_face", None)
