"""bench/scan_time.py: the quality table's time column times the node's real search of each row's codes."""
import math

import numpy as np
import pytest

from bench import scan_time as st
from facepq_core.codecs.float16 import Float16Codec
from facepq_core.codes import score_codes
from opqn_model.head import OPQNHead
from opqn_model.methods.itq import fit_itq


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 128)).astype(np.float32)
    return base / np.linalg.norm(base, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def codecs(embeddings):
    head = OPQNHead(128, M=8, K=256, d=256, dropout=0.0).eval()
    return {"opqn": head.export_codec(), "itq": fit_itq(embeddings, 64)}


def test_gallery_like_draws_unit_faces_near_the_gallery(embeddings):
    x = st.gallery_like(embeddings, 5000, seed=1)
    assert x.shape == (5000, 128) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    nearest = (x @ embeddings.T).max(axis=1)  # each drawn face is a noisy copy of one gallery face
    assert nearest.min() > 0.9
    assert not np.array_equal(x, st.gallery_like(embeddings, 5000, seed=2))


@pytest.mark.parametrize("name", ["opqn", "itq"])
def test_the_timed_scan_is_the_exact_top_k(codecs, embeddings, name):
    codec = codecs[name]
    codes = codec.encode(st.gallery_like(embeddings, 20000, seed=3))
    query = embeddings[:1]
    scores, rows = st._node_scan(codec, codec.query_tables(query), codes, st.TOP_K)
    brute = score_codes(codec.query_tables(query), codes, codec.spec)[0]
    order = np.argsort(-brute, kind="stable")[:st.TOP_K]
    np.testing.assert_allclose(scores[0], brute[order], rtol=1e-5, atol=1e-4)
    if name == "itq":  # integer Hamming scores: the same rows, ties by the lower row
        np.testing.assert_array_equal(rows[0], order)


def test_every_timing_returns_a_time(codecs, embeddings):
    import faiss

    million_stand_in = st.gallery_like(embeddings, 20000, seed=4)
    queries = embeddings[:4]
    opqn = codecs["opqn"]
    codes = opqn.encode(million_stand_in)
    refine = Float16Codec(128)
    flat = faiss.IndexFlatIP(128)
    times = [st.codec_ms(codecs["itq"], queries, codecs["itq"].encode(million_stand_in)),
             st.codec_ms(opqn, queries, codes),
             st.expansion_ms(opqn, queries, codes, 2, 3.0),
             st.two_stage_ms(opqn, refine, queries, codes, refine.encode(million_stand_in), 50),
             st.float_ms(million_stand_in, queries),
             st.faiss_ms(flat, queries)]
    assert all(math.isfinite(t) and t > 0 for t in times), times
