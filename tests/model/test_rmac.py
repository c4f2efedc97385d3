"""R-MAC pooling with learned whitening on the resnet trunk (opqn_model.trunks.rmac, `--pooling rmac`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facepq_core.errors import ConfigError
from opqn_model.trunks import create_trunk
from opqn_model.trunks.rmac import PCA_EPS, RMACPool, Whitening, rmac_regions


def test_regions_cover_a_multi_scale_grid_inside_the_map():
    square = rmac_regions(7, 7)
    assert square[0] == (0, 0, -1)  # the whole map first
    sides = [s for _, _, s in square[1:]]
    assert sides == [7] + [4] * 4 + [3] * 9  # levels 1..3: 1, 2x2, 3x3 windows
    for h, w in [(7, 7), (3, 5), (6, 4), (2, 2), (1, 1)]:
        for top, left, side in rmac_regions(h, w)[1:]:
            assert 0 <= top and top + side <= h and 0 <= left and left + side <= w
    wide = rmac_regions(3, 5)
    assert len({left for _, left, _ in wide[1:]}) > len({top for top, _, _ in wide[1:]})  # more along the long side


def test_rmac_of_a_constant_map_is_its_whitened_unit_vector():
    pool = RMACPool(6, 6)
    fmap = torch.full((2, 6, 5, 5), 3.0)
    np.testing.assert_allclose(pool(fmap).detach().numpy(), np.full((2, 6), 1 / np.sqrt(6)), rtol=1e-6)
    with torch.no_grad():
        pool.whiten.shift.copy_(torch.linspace(-0.2, 0.3, 6))
        pool.whiten.proj.weight.copy_(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    u = torch.full((6,), 1 / np.sqrt(6))
    want = torch.nn.functional.normalize(pool.whiten.proj.weight @ (u - pool.whiten.shift), dim=0)
    np.testing.assert_allclose(pool(fmap).detach().numpy()[0], want.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_rmac_takes_the_max_of_each_region_before_normalising():
    pool = RMACPool(2, 2)
    fmap = torch.zeros(1, 2, 4, 4)
    fmap[0, 0, 0, 0] = 5.0  # channel 0 peaks in the top-left corner only
    fmap[0, 1] = 1.0        # channel 1 is 1 everywhere
    regions = pool.regions(fmap)[0].numpy()
    windows = rmac_regions(4, 4)
    for r, (top, left, side) in zip(regions, windows):
        corner = side < 0 or (top == 0 and left == 0)
        want = np.array([5.0, 1.0]) if corner else np.array([0.0, 1.0])
        np.testing.assert_allclose(r, want / np.linalg.norm(want), rtol=1e-6)


@pytest.mark.parametrize("out_dim", [8, 5])
def test_whitening_init_is_the_pca_whitening_of_the_samples(out_dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 8)) @ rng.normal(size=(8, 8)) + rng.normal(size=8)
    white = Whitening(8, out_dim)
    white.init_pca(x)
    y = white(torch.as_tensor(x, dtype=torch.float32)).detach().double().numpy()
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(out_dim), atol=1e-3)
    mean = x.mean(0)
    cov = np.cov(x.T, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    top = np.argsort(vals)[::-1][:out_dim]
    pca = (vecs[:, top] / np.sqrt(vals[top] + PCA_EPS)).T  # rows up to sign
    np.testing.assert_allclose(white.shift.detach().numpy(), mean, rtol=1e-5, atol=1e-5)
    proj = white.proj.weight.detach().double().numpy()
    np.testing.assert_allclose(np.abs(proj), np.abs(pca), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(proj.T @ proj, pca.T @ pca, rtol=1e-3, atol=1e-4)


def test_trunk_shapes_per_pooling_and_rmac_descriptors_are_unit_vectors():
    crops = np.random.default_rng(1).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    flat, gap = create_trunk("resnet20", width=8), create_trunk("resnet20", width=8, pooling="gap")
    rmac = create_trunk("resnet20", width=8, pooling="rmac")
    assert flat.features(crops).shape == gap.features(crops).shape == (3, 512)
    assert rmac.feature_dim == 64  # the last stage's channels (width x 8)
    feats = rmac.features(crops)
    assert feats.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert rmac.init_whitening(crops) == 3 * len(rmac_regions(2, 2)) and flat.init_whitening(crops) == 0
    with pytest.raises(ConfigError, match="pooling"):
        create_trunk("resnet20", pooling="sum")


def test_pooling_needs_feature_maps_and_its_default_leaves_old_fingerprints_alone():
    from opqn_model.api import build_trunk
    from opqn_model.config import ModelConfig

    assert "pooling" not in ModelConfig().to_dict()  # hashed by checkpoints written before the option existed
    assert ModelConfig(pooling="rmac").to_dict()["pooling"] == "rmac"
    assert ModelConfig.from_dict(ModelConfig(pooling="rmac").to_dict()).pooling == "rmac"
    with pytest.raises(ConfigError, match="feature maps"):
        build_trunk(ModelConfig(trunk="dlib", pooling="rmac"))


@pytest.mark.slow
def test_a_tiny_rmac_model_trains_end_to_end_and_its_checkpoint_round_trips(tmp_path):
    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.trunks.rmac import Whitening
    from tests.support.models import train_tiny_model

    tiny = train_tiny_model(tmp_path, people=12, photos=5, trunk_width=8, epochs=1, pooling="rmac")
    payload = load_checkpoint(tiny.path)  # verifies the fingerprint over config (with pooling) and weights
    assert payload["model_config"].pooling == "rmac"
    assert any(k.startswith("rmac.whiten.") for k in payload["trunk_state"])
    weight = payload["trunk_state"]["rmac.whiten.proj.weight"].numpy()
    assert not np.allclose(weight, np.eye(*weight.shape))  # started from the PCA, not the identity
    enc = FaceEncoder.load(tiny.path)
    crops = np.random.default_rng(2).integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    feats = enc.trunk_features(crops)
    assert feats.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    again = FaceEncoder.load(tiny.path)
    np.testing.assert_array_equal(again.trunk_features(crops), feats)
    assert enc.codec.encode(feats).shape == (4, enc.codec.code_bytes)
    assert isinstance(again.trunk.rmac.whiten, Whitening)
