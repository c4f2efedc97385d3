"""Refinement codes fitted with a model: a longer product quantizer of the same embeddings, in the checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facepq_core.codecs.float16 import Float16Codec
from facepq_core.codecs.pq import PQCodec, centred_unit
from facepq_core.errors import CheckpointError, ConfigError
from facepq_core.refine import RefineTier, rescore
from opqn_model.api import FaceEncoder
from opqn_model.checkpoint import load_checkpoint
from opqn_model.refine_fit import fit_refine_pq, refine_shape


def test_pq_codes_are_the_nearest_centroids_and_tables_score_the_reconstruction():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((600, 32)).astype(np.float32) + 2.0  # a cone, as face embeddings are
    codec = fit_refine_pq(emb, 64, opq_iterations=3, kmeans_iterations=5)
    assert (codec.spec.M, codec.spec.K, codec.code_bytes, codec.query_shape) == (8, 256, 8, (8, 256))
    codes = codec.encode(emb[:50])
    z = codec.rotated(emb[:50])
    dist = ((z[:, :, None, :] - codec.centroids[None]) ** 2).sum(-1)  # [N, M, K]
    np.testing.assert_array_equal(codes, dist.argmin(-1))
    recon = np.concatenate([codec.centroids[m][codes[:, m]] for m in range(8)], 1)  # [N, 32], rotated space
    q = emb[50:53]
    tables = codec.query_tables(q)
    expected = (centred_unit(q, codec.mean) @ codec.rotation.T) @ recon.T
    got = np.stack([rescore("lut", t, codes) for t in tables])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    again = PQCodec.from_state(codec.state())
    np.testing.assert_array_equal(again.encode(emb[:50]), codes)


def test_float16_rows_score_the_cosine_of_the_embeddings():
    rng = np.random.default_rng(1)
    codec = Float16Codec(24)
    g, q = rng.standard_normal((40, 24)) * 30, rng.standard_normal((2, 24))
    rows = codec.encode(g)
    assert rows.shape == (40, 48) and rows.dtype == np.uint8 and codec.query_shape == (1, 24)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    got = np.stack([rescore("dot", t, rows) for t in codec.query_tables(q)])
    np.testing.assert_allclose(got, cos, atol=2e-3)  # float16 rounding of the stored side


def test_refinement_bits_must_split_the_embedding_evenly():
    assert refine_shape(256, 128) == (32, 4)
    with pytest.raises(ConfigError, match="does not divide it"):
        refine_shape(24, 128)
    with pytest.raises(ConfigError, match="multiple of 8"):
        refine_shape(12, 128)


def test_training_stores_refinement_codes_the_model_offers_and_its_fingerprint_covers(tiny_model, tmp_path):
    payload = load_checkpoint(tiny_model.path)
    assert set(payload["refine_codecs"]) == {"codes:256"}
    enc = FaceEncoder.from_checkpoint(payload)
    codec = enc.refine_codec("codes:256")
    assert isinstance(codec, PQCodec) and codec.code_bytes == 32 and codec.embedding_dim == enc.embedding_dim
    assert RefineTier.of("float16", enc.refine_codec("float16")).code_bytes == 2 * enc.embedding_dim
    with pytest.raises(ConfigError, match="no refinement tier codes:64; it offers codes:256, float16"):
        enc.refine_codec("codes:64")
    raw = torch.load(tiny_model.path, weights_only=True)
    raw["refine_codecs"]["codes:256"]["mean"] += 0.5  # refinement codes that are not the ones fitted
    torch.save(raw, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(tmp_path / "tampered.pt")
