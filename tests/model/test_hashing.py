"""DMH and DAGH: trunks, hash heads, the discrete layer, the losses, the codecs they export and their checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facepq_core.codecs import codec_from_state
from facepq_core.codes import score_codes
from opqn_model.hash_head import HashHead, discrete_sign
from opqn_model.hash_losses import DAGHLoss, DMHLoss
from opqn_model.synthetic import generate_faces
from opqn_model.trunks import create_trunk


@pytest.fixture(scope="module")
def faces():
    """8 generated people x 4 photos at 32 px, NCHW uint8, and their labels."""
    images, labels = generate_faces(8, 4, size=32, seed=3)
    people = sorted(set(labels))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([people.index(p) for p in labels])


@pytest.mark.parametrize("name", ["densenet", "densenet_attention"])
def test_densenet_trunks_give_one_vector_per_face_from_dense_blocks(name, faces):
    trunk = create_trunk(name, input_size=32, width=16)
    maps = trunk.feature_maps(faces[0][:5])
    assert maps.shape == (5, trunk.feature_dim, 4, 4)  # three blocks, stride-2 stem and two transitions
    assert trunk(faces[0][:5]).shape == (5, trunk.feature_dim)
    # a dense layer's output is its input with `growth` maps appended
    layer = next(m for m in trunk.modules() if type(m).__name__ == "DenseLayer")
    x = torch.randn(2, layer.body[0].num_features, 8, 8)
    assert torch.equal(layer(x)[:, :x.shape[1]], x) and layer(x).shape[1] == x.shape[1] + 4
    assert trunk.attention == (name == "densenet_attention")


def test_discrete_layer_forward_is_exactly_plus_minus_one_and_its_gradient_flows():
    head = HashHead(16, 24, gate=True)
    x = torch.randn(10, 16)
    h = head(x)
    h.retain_grad()
    b = discrete_sign(h)
    assert b.shape == (10, 24) and set(b.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(b > 0, h > 0)  # the codec's bit rule: 1 where h > 0
    weights = torch.randn(10, 24)
    (b * weights).sum().backward()
    assert torch.equal(h.grad, weights)  # straight through: the codes' gradient reaches h unchanged
    assert head.proj.weight.grad.abs().sum() > 0 and head.gate.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gate", [False, True])
def test_exported_codec_sets_the_bits_the_head_computes(gate):
    torch.manual_seed(0)
    head = HashHead(20, 32, gate=gate)
    head.init_statistics(np.random.default_rng(0).normal(2.0, 3.0, (200, 20)).astype(np.float32))
    head.eval()
    x = np.random.default_rng(1).normal(2.0, 3.0, (300, 20)).astype(np.float32)
    with torch.no_grad():
        h = head(torch.from_numpy(x)).numpy()
    codec = codec_from_state(head.export_codec().name, head.export_codec().state())
    assert codec.name == ("binary_gated" if gate else "binary")
    np.testing.assert_allclose(codec.project(x), h, rtol=1e-4, atol=1e-4)
    clear = np.abs(h).min(1) > 1e-3  # signs of values this close to 0 may round either way
    assert clear.sum() > 250
    assert np.array_equal(codec.encode(x)[clear], np.packbits(h[clear] > 0, axis=1, bitorder="little"))


@pytest.mark.parametrize("gate", [False, True])
def test_codec_tables_score_exactly_like_brute_force_hamming_and_asymmetric(gate):
    torch.manual_seed(1)
    head = HashHead(12, 16, gate=gate)
    head.init_statistics(np.random.default_rng(2).normal(size=(100, 12)).astype(np.float32))
    codec = head.eval().export_codec()
    rng = np.random.default_rng(3)
    queries, gallery = rng.normal(size=(7, 12)).astype(np.float32), rng.normal(size=(50, 12)).astype(np.float32)
    codes = codec.encode(gallery)
    bits = np.unpackbits(codes, axis=1, bitorder="little").astype(np.int64)
    q_bits = (codec.project(queries) > 0).astype(np.int64)
    hamming = (q_bits[:, None, :] != bits[None]).sum(2)
    assert np.array_equal(score_codes(codec.query_tables(queries), codes, codec.spec), -hamming)
    asym = codec.with_scoring("asymmetric")
    expected = codec.project(queries).astype(np.float64) @ (2 * bits - 1).T
    np.testing.assert_allclose(score_codes(asym.query_tables(queries), codes, codec.spec), expected, rtol=1e-5,
                               atol=1e-4)


def _train_steps(trunk, head, criterion, loss_input, faces, steps: int) -> list[float]:
    torch.manual_seed(0)
    params = list(trunk.parameters()) + list(head.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    images, labels = faces
    losses = []
    for _ in range(steps):
        parts = criterion(loss_input(head(trunk(images))), labels)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    return losses


def test_dmh_loss_decreases_on_generated_faces(faces):
    torch.manual_seed(0)
    trunk = create_trunk("densenet", input_size=32, width=16)
    head, criterion = HashHead(trunk.feature_dim, 32), DMHLoss(32, 8, center_weight=0.1, quant_weight=0.1)
    losses = _train_steps(trunk, head, criterion, lambda h: h, faces, 40)
    assert losses[-1] < 0.8 * losses[0], losses  # a fixed number of full-batch steps: no timing involved


def test_dagh_loss_decreases_on_generated_faces(faces):
    torch.manual_seed(0)
    trunk = create_trunk("densenet_attention", input_size=32, width=16)
    head, criterion = HashHead(trunk.feature_dim, 32, gate=True), DAGHLoss(32, 8, compact_weight=1.0)
    losses = _train_steps(trunk, head, criterion, discrete_sign, faces, 40)
    assert losses[-1] < 0.8 * losses[0], losses


def test_dmh_loss_parts():
    loss = DMHLoss(8, 3, center_weight=0.0, quant_weight=1.0)
    h = torch.full((2, 8), 50.0)  # tanh = 1: no quantization loss
    assert loss(h, torch.tensor([0, 1]))["quant"] < 1e-6
    assert abs(loss(torch.zeros(2, 8), torch.tensor([0, 1]))["quant"].item() - 1.0) < 1e-6


def test_dagh_compactness_is_the_mean_normalised_hamming_distance_of_same_identity_codes():
    loss = DAGHLoss(4, 2)
    b = torch.tensor([[1., 1, 1, 1], [1, 1, -1, -1], [-1, -1, -1, -1]])
    # pairs of person 0: (0, 1) at distance 2 of 4 bits
    assert abs(loss(b, torch.tensor([0, 0, 1]))["compact"].item() - 0.5) < 1e-6


@pytest.fixture(scope="module")
def tiny_dmh(tmp_path_factory):
    from tests.support.models import train_tiny_model

    return train_tiny_model(tmp_path_factory.mktemp("dmh"), method="dmh", trunk="densenet", epochs=2, people=12,
                            photos=5)


def test_dmh_checkpoint_round_trip_gives_the_same_codes(tiny_dmh):
    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint

    payload = load_checkpoint(tiny_dmh.path, "dmh")
    assert payload["method"] == "dmh" and payload["codec"] == "binary" and payload["trunk"] == "densenet"
    encoder = FaceEncoder.load(tiny_dmh.path)
    images, _ = generate_faces(3, 2, size=64, seed=9)
    crops = np.ascontiguousarray(images[:, ::2, ::2])  # 32 px, as the model reads them
    feats = encoder.trunk_features(crops)
    with torch.no_grad():
        head = HashHead(encoder.embedding_dim, 32)
        head.load_state_dict(payload["head"])
        h = head.eval()(torch.from_numpy(feats)).numpy()
    assert np.array_equal(np.unpackbits(encoder.codec.encode(feats), axis=1, bitorder="little") == 1, h > 0)
    assert FaceEncoder.load(tiny_dmh.path).fingerprint == payload["fingerprint"] == tiny_dmh.summary["fingerprint"]


def test_a_checkpoint_of_another_method_or_codec_is_refused_in_one_line(tiny_dmh, tmp_path):
    from facepq_core.errors import CheckpointError
    from opqn_model.checkpoint import load_checkpoint
    from tests.support.processes import run_cli

    with pytest.raises(CheckpointError, match="trained with method 'dmh', not 'dagh'"):
        load_checkpoint(tiny_dmh.path, "dagh")
    edited = torch.load(tiny_dmh.path, weights_only=True)
    edited["codec"] = "opqn"
    torch.save(edited, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="codec 'opqn' does not match method 'dmh'"):
        load_checkpoint(tmp_path / "edited.pt")
    out = run_cli("eval", "--model", tiny_dmh.path, "--data", tiny_dmh.data, "--method", "opqn", "--no-progress")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "trained with method 'dmh', not 'opqn'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_asymmetric_scoring_is_a_training_option_the_codec_keeps(tmp_path):
    from opqn_model.api import FaceEncoder
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.synthetic import write_faces
    from opqn_model.train import train
    from query_node import hamming_scan
    from query_node.scan import scan_tables

    data = write_faces(tmp_path / "faces", 6, 3, size=32, seed=1)
    summary = train(data, tmp_path / "model", ModelConfig(trunk="densenet", bits=16, input_size=32, trunk_width=16,
                                                          pipeline=FacePipeline(size=32, mode="none").to_dict()),
                    TrainConfig(method="dmh", scoring="asymmetric", epochs=1, device="cpu", test_people=0.0,
                                val_people=0.0, queries_per_person=0), progress=False)
    codec = FaceEncoder.load(summary["model"]).codec
    assert codec.scoring == "asymmetric"
    feats = np.random.default_rng(0).normal(size=(2, codec.embedding_dim)).astype(np.float32)
    assert scan_tables(codec.query_tables(feats), False, 2).hamming is None  # the nodes' table kernel scores it
    hamming = scan_tables(codec.with_scoring("hamming").query_tables(feats), False, 2).hamming
    assert (hamming is not None) == hamming_scan.available()


def test_dagh_refuses_a_trainable_trunk_without_attention(tmp_path):
    from facepq_core.errors import ConfigError
    from tests.support.models import train_tiny_model

    with pytest.raises(ConfigError, match="densenet_attention"):
        train_tiny_model(tmp_path, method="dagh", trunk="densenet", people=4, photos=2)
