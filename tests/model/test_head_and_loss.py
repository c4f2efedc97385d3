import numpy as np
import pytest
import torch

from facepq_core.codes import CodeSpec, unpack_codes
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


def _probabilities(head, x: torch.Tensor) -> np.ndarray:
    """P[m, k] = softmax(sqrt(d) x̂_m A_m), the training pass's soft assignment, float64 [N, M, K]."""
    with torch.no_grad():
        return head(x)["p"].double().numpy()


def test_head_shapes(head):
    out = head(torch.randn(10, 128))
    assert out["x"].shape == (10, 4, 64) and out["s"].shape == (10, 4, 64) and out["p"].shape == (10, 4, 64)
    torch.testing.assert_close(out["p"].sum(-1), torch.ones(10, 4))
    codec = head.export_codec()
    assert codec.encode(np.random.default_rng(0).standard_normal((10, 128))).dtype == np.uint8
    assert codec.query_tables(np.random.default_rng(1).standard_normal((3, 128))).shape == (3, 4, 64)


def test_lookup_table_is_the_log_of_the_assignment_probabilities_per_subspace_weight(head):
    """LUT[m] = w_m log P[m]: the exported codec's tables over the training pass's log-probabilities give
    one weight per subspace (weights in test_head_init.py)."""
    x = torch.randn(6, 128)
    lut = head.export_codec().query_tables(x.numpy()).astype(np.float64)
    ratio = lut / np.log(_probabilities(head, x))  # w_m, the same for every k of a subspace
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), atol=1e-4, rtol=1e-4)
    assert (ratio > 0).all()
    np.testing.assert_allclose(_probabilities(head, x).sum(-1), np.ones((6, 4)), atol=1e-6)


def test_code_is_argmax_of_the_lookup_table(head):
    x = np.random.default_rng(2).standard_normal((20, 128)).astype(np.float32)
    codec = head.export_codec()
    np.testing.assert_array_equal(codec.encode(x), codec.query_tables(x).argmax(-1))


def test_exported_codec_reproduces_the_eval_mode_head_in_torch(head):
    """The numpy codec (BN -> Linear -> BN folded) against the head's own torch layers, on the same inputs."""
    x = torch.randn(50, 128)
    with torch.no_grad():
        logits = head.assignment_logits(head.project(x))
        z = head.project(x)
        w = z.norm(dim=-1, keepdim=True)
        want = (torch.log_softmax(logits, -1) * (w / w.mean(1, keepdim=True))).numpy()
    codec = head.export_codec()
    np.testing.assert_allclose(codec.query_tables(x.numpy()), want, atol=1e-4)
    assert (codec.encode(x.numpy()) == logits.argmax(-1).numpy()).mean() >= 0.98  # argmax near-ties may round apart


def test_lut_score_equals_inner_product_of_soft_quantized_query_with_codewords(head):
    """sum_m P[m, c_m] == sum_m <C_m p_m(q), codeword c_m>: orthonormal codewords make them equal."""
    q = torch.randn(5, 128)
    gallery = torch.randn(30, 128)
    codes = torch.from_numpy(head.export_codec().encode(gallery.numpy())).long()  # [G, M]
    probs = torch.from_numpy(_probabilities(head, q)).float()  # [Q, M, K]
    lut_score = torch.stack([probs[:, m, codes[:, m]] for m in range(4)]).sum(0)  # [Q, G]
    with torch.no_grad():
        s = head(q)["s"]  # [Q, M, d] = C_m p_m(q)
    codewords = head.codebooks[torch.arange(4)[None, :], :, codes]  # [G, M, d]
    ip_score = torch.einsum("qmd,gmd->qg", s, codewords)
    torch.testing.assert_close(lut_score, ip_score, atol=1e-5, rtol=1e-5)


def test_codec_packs_4bit_codes_and_validates_input():
    torch.manual_seed(0)
    head = OPQNHead(in_dim=16, M=5, K=16, d=32).eval()
    codec = head.export_codec()
    emb = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    stored = codec.encode(emb)
    assert stored.shape == (7, 3) and codec.spec == CodeSpec(5, 16)
    with torch.no_grad():
        want = head.assignment_logits(head.project(torch.from_numpy(emb))).argmax(-1).numpy()
    np.testing.assert_array_equal(unpack_codes(stored, codec.spec), want)
    from facepq_core.errors import ConfigError
    with pytest.raises(ConfigError, match="float32 \\[N, 16\\]"):
        codec.encode(emb[:, :8])
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        codec.query_tables(bad)
    with pytest.raises(ConfigError, match="1e\\+15"):
        codec.query_tables(emb * 1e20)


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


def test_loss_decreases_on_generated_identities():
    """60 full-batch SGD steps of head + loss on fixed embeddings of 10 generated people: a fixed amount of
    work (no time window), and a margin far from what CPU kernels change (measured 15.9 -> 0.09)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 32)) + 2.0
    x = torch.from_numpy((np.repeat(centres, 8, 0) + 0.6 * rng.standard_normal((80, 32))).astype(np.float32))
    labels = torch.arange(10).repeat_interleave(8)
    head = OPQNHead(in_dim=32, M=4, K=16, d=32)
    loss = OPQNLoss(M=4, d=32, num_classes=10, margin=0.5, scale=20.0, entropy_weight=0.1)
    optimizer = torch.optim.SGD(list(head.parameters()) + list(loss.parameters()), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        out = loss(head(x), labels)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]
