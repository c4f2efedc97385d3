"""αQE from codes (facepq_core.expansion) and each codec's reconstruction in the query's space."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.codecs.binary import BinaryCodec
from facepq_core.codecs.float16 import Float16Codec
from facepq_core.codecs.opqn import OPQNCodec
from facepq_core.codecs.pq import PQCodec
from facepq_core.codes import score_codes, unpack_codes
from facepq_core.errors import ConfigError, InvalidRequest
from facepq_core.expansion import MAX_EXPANSION_N, alpha_expand, check_expansion

E = 32


def _opqn(rng, M=4, K=16, d=8):
    return OPQNCodec(rng.normal(size=(M * d, E)), rng.normal(size=M * d) * 0.1, rng.normal(size=(M, d, K)) * 3,
                     M, K, d)


def _pq(rng, M=4, K=16):
    rotation, _ = np.linalg.qr(rng.normal(size=(E, E)))
    return PQCodec(rotation, rng.normal(size=E) * 0.05, rng.normal(size=(M, K, E // M)) * 0.3)


def _binary(rng, scoring="hamming"):
    return BinaryCodec(rng.normal(size=(E, 24)), rng.normal(size=E) * 0.05, True, scoring)


CODECS = {"opqn": _opqn, "opqn-4bit": lambda rng: _opqn(rng, M=6, K=16, d=4), "pq": _pq, "binary": _binary,
          "binary-asymmetric": lambda rng: _binary(rng, "asymmetric")}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_tables_of_the_query_vector_are_the_query_tables(name):
    rng = np.random.default_rng(1)
    codec = CODECS[name](rng)
    x = rng.normal(size=(5, E)).astype(np.float32)
    np.testing.assert_allclose(codec.tables_from_vector(codec.expansion_vector(x)), codec.query_tables(x),
                               rtol=1e-4, atol=1e-4)


def test_opqn_reconstruction_is_the_unit_assignment_vectors_of_the_sub_codes():
    rng = np.random.default_rng(2)
    codec = _opqn(rng)
    codes = codec.encode(rng.normal(size=(3, E)).astype(np.float32))
    recon = codec.reconstruct(codes).reshape(3, codec.M, codec.d)
    sub = unpack_codes(codes, codec.spec)
    for n in range(3):
        for m in range(codec.M):
            a = codec.assignment[m, :, sub[n, m]]
            np.testing.assert_allclose(recon[n, m], a / np.linalg.norm(a) / np.sqrt(codec.M), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(recon.reshape(3, -1), axis=1), 1.0, rtol=1e-5)


def test_pq_scores_are_the_inner_product_of_query_vector_and_reconstruction():
    rng = np.random.default_rng(3)
    codec = _pq(rng)
    faces = rng.normal(size=(40, E)).astype(np.float32)
    codes = codec.encode(faces)
    q = rng.normal(size=(1, E)).astype(np.float32)
    expect = codec.expansion_vector(q)[0] @ codec.reconstruct(codes).T
    np.testing.assert_allclose(score_codes(codec.query_tables(q)[0], codes, codec.spec), expect, rtol=1e-4, atol=1e-5)


def test_binary_reconstruction_is_the_bits_as_signs():
    rng = np.random.default_rng(4)
    codec = _binary(rng)
    faces = rng.normal(size=(20, E)).astype(np.float32)
    recon = codec.reconstruct(codec.encode(faces))
    assert recon.shape == (20, 24) and set(np.unique(recon).tolist()) == {-1.0, 1.0}
    np.testing.assert_array_equal(recon, np.where(codec.project(faces) > 0, 1.0, -1.0))
    # Hamming tables of a reconstruction score its own code 0 (the best) and others minus their distance
    codes = codec.encode(faces)
    scores = score_codes(codec.tables_from_vector(recon[:1])[0], codes, codec.spec)
    assert scores[0] == 0 and scores.max() == 0
    bits = np.unpackbits(codes, axis=1, bitorder="little")
    np.testing.assert_array_equal(scores, -(bits != bits[0]).sum(1))


def test_reconstruct_refuses_codes_of_another_layout_and_float16_offers_no_expansion():
    codec = _opqn(np.random.default_rng(5))
    with pytest.raises(ConfigError, match="uint8"):
        codec.reconstruct(np.zeros((2, codec.code_bytes + 1), np.uint8))
    with pytest.raises(ConfigError, match="no query expansion"):
        Float16Codec(8).reconstruct(np.zeros((1, 16), np.uint8))


def test_alpha_expand_is_the_similarity_weighted_sum():
    rng = np.random.default_rng(6)
    q, r = rng.normal(size=8), rng.normal(size=(5, 8))
    qn, rn = q / np.linalg.norm(q), r / np.linalg.norm(r, axis=1, keepdims=True)
    for alpha in (0.0, 1.0, 3.0):
        w = np.clip(rn @ qn, 0, None) ** alpha
        want = qn + (w[:, None] * rn).sum(0)
        np.testing.assert_allclose(alpha_expand(q, r, alpha), want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
    # a hit pointing away from the query adds nothing; no hits leave the unit query
    np.testing.assert_allclose(alpha_expand(q, -q[None], 2.0), qn, rtol=1e-6)
    np.testing.assert_allclose(alpha_expand(q, np.zeros((0, 8)), 2.0), qn, rtol=1e-6)


@pytest.mark.parametrize("n, alpha", [(-1, 3.0), (MAX_EXPANSION_N + 1, 3.0), (2, -0.5), (2, float("nan")),
                                      (2, float("inf")), (1.5, 3.0), (True, 3.0), (2, "x")])
def test_bad_expansion_options_are_invalid_requests(n, alpha):
    with pytest.raises(InvalidRequest):
        check_expansion(n, alpha)


def test_good_expansion_options_pass():
    assert check_expansion(0, 0).n == 0 and check_expansion(MAX_EXPANSION_N, 3).alpha == 3.0
