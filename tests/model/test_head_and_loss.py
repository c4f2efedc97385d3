import numpy as np
import pytest
import torch

from facepq_core.codes import CodeSpec, unpack_codes
from opqn_model.api import HeadCodec
from opqn_model.head import OPQNHead
from opqn_model.losses import OPQNLoss


@pytest.fixture
def head():
    torch.manual_seed(0)
    h = OPQNHead(in_dim=128, M=4, K=64, d=64)
    # move away from the init so the test does not depend on it
    with torch.no_grad():
        h.assignment.add_(torch.randn_like(h.assignment))
    return h.eval()


def test_head_shapes(head):
    out = head(torch.randn(10, 128))
    assert out["x"].shape == (10, 4, 64) and out["s"].shape == (10, 4, 64) and out["p"].shape == (10, 4, 64)
    torch.testing.assert_close(out["p"].sum(-1), torch.ones(10, 4))
    assert head.encode(torch.randn(10, 128)).dtype == torch.uint8
    assert head.lookup_tables(torch.randn(3, 128)).shape == (3, 4, 64)


def test_lookup_table_is_the_log_of_the_assignment_probabilities_per_subspace_weight(head):
    """LUT[m] = w_m log P[m]: exp(LUT[m] / w_m) gives back the probabilities (weights in test_head_init.py)."""
    x = torch.randn(6, 128)
    lut = head.lookup_tables(x)
    ratio = lut / torch.log(head.assignment_probabilities(x))  # w_m, the same for every k of a subspace
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), atol=1e-4, rtol=1e-4)
    assert (ratio > 0).all()
    torch.testing.assert_close(head.assignment_probabilities(x).sum(-1), torch.ones(6, 4))


def test_code_is_argmax_of_the_lookup_table(head):
    x = torch.randn(20, 128)
    codes = head.encode(x).long()
    luts = head.lookup_tables(x)
    torch.testing.assert_close(codes, luts.argmax(-1))


def test_lut_score_equals_inner_product_of_soft_quantized_query_with_codewords(head):
    """sum_m P[m, c_m] == sum_m <C_m p_m(q), codeword c_m>: orthonormal codewords make them equal."""
    q = torch.randn(5, 128)
    gallery = torch.randn(30, 128)
    codes = head.encode(gallery).long()  # [G, M]
    luts = head.assignment_probabilities(q)  # [Q, M, K]
    lut_score = torch.stack([luts[:, m, codes[:, m]] for m in range(4)]).sum(0)  # [Q, G]
    s = head(q)["s"]  # [Q, M, d] = C_m p_m(q)
    codewords = head.codebooks[torch.arange(4)[None, :], :, codes]  # [G, M, d]
    ip_score = torch.einsum("qmd,gmd->qg", s, codewords)
    torch.testing.assert_close(lut_score, ip_score, atol=1e-5, rtol=1e-5)


def test_codec_packs_4bit_codes_and_validates_input():
    torch.manual_seed(0)
    head = OPQNHead(in_dim=16, M=5, K=16, d=32).eval()
    codec = HeadCodec(head, CodeSpec(5, 16))
    emb = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    stored = codec.encode(emb)
    assert stored.shape == (7, 3)
    np.testing.assert_array_equal(unpack_codes(stored, codec.code_spec), head.encode(torch.from_numpy(emb)).numpy())
    from facepq_core.errors import ConfigError
    with pytest.raises(ConfigError, match="float32 \\[N, 16\\]"):
        codec.encode(emb[:, :8])
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        codec.lookup_tables(bad)


def test_loss_parts_and_shapes():
    torch.manual_seed(0)
    head = OPQNHead(in_dim=32, M=4, K=16, d=16)
    loss = OPQNLoss(M=4, d=16, num_classes=5, margin=0.5, scale=20.0, entropy_weight=0.1)
    out = loss(head(torch.randn(8, 32)), torch.randint(0, 5, (8,)))
    assert out["loss"].shape == () and out["loss"].requires_grad
    expected = 0.5 * (out["ce_x"] + out["ce_s"]) + 0.1 * out["entropy"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert 0 <= out["entropy"] <= np.log(16) + 1e-5


def test_margin_lowers_the_target_logit_only():
    loss = OPQNLoss(M=1, d=4, num_classes=3, margin=0.5, scale=10.0)
    v = torch.randn(2, 1, 4)
    labels = torch.tensor([0, 2])
    with_margin = loss.classifier(v, labels)
    loss.classifier.margin = 0.0
    without = loss.classifier(v, labels)
    diff = (without - with_margin)[:, 0, :]
    torch.testing.assert_close(diff, torch.tensor([[5.0, 0, 0], [0, 0, 5.0]]))
