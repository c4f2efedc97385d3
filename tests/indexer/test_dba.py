"""Database-side augmentation (indexer.dba): the exact kNN and the weighted average, and the Ray job's
`--dba-k/--dba-alpha`: codes of the augmented embeddings, the manifest's record, and its staleness."""
from __future__ import annotations

import numpy as np
import pytest

from facepq_core.errors import ConfigError
from indexer.dba import DBA, MAX_DBA_K, augment, check_dba, nearest_neighbours


def test_nearest_neighbours_are_the_exact_cosine_top_k_without_the_face_itself():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype(np.float32)
    idx, sims = nearest_neighbours(x, 5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = unit @ unit.T
    for i in range(70):
        others = [j for j in np.argsort(-full[i], kind="stable") if j != i][:5]
        assert idx[i].tolist() == others
        np.testing.assert_allclose(sims[i], full[i, others], rtol=1e-5, atol=1e-6)
    assert nearest_neighbours(x[:3], 10)[0].shape == (3, 2)  # at most N - 1 neighbours
    assert nearest_neighbours(x[:1], 4)[0].shape == (1, 0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_augment_is_the_cosine_weighted_average_of_the_face_and_its_neighbours(alpha):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    got = augment(x, DBA(3, alpha))
    idx, sims = nearest_neighbours(x, 3)
    for i in range(40):
        w = np.clip(sims[i], 0, None).astype(np.float64) ** alpha
        want = (x[i] + (w[:, None] * x[idx[i]]).sum(0)) / (1 + w.sum())
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_a_persons_photos_pull_together():
    """Ten people, eight noisy photos each: after DBA each photo is closer to its person's mean direction."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, 32))
    x = (np.repeat(centres, 8, axis=0) + rng.normal(size=(80, 32)) * 1.2).astype(np.float32)
    person = np.repeat(np.arange(10), 8)

    def spread(v):
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        means = np.stack([unit[person == p].mean(0) for p in range(10)])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        return float((unit * means[person]).sum(1).mean())

    assert spread(augment(x, DBA(5, 3.0))) > spread(x) + 0.05


@pytest.mark.parametrize("k, alpha", [(0, 3.0), (-1, 3.0), (MAX_DBA_K + 1, 3.0), (2.5, 3.0), (3, -1.0),
                                      (3, float("nan")), (3, "x")])
def test_bad_dba_options_are_config_errors(k, alpha):
    with pytest.raises(ConfigError, match="DBA"):
        check_dba(k, alpha)


def _codes(store) -> dict:
    """source -> stored code bytes of every row of the current version."""
    from indexer.segment import open_segment

    out = {}
    for ref in store.load_manifest().segments:
        view = open_segment(store, ref)
        for i in range(view.rows):
            out[view.source_at(i)] = view.codes[i].tobytes()
    return out


def test_bad_dba_flags_fail_the_command_in_one_line(trained_model, tmp_path, capsys):
    from facepq.cli import main as facepq_main

    np.save(tmp_path / "e.npy", np.zeros((3, 4), np.float32))
    code = facepq_main(["ingest", "--model", str(trained_model), "--gallery", str(tmp_path / "e.npy"), "--index",
                        str(tmp_path / "idx"), "--dba-k", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "DBA k must be an integer in 1..100" in err and "Traceback" not in err
    assert not (tmp_path / "idx" / "CURRENT").exists()


@pytest.mark.slow
def test_ingest_with_dba_encodes_augmented_embeddings_records_it_and_goes_stale(ray_local, trained_model, tmp_path,
                                                                                  capsys):
    from facepq.cli import main as facepq_main
    from indexer.commit import delete_faces
    from indexer.job import run_ingest
    from indexer.store import IndexStore
    from indexer.writer import IndexWriter
    from opqn_model.api import FaceEncoder

    enc = FaceEncoder.load(trained_model)
    rng = np.random.default_rng(0)
    emb = (np.repeat(rng.normal(size=(20, enc.embedding_dim)), 6, axis=0)
           + rng.normal(size=(120, enc.embedding_dim)) * 0.5).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    (tmp_path / "emb.csv").write_text("person\n" + "\n".join(f"p{i // 6}" for i in range(120)) + "\n")
    index = tmp_path / "idx"
    s = run_ingest(str(trained_model), str(tmp_path / "emb.npy"), str(index), shards=2, progress=False,
                   dba=(4, 2.0))
    assert (s.faces_added, s.version) == (120, 1) and s.dba == "k=4 alpha=2 over 120 faces"
    assert any("database-side augmentation: k=4 alpha=2 over 120 faces" in line for line in s.summary_lines())
    store = IndexStore(str(index))
    expected = enc.codec.encode(augment(emb, DBA(4, 2.0)))
    plain = enc.codec.encode(emb)
    codes = _codes(store)
    assert all(codes[f"emb.npy#{i}"] == expected[i].tobytes() for i in range(120))
    assert any(expected[i].tobytes() != plain[i].tobytes() for i in range(120))  # the augmentation changed codes
    assert store.load_manifest().augmentation == {"kind": "dba", "k": 4, "alpha": 2.0, "faces": 120, "stale": False}
    assert facepq_main(["index", "info", "--index", str(index)]) == 0
    assert "database-side augmentation: k=4 alpha=2.0 over 120 faces (current)" in capsys.readouterr().out

    # a second DBA ingest into it is refused (the indexed faces' neighbours cannot be recomputed from codes)
    with pytest.raises(ConfigError, match="new index"):
        run_ingest(str(trained_model), str(tmp_path / "emb.npy"), str(index), progress=False, dba=(4, 2.0))
    # an enrolment (a writer adding faces without augmentation) marks it stale; so does a delete
    writer = IndexWriter(str(index), store.load_manifest().model)
    writer.add(np.array([7], np.uint64), ["new"], ["enrolled"], enc.codec.encode(emb[:1]))
    writer.commit("enrol")
    assert store.load_manifest().augmentation["stale"] is True
    assert facepq_main(["index", "info", "--index", str(index)]) == 0
    assert "(STALE: faces were enrolled or deleted since" in capsys.readouterr().out

    fresh = tmp_path / "fresh"  # the command's flags: the same codes
    assert facepq_main(["ingest", "--model", str(trained_model), "--gallery", str(tmp_path / "emb.npy"),
                        "--index", str(fresh), "--shards", "2", "--no-progress", "--dba-k", "4",
                        "--dba-alpha", "2"]) == 0
    assert "database-side augmentation: k=4 alpha=2 over 120 faces" in capsys.readouterr().out
    assert _codes(IndexStore(str(fresh))) == codes
    delete_faces(IndexStore(str(fresh)), person="p3")
    assert IndexStore(str(fresh)).load_manifest().augmentation["stale"] is True


def test_the_encode_stage_returns_embeddings_for_a_dba_ingest(trained_model, synthetic_gallery, tmp_path):
    from indexer.encode_actor import EncoderActor, read_and_align
    from opqn_model.api import FaceEncoder

    enc = FaceEncoder.load(trained_model)
    photos = sorted(str(p) for p in (synthetic_gallery / "synth_00001").glob("*.png"))[:2]
    (tmp_path / "junk.jpg").write_text("not a photo")
    batch = {"path": np.array(photos + [str(tmp_path / "junk.jpg")], dtype=object),
             "person": np.array(["p"] * 3, dtype=object)}
    aligned = read_and_align(batch, enc.pipeline.to_dict())
    out = EncoderActor(str(trained_model), features=True)(aligned)
    assert "code" not in out and out["feature"].shape == (3, enc.embedding_dim)
    np.testing.assert_allclose(out["feature"][:2], enc.trunk_features(aligned["crop"][:2]), rtol=1e-5, atol=1e-6)
    assert not out["feature"][2].any()
