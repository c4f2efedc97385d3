"""Learned whitening on the dlib path (`facepq train --trunk dlib --whitening D`): the torch layer, its PCA
start, the numpy codec it folds into, and real training runs of every method on generated dlib embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facepq_core.codecs import codec_from_state
from facepq_core.codecs.base import BLAS_MIN_ROWS
from facepq_core.codecs.whitened import WhitenedCodec
from facepq_core.errors import CheckpointError, ConfigError
from opqn_model.hash_head import HashHead
from opqn_model.head import OPQNHead
from opqn_model.head_init import init_head_from_features
from opqn_model.input_whitening import InputWhitening
from opqn_model.trunks.rmac import Whitening
from tests.support.dlib_like import dlib_like_photos, generated_embeddings, train_whitened

D = 32


def _by_hand(x, mean, projection):
    """n(P (x - m)), written out independently of the codec (the product as the codec takes it for this many
    rows, so that equal means bit-equal: BLAS and einsum round differently)."""
    x = x.astype(np.float32) - mean
    z = x @ projection.T if len(x) >= BLAS_MIN_ROWS else np.einsum("ne,oe->no", x, projection)
    return (z / np.maximum(np.sqrt(np.square(z, dtype=np.float64).sum(1, keepdims=True)), 1e-12)).astype(np.float32)


def _whitened_codecs():
    """A whitened codec around each first-pass codec kind a head exports, fitted to generated embeddings."""
    x, _ = generated_embeddings(40, 6)
    opqn = OPQNHead(128, 4, 16, 32, input_whitening=InputWhitening(128, D))
    init_head_from_features(opqn, x, opq_iterations=2)
    out = {"opqn": opqn.eval().export_codec()}
    for name, gate in (("binary", False), ("binary_gated", True)):
        head = HashHead(128, 32, gate=gate, input_whitening=InputWhitening(128, D))
        head.init_statistics(x)
        out[name] = head.eval().export_codec(scoring="asymmetric")
    return x, out


@pytest.fixture(scope="module")
def codecs():
    return _whitened_codecs()


@pytest.mark.parametrize("inner", ["opqn", "binary", "binary_gated"])
def test_the_wrapper_is_the_inner_codec_applied_to_the_normalised_whitened_embedding(codecs, inner):
    x, all_codecs = codecs
    codec = all_codecs[inner]
    assert isinstance(codec, WhitenedCodec) and codec.inner.name == inner and codec.embedding_dim == 128
    w = _by_hand(x, codec.mean, codec.projection)
    assert w.shape == (len(x), D) and np.allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(codec.encode(x), codec.inner.encode(w))
    few = _by_hand(x[:5], codec.mean, codec.projection)  # a few queries: the coordinator's case
    assert np.array_equal(codec.query_tables(x[:5]), codec.inner.query_tables(few))
    assert np.array_equal(codec.query_tables(x), codec.inner.query_tables(w))
    assert np.array_equal(codec.float_features(x), codec.inner.float_features(w))
    assert np.array_equal(codec.expansion_vector(x[:5]), codec.inner.expansion_vector(few))
    # the inner codec's space is the wrapper's: layout, kernel, codewords, reconstruction, tables of a vector
    assert (codec.spec, codec.kernel, codec.code_bytes) == (codec.inner.spec, codec.inner.kernel, codec.inner.code_bytes)
    codes = codec.encode(x[:7])
    assert np.array_equal(codec.reconstruct(codes), codec.inner.reconstruct(codes))
    v = codec.expansion_vector(x[:3])
    assert np.array_equal(codec.tables_from_vector(v), codec.inner.tables_from_vector(v))
    assert np.array_equal(codec.codewords(), codec.inner.codewords())
    # the torch layer the head trains computes the same whitening
    layer = InputWhitening(128, D)
    layer.shift.data = torch.from_numpy(codec.mean)
    layer.proj.weight.data = torch.from_numpy(codec.projection)
    assert np.allclose(layer.apply(x), w, atol=1e-6)


def test_the_embedding_policy_applies_to_the_raw_input(codecs):
    x, all_codecs = codecs
    codec = all_codecs["opqn"]
    with pytest.raises(ConfigError, match=r"\[N, 128\]"):
        codec.encode(x[:, :D])  # a whitened vector is not an embedding of this model
    bad = x[:2].copy()
    bad[0, 3] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        codec.query_tables(bad)


@pytest.mark.parametrize("inner", ["opqn", "binary", "binary_gated"])
def test_state_round_trip_through_the_registry(codecs, inner):
    x, all_codecs = codecs
    codec = all_codecs[inner]
    state = codec.state()
    assert state["inner_codec"] == inner and {"whiten_mean", "whiten_projection"} <= set(state)
    again = codec_from_state("whitened", state)
    assert isinstance(again, WhitenedCodec) and again.inner.name == inner
    assert np.array_equal(again.encode(x), codec.encode(x))
    assert np.array_equal(again.query_tables(x[:4]), codec.query_tables(x[:4]))
    if inner != "opqn":
        assert again.inner.scoring == "asymmetric"  # the inner codec's own settings travel too


def test_malformed_states_are_refused_naming_what_is_wrong(codecs):
    _, all_codecs = codecs
    state = all_codecs["opqn"].state()
    with pytest.raises(ConfigError, match="inner codec"):
        codec_from_state("whitened", {k: v for k, v in state.items() if k != "inner_codec"})
    with pytest.raises(ConfigError, match="inner codec"):
        codec_from_state("whitened", dict(state, inner_codec="whitened"))
    with pytest.raises(ConfigError, match="whiten_projection"):
        codec_from_state("whitened", {k: v for k, v in state.items() if k != "whiten_projection"})
    with pytest.raises(ConfigError, match="takes"):  # a whitening to 16 dims in front of a 32-d codec
        codec_from_state("whitened", dict(state, whiten_projection=state["whiten_projection"][:16]))
    with pytest.raises(ConfigError, match="first-pass"):
        WhitenedCodec(state["whiten_mean"], state["whiten_projection"], all_codecs["opqn"])


def test_the_pca_start_whitens_the_training_embeddings():
    x, _ = generated_embeddings(30, 8)
    layer = InputWhitening(128, D)
    out = layer.start(x)
    with torch.no_grad():
        before_norm = Whitening.forward(layer, torch.from_numpy(x)).double().numpy()
    assert np.allclose(before_norm.mean(0), 0.0, atol=1e-4)
    assert np.allclose(np.cov(before_norm, rowvar=False, bias=True), np.eye(D), atol=1e-3)
    assert np.allclose(out, before_norm / np.linalg.norm(before_norm, axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("kind", ["opqn", "hash"])
def test_a_heads_data_start_whitens_first_and_fits_the_rest_to_the_whitened_vectors(kind):
    x, _ = generated_embeddings(30, 8)
    if kind == "opqn":
        head = OPQNHead(128, 4, 16, 32, input_whitening=InputWhitening(128, D))
        init_head_from_features(head, x, opq_iterations=2)
        fitted_mean = head.input_norm.running_mean.numpy()
    else:
        head = HashHead(128, 32, input_whitening=InputWhitening(128, D))
        head.init_statistics(x)
        fitted_mean = head.norm.running_mean.numpy()
    with torch.no_grad():
        before_norm = Whitening.forward(head.input_whitening, torch.from_numpy(x)).double().numpy()
    assert np.allclose(np.cov(before_norm, rowvar=False, bias=True), np.eye(D), atol=1e-3)
    # the rest of the head saw the whitened, normalised D-d vectors (its statistics are theirs)
    assert fitted_mean.shape == (D,)
    assert np.allclose(fitted_mean, head.input_whitening.apply(x).mean(0), atol=1e-5)


def test_without_whitening_heads_configs_and_their_state_keys_are_unchanged():
    from opqn_model.config import ModelConfig

    assert "whitening" not in ModelConfig(trunk="dlib").to_dict()  # fingerprints of earlier models still verify
    assert ModelConfig(trunk="dlib", whitening=D).to_dict()["whitening"] == D
    assert not any("whitening" in key for key in OPQNHead(128, 4, 16, 32).state_dict())
    assert not any("whitening" in key for key in HashHead(128, 32).state_dict())
    assert OPQNHead(128, 4, 16, 32).eval().export_codec().name == "opqn"


# ---- real training runs on generated dlib embeddings ------------------------------------------------------

@pytest.fixture(scope="module")
def dlib_like(tmp_path_factory):
    with dlib_like_photos(tmp_path_factory.mktemp("dlib_like"), people=30, photos=8) as made:
        yield made


@pytest.fixture(scope="module")
def opqn_model(dlib_like, tmp_path_factory):
    """OPQN with whitening: data start (epoch 0) then 1 trained epoch; validation people pick one."""
    return train_whitened(dlib_like, tmp_path_factory.mktemp("opqn_whitened"), "opqn", epochs=1, batch_size=64)


def test_a_whitened_opqn_checkpoint_carries_the_wrapper_and_its_codes(dlib_like, opqn_model):
    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint

    payload = load_checkpoint(opqn_model["model"], "opqn")
    assert payload["codec"] == "whitened" and payload["model_config"].whitening == D
    enc = FaceEncoder.load(opqn_model["model"])
    assert enc.codec.name == "whitened" and enc.codec.inner.name == "opqn" and enc.embedding_dim == 128
    assert enc.fingerprint == opqn_model["fingerprint"] == payload["fingerprint"]
    # the codec is the saved head's whitening in front of the saved head's own codec
    head = payload["head"]
    mean, projection = head["input_whitening.shift"].numpy(), head["input_whitening.proj.weight"].numpy()
    assert projection.shape == (D, 128)
    x = dlib_like.embeddings
    inner = OPQNHead.from_state_dict(head, payload["model_config"]).eval()._export_opqn()
    expected = WhitenedCodec(mean, projection, inner)
    assert np.array_equal(enc.codec.encode(x), expected.encode(x))
    assert np.array_equal(enc.codec.encode(x), inner.encode(_by_hand(x, mean, projection)))
    # refinement tiers keep encoding the raw embedding
    refine = enc.refine_codec("codes:32")
    assert refine.name == "pq" and refine.embedding_dim == 128
    assert enc.refine_codec("float16").embedding_dim == 128


def test_a_whitened_checkpoint_still_refuses_another_method(opqn_model):
    from opqn_model.checkpoint import load_checkpoint

    for other in ("itq", "dmh"):
        with pytest.raises(CheckpointError, match="trained with method 'opqn'"):
            load_checkpoint(opqn_model["model"], other)


def test_a_checkpoint_whose_codec_does_not_match_its_whitening_is_refused(opqn_model, tmp_path):
    from opqn_model.checkpoint import load_checkpoint

    payload = torch.load(opqn_model["model"], weights_only=True)
    payload["codec"] = "opqn"  # the whitening's config says 'whitened'
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="codes here are 'whitened'"):
        load_checkpoint(tmp_path / "edited.pt")


def test_the_whitening_trains_with_the_head(dlib_like, tmp_path):
    """From its PCA start the whitening moves under the OPQN loss (without validation people the trained
    epoch is the model, so the saved whitening is the trained one)."""
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.config import TrainConfig
    from opqn_model.datasets import list_photos
    from opqn_model.train import make_split

    summary = train_whitened(dlib_like, tmp_path, "opqn", epochs=2, batch_size=32, head_init="random", val_people=0.0,
                     lr=0.5)
    head = load_checkpoint(summary["model"], "opqn")["head"]
    # the PCA start: of the training photos of the same split
    split = make_split(list_photos(dlib_like.data), TrainConfig(val_people=0.0, seed=0))
    index = {str(p): i for i, p in enumerate(dlib_like.paths)}
    start = InputWhitening(128, D)
    start.init_pca(dlib_like.embeddings[[index[str(r.path)] for r in split.train]])
    assert summary["epochs"] == 2
    moved = np.abs(head["input_whitening.proj.weight"].numpy() - start.proj.weight.detach().numpy()).max()
    assert moved > 1e-3


@pytest.mark.parametrize("method, inner", [("itq", "binary"), ("dmh", "binary"), ("dagh", "binary_gated")])
def test_every_method_trains_a_whitened_model_whose_checkpoint_round_trips(dlib_like, tmp_path, method, inner):
    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint

    summary = train_whitened(dlib_like, tmp_path, method, epochs=None if method == "itq" else 2, batch_size=64)
    payload = load_checkpoint(summary["model"], method)
    enc = FaceEncoder.load(summary["model"])
    assert payload["codec"] == enc.codec.name == "whitened" and enc.codec.inner.name == inner
    state = payload["codec_state"]
    assert tuple(state["whiten_projection"].shape) == (D, 128) and tuple(state["projection"].shape) == (D, 32)
    x = dlib_like.embeddings
    expected = codec_from_state(inner, {k: v for k, v in state.items() if not k.startswith(("whiten_", "inner_"))})
    assert np.array_equal(enc.codec.encode(x),
                          expected.encode(_by_hand(x, state["whiten_mean"].numpy(), state["whiten_projection"].numpy())))
    with pytest.raises(CheckpointError, match=f"trained with method '{method}'"):
        load_checkpoint(summary["model"], "opqn")
    if method == "itq":  # not gradient-trained: the whitening is the PCA start of what the codes were fitted on
        assert np.allclose(np.linalg.norm(enc.codec.whiten(x), axis=1), 1.0, atol=1e-5)


def test_itq_bits_are_checked_against_the_whitened_length(dlib_like, tmp_path):
    with pytest.raises(ConfigError, match="whitened length 16"):
        train_whitened(dlib_like, tmp_path, "itq", whitening=16)


@pytest.mark.parametrize("flags, message", [
    (["--trunk", "dlib", "--whitening", "0"], "--whitening takes the whitened length D >= 1, got 0"),
    (["--trunk", "dlib", "--whitening", "129"], "--whitening takes 1..128 dims"),
    (["--trunk", "resnet20", "--whitening", "16"], "frozen trunk's embedding"),
])
def test_the_cli_refuses_a_bad_whitening_in_one_line(tmp_path, capsys, flags, message):
    from facepq.cli import main as facepq_main

    code = facepq_main(["train", "--out", str(tmp_path / "m"), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob("*"))
