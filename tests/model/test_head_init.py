"""The data init of the OPQN head (head_init.py) and the query-weighted lookup tables, on generated identities."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facepq_core.codes import score_codes, unpack_codes
from facepq_core.errors import ConfigError, DataError
from opqn_model.config import ModelConfig, TrainConfig
from opqn_model.evaluate import cosine_scores
from opqn_model.head import OPQNHead
from opqn_model.head_init import init_head_from_features, kmeans
from opqn_model.metrics import mean_average_precision
from query_node import fastscan


def identities(people: int, photos: int, dim: int = 32, noise: float = 0.6, seed: int = 0):
    """Embeddings float32 [people*photos, dim] around one random centre per person, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, dim)) + 2.0  # off-centre, like real embeddings in a cone
    emb = np.repeat(centres, photos, 0) + noise * rng.standard_normal((people * photos, dim))
    return emb.astype(np.float32), np.repeat(np.arange(people), photos)


def code_map(head, queries, q_lab, gallery, g_lab):
    codec = head.export_codec()
    return mean_average_precision(score_codes(codec.query_tables(queries), codec.encode(gallery), codec.spec),
                                  q_lab, g_lab)


@pytest.fixture(scope="module")
def data():
    train, train_lab = identities(80, 10, seed=1)
    unseen, unseen_lab = identities(30, 6, seed=2)  # other people: the unseen protocol
    first = np.r_[True, unseen_lab[1:] != unseen_lab[:-1]]  # one query per person
    return train, unseen[first], unseen_lab[first], unseen[~first], unseen_lab[~first]


@pytest.fixture(scope="module")
def initialised(data):
    head = OPQNHead(in_dim=32, M=4, K=16, d=32)
    init_head_from_features(head, data[0], opq_iterations=5, seed=0)
    return head.eval()


def test_initialised_head_preserves_inner_products_of_centred_embeddings(data, initialised):
    """BN layers are identities and the rotation orthonormal: sum_m x_m . y_m == (f - mean) . (g - mean)."""
    train = data[0]
    f = torch.from_numpy(train[:50])
    with torch.no_grad():
        x = initialised.project(f)
    centred = f - torch.from_numpy(train.mean(0))
    torch.testing.assert_close(torch.einsum("nmd,kmd->nk", x, x), centred @ centred.T, atol=1e-3, rtol=1e-3)
    assert x[:, :, 8:].abs().max() < 1e-4  # 32 dims in 4 chunks of 8 fill the first 8 of each d = 32


def test_initialised_codes_use_every_codeword_and_pick_the_nearest_centroid(data, initialised):
    with torch.no_grad():
        x = F.normalize(initialised.project(torch.from_numpy(data[0])), dim=-1)
    codec = initialised.export_codec()
    codes = torch.from_numpy(unpack_codes(codec.encode(data[0]), codec.spec)).long()
    for m in range(4):
        assert len(torch.unique(codes[:, m])) == 16
        cosines = x[:, m] @ F.normalize(initialised.assignment[m], dim=0)
        torch.testing.assert_close(codes[:, m], cosines.argmax(1))


def test_data_init_quantizes_unseen_people_far_better_than_the_random_init(data, initialised):
    _, q, q_lab, g, g_lab = data
    float_map = mean_average_precision(cosine_scores(q, g), q_lab, g_lab)
    torch.manual_seed(0)
    random_map = code_map(OPQNHead(in_dim=32, M=4, K=16, d=32).eval(), q, q_lab, g, g_lab)
    init_map = code_map(initialised, q, q_lab, g, g_lab)
    assert float_map > 0.9
    assert init_map > 0.75 * float_map  # measured 0.84 vs float 1.00, random init 0.47
    assert init_map > random_map + 0.2


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0], [-5, 0], [0, 5]])
    x = torch.from_numpy((np.repeat(centres, 40, 0) + 0.1 * rng.standard_normal((120, 2))).astype(np.float32))
    found = kmeans(x, 3, iters=20, seed=0).numpy()
    np.testing.assert_allclose(np.sort(found, axis=0), np.sort(centres, axis=0), atol=0.1)


def test_a_small_gallery_fits_as_many_codewords_as_photos_and_repeats_them():
    """Fewer training photos than K: min(N, K) codewords are fitted, the others repeat them, and codes keep
    identity (the ORL-sized case of `facepq train --trunk dlib` on 40 people)."""
    train, labels = identities(6, 2, seed=3)  # 12 photos, K = 16
    head = OPQNHead(in_dim=32, M=4, K=16, d=32)
    init_head_from_features(head, train, opq_iterations=3, seed=0)
    head.eval()
    A = head.assignment
    torch.testing.assert_close(A[:, :, 12:], A[:, :, :4])  # codeword 12 + j repeats codeword j
    codec = head.export_codec()
    codes = unpack_codes(codec.encode(train), codec.spec)
    assert codes.max() < 12  # a repeat never wins the argmax over its original
    first = np.r_[True, labels[1:] != labels[:-1]]
    assert code_map(head, train[first], labels[first], train[~first], labels[~first]) > 0.9
    with pytest.raises(DataError, match="at least 2 training photos"):
        init_head_from_features(head, train[:1])


def test_lookup_tables_are_log_probabilities_weighted_by_the_query_sub_vector_length(initialised):
    q = torch.randn(6, 32) + 2.0
    with torch.no_grad():
        x = initialised.project(q)
        probabilities = initialised(q)["p"]
    lengths = x.norm(dim=-1)
    weights = lengths / lengths.mean(1, keepdim=True)
    expected = torch.log(probabilities) * weights[..., None]
    np.testing.assert_allclose(initialised.export_codec().query_tables(q.numpy()), expected.numpy(), atol=1e-4,
                               rtol=1e-4)
    assert weights.std() > 0.01  # the chunks of the data-initialised head do differ in length


def test_weighted_scores_rank_like_the_inner_product_of_the_raw_query_with_the_codewords(data, initialised):
    """sum_m w_m log P[m, c_m] = a * sum_m x_m . A_m[:, c_m] + b, a > 0: the same ranking."""
    q, g = torch.from_numpy(data[1][:5]), torch.from_numpy(data[3])
    codec = initialised.export_codec()
    codes = torch.from_numpy(unpack_codes(codec.encode(g.numpy()), codec.spec)).long()
    luts = torch.from_numpy(codec.query_tables(q.numpy()))
    with torch.no_grad():
        x = initialised.project(q)
    A = initialised.assignment
    raw = torch.stack([x[:, m] @ A[m][:, codes[:, m]] for m in range(4)]).sum(0)  # [Q, G]
    table = torch.stack([luts[:, m, codes[:, m]] for m in range(4)]).sum(0)
    scale = initialised.logit_scale / x.norm(dim=-1).mean(1, keepdim=True)
    offset = table - scale * raw
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset), atol=1e-3, rtol=1e-4)


def test_unknown_head_init_is_a_config_error():
    with pytest.raises(ConfigError, match="head_init"):
        TrainConfig(head_init="pca")
    assert ModelConfig(trunk="dlib").code_spec().K == 256  # the init works with every valid code spec


class PixelProjection:
    """A real frozen trunk for tests: a fixed random projection of the 8x8 grey thumbnail of a crop."""

    trainable = False

    def __init__(self, input_size: int = 32):
        self.name, self.input_size, self.feature_dim = "pixel_projection", input_size, 24
        self.cache_key = "trunk:pixel_projection:v1"
        self.matrix = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)

    def features(self, crops: np.ndarray) -> np.ndarray:
        grey = np.asarray(crops, np.float32).mean(-1) / 255.0
        n, s = grey.shape[:2]
        thumb = grey.reshape(n, 8, s // 8, 8, s // 8).mean((2, 4)).reshape(n, 64)
        return (thumb - thumb.mean(1, keepdims=True)) @ self.matrix


@pytest.mark.parametrize("head_init, epochs", [("data", 2), ("data", 0), ("random", 2)])
def test_training_a_frozen_trunk_starts_from_the_data_init_and_validates_it_as_epoch_0(tmp_path, monkeypatch,
                                                                                     head_init, epochs):
    """epochs=0 keeps the init for sure, so the refit with the validation people always runs there."""
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.synthetic import write_faces
    from opqn_model.train import train
    from opqn_model.trunks import register_trunk

    @register_trunk
    def pixel_projection(input_size=32, **_):
        return PixelProjection(input_size)

    monkeypatch.setenv("FACEPQ_CACHE", str(tmp_path / "cache"))  # never the user's feature cache
    data = write_faces(tmp_path / "faces", 30, 6, size=64, seed=3)
    cfg = ModelConfig(trunk="pixel_projection", bits=16, K=16, input_size=32,
                      pipeline=FacePipeline(size=32, mode="none").to_dict())
    summary = train(data, tmp_path / "run", cfg,
                    TrainConfig(epochs=epochs, batch_size=32, seed=0, head_init=head_init, opq_iterations=3),
                    progress=False)
    trained = [h["epoch"] for h in summary["history"]]
    model = load_checkpoint(tmp_path / "run" / "model.pt")
    head = model["head"]
    if head_init == "data":
        assert trained == list(range(epochs + 1)) and np.isfinite(summary["history"][0]["val_map"])
        assert summary["best_val_map"] >= summary["history"][0]["val_map"]
        assert summary["refit_with_val_people"] == (model["epoch"] == 0) == model["refit_with_val_people"]
        assert model["epoch"] == 0 or epochs > 0
        if model["epoch"] == 0:  # the init won: refitted with the validation people, chunk layout intact
            assert head["projection.2.weight"].view(4, 32, 24)[:, 6:].abs().max() == 0
            best = load_checkpoint(tmp_path / "run" / "best.pt")["head"]
            assert not torch.equal(head["assignment"], best["assignment"])
    else:
        assert trained == [1, 2] and not summary["refit_with_val_people"]


def test_zero_epochs_without_the_data_init_is_refused(tmp_path):
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.synthetic import write_faces
    from opqn_model.train import train

    data = write_faces(tmp_path / "faces", 8, 3, size=64, seed=3)
    cfg = ModelConfig(trunk="resnet20", bits=16, K=16, input_size=32, trunk_width=8,
                      pipeline=FacePipeline(size=32, mode="none").to_dict())
    with pytest.raises(ConfigError, match="epochs=0 trains nothing"):
        train(data, tmp_path / "run", cfg, TrainConfig(epochs=0), progress=False)


def test_unlabelled_photos_join_the_fit_of_a_frozen_trunks_codes(tmp_path, monkeypatch):
    """The same training photos with and without unlabelled ones: other codewords and refinement codes (the
    fit saw more faces); a trainable trunk refuses them."""
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.synthetic import write_faces
    from opqn_model.train import train
    from opqn_model.trunks import register_trunk

    @register_trunk
    def pixel_projection(input_size=32, **_):
        return PixelProjection(input_size)

    monkeypatch.setenv("FACEPQ_CACHE", str(tmp_path / "cache"))
    data = write_faces(tmp_path / "faces", 20, 5, size=64, seed=3)
    extra = write_faces(tmp_path / "gallery", 10, 5, size=64, seed=4)
    cfg = ModelConfig(trunk="pixel_projection", bits=16, K=16, input_size=32,
                      pipeline=FacePipeline(size=32, mode="none").to_dict())
    tc = TrainConfig(epochs=0, seed=0, opq_iterations=3, refine_bits=48)  # 48 bits: 6 chunks of the 24-d embedding
    plain = train(data, tmp_path / "plain", cfg, tc, progress=False)
    more = train(data, tmp_path / "more", cfg, tc, progress=False, unlabelled=str(extra))
    assert (plain["unlabelled_photos"], more["unlabelled_photos"]) == (0, 50)
    a, b = load_checkpoint(plain["model"]), load_checkpoint(more["model"])
    assert not torch.equal(a["head"]["assignment"], b["head"]["assignment"])
    assert set(a["refine_codecs"]) == set(b["refine_codecs"]) == {"codes:48"}
    assert not torch.equal(a["refine_codecs"]["codes:48"]["centroids"], b["refine_codecs"]["codes:48"]["centroids"])
    resnet = ModelConfig(trunk="resnet20", bits=16, K=16, input_size=32, trunk_width=8,
                         pipeline=FacePipeline(size=32, mode="none").to_dict())
    with pytest.raises(ConfigError, match="unlabelled photos only help fit a frozen trunk's codes"):
        train(data, tmp_path / "r", resnet, TrainConfig(epochs=1), progress=False, unlabelled=str(extra))


@pytest.mark.skipif(not fastscan.available(),
                    reason=f"the bound tables are the native extension's: {fastscan.status()}")
def test_a_fitted_256_codeword_head_is_numbered_in_nibble_order_for_the_8bit_scan(data):
    """With the codewords in nibble order (facepq_core.nibble_order) the AVX2 8-bit scan's bound leaves far
    fewer rows to re-score than with the same codewords numbered at random: measured, not assumed."""
    from query_node.fastscan import bound8_row_bounds, bound8_tables
    from query_node.scan import byte_tables

    train, queries = data[0], data[1]
    head = OPQNHead(in_dim=32, M=4, K=256, d=256)
    init_head_from_features(head, train, opq_iterations=2, seed=0)
    codec = head.eval().export_codec()
    rng = np.random.default_rng(3)
    gallery = np.repeat(train, 25, 0) + 0.3 * rng.standard_normal((25 * len(train), 32)).astype(np.float32)
    codes, luts = codec.encode(gallery), codec.query_tables(queries)
    kept = {}
    for numbering in ("model", "random"):
        if numbering == "random":   # the same quantizer, its codewords renumbered per subspace
            perms = np.stack([rng.permutation(256) for _ in range(4)])
            codes = np.take_along_axis(perms[None], codes.astype(np.intp)[:, :, None], 2)[:, :, 0].astype(np.uint8)
            luts = np.stack([np.take_along_axis(lut, np.argsort(perms, 1), 1) for lut in luts])
        byte = byte_tables(luts, False, 4)
        exact = np.stack([lut[np.arange(4), codes].sum(1) for lut in luts])
        kth = np.sort(exact, axis=1)[:, -100]
        kept[numbering] = (bound8_row_bounds(bound8_tables(byte), codes) >= kth[:, None]).mean()
    assert kept["model"] < 0.5 * kept["random"], kept
