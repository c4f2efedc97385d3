"""The frozen dlib trunk on real LFW photos: identity separates, features are cached by content."""
from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest

from opqn_model.datasets import PhotoRecord
from opqn_model.feature_cache import FeatureCache, embed_records, model_key
from opqn_model.images import load_image
from opqn_model.trunks import create_trunk, list_trunks
from opqn_model.trunks.dlib import DlibTrunk

pytestmark = pytest.mark.shared_data


class CountingDlibTrunk(DlibTrunk):
    """The real dlib trunk, counting the chips it embeds (to prove a cache hit skips the network)."""

    def __init__(self):
        super().__init__()
        self.chips_embedded = 0

    def features(self, crops):
        self.chips_embedded += len(crops)
        return super().features(crops)


def _records(root, n_people=4, per_person=3):
    people = sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p)))[:n_people]
    return [PhotoRecord(os.path.join(root, p, f), p) for p in people
            for f in sorted(os.listdir(os.path.join(root, p)))[:per_person]]


@pytest.fixture(scope="module")
def embedded(lfw5, tmp_path_factory):
    records = _records(lfw5)
    trunk = CountingDlibTrunk()
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    features, kept, skipped = embed_records(records, trunk, trunk.default_pipeline(), cache, progress=False)
    return records, trunk, cache, features, kept, skipped


def test_same_person_pairs_are_closer_than_different_person_pairs(embedded):
    records, _, _, features, kept, skipped = embedded
    assert skipped.total == 0 and kept == records
    assert features.shape == (12, 128) and features.dtype == np.float32
    people = np.array([r.person for r in kept])
    dist = np.linalg.norm(features[:, None] - features[None, :], axis=-1)
    same = people[:, None] == people[None, :]
    off_diagonal = ~np.eye(len(people), dtype=bool)
    same_d, diff_d = dist[same & off_diagonal], dist[~same]
    assert same_d.mean() + 0.2 < diff_d.mean()
    assert same_d.max() < 0.6 < diff_d.min()  # dlib's documented same-person threshold separates them here
    np.fill_diagonal(dist, np.inf)
    assert (people[dist.argmin(1)] == people).all()


def test_second_run_reads_the_cache_without_running_the_network(embedded):
    records, trunk, cache, features, kept, _ = embedded
    assert trunk.chips_embedded == len(records)
    hits_before = cache.hits
    again, kept_again, skipped = embed_records(records, trunk, trunk.default_pipeline(), cache, progress=False)
    assert trunk.chips_embedded == len(records)  # nothing recomputed
    assert cache.hits - hits_before == len(records)
    assert kept_again == kept and skipped.total == 0 and np.array_equal(again, features)
    # another process (a fresh cache object on the same folder) sees the same entries
    fresh = FeatureCache(cache.root)
    content_sha256 = hashlib.sha256(open(records[0].path, "rb").read()).hexdigest()
    hit = fresh.get(content_sha256, model_key(trunk, trunk.default_pipeline()))
    assert hit[0] == "ok" and np.array_equal(hit[1], features[0])


def test_registry_builds_the_dlib_trunk_and_it_pickles(embedded):
    assert "dlib" in list_trunks()
    trunk = create_trunk("dlib", num_jitters=None)
    assert isinstance(trunk, DlibTrunk) and trunk.num_jitters == 0
    assert (trunk.name, trunk.input_size, trunk.feature_dim, trunk.trainable) == ("dlib", 150, 128, False)
    pipeline = trunk.default_pipeline()
    assert (pipeline.size, pipeline.padding, pipeline.mode) == (150, 0.25, "dlib")
    clone = pickle.loads(pickle.dumps(trunk))
    records, _, _, features, _, _ = embedded
    chip = pipeline(load_image(records[0].path))
    assert np.allclose(clone.features(chip[None]), features[0], atol=1e-5)
    assert clone.features(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError):
        clone.features(np.zeros((1, 112, 112, 3), np.uint8))
