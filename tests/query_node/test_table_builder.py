"""The coordinator's numpy lookup-table path gives the trained head's tables, or falls back to them."""
import types

import numpy as np


def test_folded_tables_match_the_heads_own_for_a_trained_model(tiny_model):
    from opqn_model.api import FaceEncoder
    from query_node.table_builder import TableBuilder

    enc = FaceEncoder.load(tiny_model.path)
    builder = TableBuilder(enc)
    assert builder.folded
    rng = np.random.default_rng(5)
    for scale in (1e-3, 1.0, 1e3):
        emb = (rng.standard_normal((16, enc.embedding_dim)) * scale).astype(np.float32)
        got, want = builder(emb), enc.lookup_tables(emb)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert np.isfinite(got).all()


def test_a_head_of_another_shape_keeps_the_models_torch_path(tiny_model):
    from opqn_model.api import FaceEncoder
    from query_node.table_builder import TableBuilder

    enc = FaceEncoder.load(tiny_model.path)
    other = types.SimpleNamespace(head=types.SimpleNamespace(training=False, projection=[]),
                                  lookup_tables=enc.lookup_tables)
    builder = TableBuilder(other)
    assert not builder.folded
    emb = np.random.default_rng(6).standard_normal((3, enc.embedding_dim)).astype(np.float32)
    assert np.array_equal(builder(emb), enc.lookup_tables(emb))
