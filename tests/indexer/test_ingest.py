"""The Ray ingest job end to end: real checkpoint, real local Ray, real `facepq ingest` processes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facepq.cli import main as facepq_main
from facepq_core.errors import IndexFormatError
from indexer.encode_actor import EncoderActor, read_and_align
from indexer.info import index_info
from indexer.job import run_ingest
from indexer.segment import open_segment
from indexer.store import IndexStore
from tests.support.index import codes_by_source, live_row_ids

# Every test but the first starts Ray (ray_local) or `facepq ingest` processes, so is marked slow; the first
# runs the encoder's stages on a plain batch without Ray (STYLE.md) and stays in the fast lane.


def _encoder(model):
    from opqn_model.api import FaceEncoder

    return FaceEncoder.load(model)


def test_read_and_encode_stages_on_plain_batches(trained_model, synthetic_gallery, tmp_path):
    photos = sorted(str(p) for p in (synthetic_gallery / "synth_00001").glob("*.png"))[:3]
    junk = tmp_path / "junk.jpg"
    junk.write_text("not a photo")
    enc = _encoder(trained_model)
    batch = {"path": np.array(photos + [str(junk)], dtype=object), "person": np.array(["p"] * 4, dtype=object)}
    aligned = read_and_align(batch, enc.pipeline.to_dict())
    assert list(aligned["skip"]) == ["", "", "", "not_an_image"]
    assert aligned["crop"].shape == (4, 32, 32, 3) and len(set(aligned["face_id"][:3])) == 3
    out = EncoderActor(str(trained_model))(aligned)
    assert "crop" not in out and out["code"].shape == (4, enc.codec.spec.code_bytes)
    expected = enc.codec.encode(enc.trunk_features(aligned["crop"][:3]))
    np.testing.assert_array_equal(out["code"][:3], expected)
    assert not out["code"][3].any()


@pytest.mark.slow
def test_ingest_photos_twice_gives_the_same_faces(ray_local, trained_model, synthetic_gallery, tmp_path):
    gallery = tmp_path / "gallery"
    shutil.copytree(synthetic_gallery, gallery)
    (gallery / "synth_00000" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    index = tmp_path / "idx"
    first = run_ingest(str(trained_model), str(gallery), str(index), batch_size=16, actors=2, progress=False)
    assert (first.version, first.previous_version, first.faces_encoded, first.faces_added) == (1, None, 72, 72)
    assert first.actors == 2  # 73 photos: work for both
    assert sum(first.skipped.values()) == 1
    text = "\n".join(first.summary_lines())
    assert "photos skipped: 1" in text and "broken.png" in text  # the reason, with the photo as an example
    info = index_info(index, verify=True)
    assert (info["faces"], info["people"], info["shard_count"]) == (72, 12, 4)

    again = run_ingest(str(trained_model), str(gallery), str(index), batch_size=16, actors=1, progress=False)
    assert (again.version, again.faces_added, again.duplicates_skipped) == (1, 0, 72)
    assert index_info(index)["faces"] == 72
    # The stored codes are the model's codes for those photos.
    enc = _encoder(trained_model)
    photo = sorted((gallery / "synth_00004").glob("*.png"))[2]
    from opqn_model.images import load_image

    expected = enc.codec.encode(enc.trunk_features(enc.pipeline(load_image(photo))[None]))[0].tobytes()
    assert codes_by_source(index)[str(photo)] == expected


@pytest.mark.slow
def test_ingest_of_embedding_files(ray_local, trained_model, tmp_path):
    enc = _encoder(trained_model)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, enc.embedding_dim)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    (tmp_path / "emb.csv").write_text("person\n" + "\n".join(f"p{i % 7}" for i in range(300)) + "\n")
    index = tmp_path / "idx"
    # 300 rows are one chunk of work: one encoder actor, however many were asked for
    s = run_ingest(str(trained_model), str(tmp_path / "emb.npy"), str(index), shards=3, actors=2, progress=False)
    assert (s.faces_added, s.version, s.actors) == (300, 1, 1)
    assert "(1 actor, model load" in s.timing_line()
    codes = codes_by_source(index)
    expected = enc.codec.encode(emb)
    assert all(codes[f"emb.npy#{i}"] == expected[i].tobytes() for i in range(300))
    assert index_info(index)["people"] == 7 and IndexStore(index).load_manifest().shard_count == 3

    table = pa.table({"embedding": pa.array(list(emb[:100])), "person": ["q"] * 100,
                      "source": [f"cam/{i}" for i in range(100)]})
    pq.write_table(table, tmp_path / "more.parquet", row_group_size=40)
    s = run_ingest(str(trained_model), str(tmp_path / "more.parquet"), str(index), progress=False)
    assert (s.faces_added, s.version) == (100, 2)  # same vectors, other sources: other faces
    assert codes_by_source(index)["cam/7"] == expected[7].tobytes()
    s = run_ingest(str(trained_model), str(tmp_path / "more.parquet"), str(index), progress=False)
    assert (s.faces_added, s.duplicates_skipped, s.version) == (0, 100, 2)


@pytest.mark.slow
def test_ingest_with_another_model_is_refused_naming_both(ray_local, trained_model, other_model,
                                                          synthetic_gallery, tmp_path):
    index = tmp_path / "idx"
    (tmp_path / "e.npy").write_bytes(b"")
    emb = np.zeros((3, _encoder(trained_model).embedding_dim), np.float32)
    np.save(tmp_path / "e.npy", emb)
    (tmp_path / "e.csv").write_text("person\na\nb\nc\n")
    run_ingest(str(trained_model), str(tmp_path / "e.npy"), str(index), progress=False)
    fp_a, fp_b = _encoder(trained_model).fingerprint, _encoder(other_model).fingerprint
    with pytest.raises(IndexFormatError, match=f"{fp_a}.*{fp_b}"):
        run_ingest(str(other_model), str(synthetic_gallery), str(index), progress=False)
    assert IndexStore(index).current_version() == 1


@pytest.mark.slow
def test_errors_inside_ray_workers_come_back_as_one_clear_error(ray_local, trained_model, tmp_path):
    from facepq_core.errors import ConfigError, DataError

    emb = np.ones((6, _encoder(trained_model).embedding_dim), np.float32)
    emb[3, 1] = np.nan  # the head refuses it inside the encoder actor
    np.save(tmp_path / "nan.npy", emb)
    (tmp_path / "nan.csv").write_text("person\n" + "a\n" * 6)
    with pytest.raises(ConfigError, match="in a Ray worker: embeddings contain NaN"):
        run_ingest(str(trained_model), str(tmp_path / "nan.npy"), str(tmp_path / "idx"), progress=False)
    assert not IndexStore(tmp_path / "idx").exists()
    np.save(tmp_path / "short.npy", emb[:, :10])
    (tmp_path / "short.csv").write_text("person\n" + "a\n" * 6)
    with pytest.raises(DataError, match="10-d embeddings"):  # caught before any Ray work
        run_ingest(str(trained_model), str(tmp_path / "short.npy"), str(tmp_path / "idx"), progress=False)


def _ingest_cmd(model, gallery, index, address, *extra):
    return [sys.executable, "-m", "facepq.cli", "ingest", "--model", str(model), "--gallery", str(gallery),
            "--index", str(index), "--ray-address", address, "--no-progress", *extra]


def _env():
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")


@pytest.mark.slow
def test_sigkill_mid_ingest_keeps_the_previous_version_and_rerun_completes(
        ray_local, trained_model, synthetic_gallery, big_gallery, tmp_path):
    index = tmp_path / "idx"
    run_ingest(str(trained_model), str(synthetic_gallery), str(index), progress=False)
    cmd = _ingest_cmd(trained_model, big_gallery, index, ray_local, "--batch-size", "2", "--segment-rows", "4",
                      "--actors", "1")
    cmd.insert(cmd.index("ingest"), "-v")  # progress lines are INFO: shown with -v
    proc = subprocess.Popen(cmd,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=_env(), text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # the first progress line: encoding under way, segments being written
            lines.append(line)
            if "ingest progress" in line or time.monotonic() > deadline:
                break
        assert any("ingest progress" in line for line in lines), "".join(lines[-20:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    store = IndexStore(index)
    assert store.current_version() == 1
    assert index_info(index, verify=True)["faces"] == 72

    # read_cpus other than the actors' keeps reading in separate Ray tasks (the cluster layout).
    done = run_ingest(str(trained_model), str(big_gallery), str(index), batch_size=32, progress=False, read_cpus=0.25)
    assert done.version == 2 and done.faces_added == 320
    ids = live_row_ids(index)
    assert len(ids) == len(np.unique(ids)) == 72 + 320


@pytest.mark.slow
def test_two_concurrent_ingest_processes_both_commit(ray_local, trained_model, synthetic_gallery, tmp_path):
    from opqn_model.synthetic import write_faces

    other = write_faces(tmp_path / "other", 5, 4, size=40, seed=11)
    index = tmp_path / "idx"
    # One joins Ray through --ray-address, the other through $RAY_ADDRESS (as under `ray job submit`).
    cmd_a = _ingest_cmd(trained_model, synthetic_gallery, index, ray_local, "--batch-size", "8")
    cmd_b = _ingest_cmd(trained_model, other, index, ray_local, "--batch-size", "8")
    cmd_b = cmd_b[:cmd_b.index("--ray-address")] + cmd_b[cmd_b.index("--ray-address") + 2:]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for cmd, env in ((cmd_a, _env()), (cmd_b, dict(_env(), RAY_ADDRESS=ray_local)))]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240))
        finally:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    for out, err in outs:  # quiet by default: the summary, no log lines of Ray's (or ours) and no rate of noise
        assert "faces added:" in out and "  time: Ray " in out
        assert not [line for line in err.splitlines() if line.strip()], err[-2000:]
    store = IndexStore(index)
    assert store.current_version() == 2
    messages = {store.load_manifest(v).message for v in (1, 2)}
    assert any(str(synthetic_gallery) in m for m in messages) and any(str(other) in m for m in messages)
    ids = live_row_ids(index)
    assert len(ids) == len(np.unique(ids)) == 72 + 20


@pytest.mark.slow
def test_cli_info_delete_compact(ray_local, trained_model, synthetic_gallery, tmp_path, capsys):
    index = tmp_path / "idx"
    run_ingest(str(trained_model), str(synthetic_gallery), str(index), progress=False)
    capsys.readouterr()
    assert facepq_main(["index", "info", "--index", str(index), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert (info["faces"], info["people"], info["version"]) == (72, 12, 1)
    assert facepq_main(["delete", "--index", str(index), "--person", "synth_00002"]) == 0
    assert "deleted 6 faces" in capsys.readouterr().out
    assert facepq_main(["compact", "--index", str(index), "--grace", "0"]) == 0
    assert "removed 6 deleted rows" in capsys.readouterr().out
    assert facepq_main(["delete", "--index", str(index), "--person", "synth_00002"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facepq delete: error: no live faces") and "\n" not in err
    assert facepq_main(["index", "info", "--index", str(tmp_path / "none")]) == 2
    assert "no facepq index" in capsys.readouterr().err


@pytest.mark.slow
def test_ingest_of_att_faces(ray_local, trained_model, att_faces, tmp_path):
    s = run_ingest(str(trained_model), str(att_faces), str(tmp_path / "idx"), batch_size=50, progress=False)
    assert s.faces_added == 400 and sum(s.skipped.values()) == 0
    assert s.converted  # grey PGM photos are converted, and counted
    info = index_info(tmp_path / "idx")
    assert (info["faces"], info["people"]) == (400, 40)


def test_the_summary_gives_a_rate_only_over_a_window_long_enough_for_one():
    from indexer.job import IngestSummary

    # a small gallery: every batch arrives in one burst right after start-up (was "5196 faces/s")
    burst = IngestSummary("idx", 1, None, inputs=144, faces_encoded=144, seconds=46.9, ray_seconds=18.2,
                          startup_seconds=16.2, steady_seconds=0.01, steady_rate=5196.0)
    line = burst.timing_line()
    assert "5196" not in line and "too short for a rate" in line
    assert "Ray 18.2 s" in line and "start-up 16.2 s" in line and "commit 12.5 s" in line  # 46.9 - 18.2 - 16.2 - 0.0
    steady = IngestSummary("idx", 1, None, inputs=5000, faces_encoded=5000, seconds=60.0, ray_seconds=10.0,
                           startup_seconds=15.0, steady_seconds=30.0, steady_rate=160.4)
    assert "then 30.0 s at 160 inputs/s" in steady.timing_line()
    assert steady.summary_lines()[0] == "ingest into idx: 5000 inputs in 60.0 s"


def test_the_encode_stage_makes_refinement_rows_beside_the_codes(trained_model, synthetic_gallery):
    photos = sorted(str(p) for p in (synthetic_gallery / "synth_00002").glob("*.png"))[:3]
    enc = _encoder(trained_model)
    batch = {"path": np.array(photos + ["/nonexistent.png"], dtype=object), "person": np.array(["p"] * 4, dtype=object)}
    aligned = read_and_align(batch, enc.pipeline.to_dict())
    out = EncoderActor(str(trained_model), refine="codes:256")(aligned)
    feats = enc.trunk_features(aligned["crop"][:3])
    np.testing.assert_array_equal(out["refine"][:3], enc.refine_codec("codes:256").encode(feats))
    np.testing.assert_array_equal(out["code"][:3], enc.codec.encode(feats))
    assert out["refine"].shape == (4, 32) and not out["refine"][3].any()


@pytest.mark.slow
def test_ingest_with_a_refinement_tier_keeps_it_for_later_ingests(ray_local, trained_model, tmp_path):
    """--refine codes:256 on a new index: every face's row is the model's refinement code of its embedding; a
    later ingest without --refine writes the index's tier, one asking for another tier is refused."""
    enc = _encoder(trained_model)
    emb = np.random.default_rng(4).normal(size=(120, enc.embedding_dim)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    (tmp_path / "emb.csv").write_text("person\n" + "\n".join(f"p{i % 5}" for i in range(120)) + "\n")
    index = tmp_path / "idx"
    s = run_ingest(str(trained_model), str(tmp_path / "emb.npy"), str(index), shards=2, progress=False,
                   refine="codes:256")
    assert (s.faces_added, s.refine) == (120, "codes:256")
    assert "  refinement tier: codes:256 (stored beside the codes)" in s.summary_lines()
    expected = enc.refine_codec("codes:256").encode(emb)
    rows = codes_by_source(index, "refine")
    assert all(rows[f"emb.npy#{i}"] == expected[i].tobytes() for i in range(120))
    assert index_info(index)["tiers"][1]["bytes_per_face"] == 32
    np.save(tmp_path / "more.npy", emb[:10] * 2)
    (tmp_path / "more.csv").write_text("person\n" + "\n".join("q" for _ in range(10)) + "\n")
    s = run_ingest(str(trained_model), str(tmp_path / "more.npy"), str(index), progress=False)
    assert (s.faces_added, s.refine) == (10, "codes:256")
    assert codes_by_source(index, "refine")["more.npy#3"] == enc.refine_codec("codes:256").encode(emb[3:4] * 2)[0].tobytes()
    with pytest.raises(IndexFormatError, match="stores refinement tier codes:256 beside its codes, this writer "
                                               "float16"):
        run_ingest(str(trained_model), str(tmp_path / "more.npy"), str(index), progress=False, refine="float16")
    from facepq_core.errors import ConfigError

    with pytest.raises(ConfigError, match="no refinement tier codes:64; it offers codes:256, float16"):
        run_ingest(str(trained_model), str(tmp_path / "more.npy"), str(tmp_path / "new"), progress=False,
                   refine="codes:64")


@pytest.mark.slow
def test_ingest_with_cells_partitions_the_new_index_and_keeps_it(ray_local, trained_model, tmp_path):
    """--cells on a new index: a partition fitted in the model codec's codeword space, bound to the model, every
    segment grouped by cell; a later ingest without --cells lands its faces in their cells; another count is refused."""
    from facepq_core.errors import ConfigError
    from indexer.partition_store import load_partition
    from indexer.segment import open_segment
    from indexer.store import IndexStore

    enc = _encoder(trained_model)
    emb = np.random.default_rng(5).normal(size=(200, enc.embedding_dim)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    (tmp_path / "emb.csv").write_text("person\n" + "\n".join(f"p{i % 5}" for i in range(200)) + "\n")
    index = tmp_path / "idx"
    s = run_ingest(str(trained_model), str(tmp_path / "emb.npy"), str(index), shards=2, progress=False, cells=4)
    assert (s.faces_added, s.cells) == (200, 4)
    assert "  cell partition: 4 cells (searches may scan a few: --nprobe)" in s.summary_lines()
    np.save(tmp_path / "more.npy", emb[:20] * 2)
    (tmp_path / "more.csv").write_text("person\n" + "\n".join("q" for _ in range(20)) + "\n")
    assert run_ingest(str(trained_model), str(tmp_path / "more.npy"), str(index), progress=False).cells == 4
    store = IndexStore(str(index))
    manifest = store.load_manifest()
    partition = load_partition(store, manifest.model)
    from facepq_core.partition import MAX_CODEWORD_DIMS

    full = enc.codec.codewords().shape  # [M, K, d]; the partition keeps at most MAX_CODEWORD_DIMS directions of d
    assert partition.fingerprint == enc.fingerprint
    assert partition.codewords.shape == (*full[:2], min(full[2], MAX_CODEWORD_DIMS))
    rows = 0
    for ref in manifest.segments:
        seg = open_segment(store, ref, model=manifest.model)
        cells = partition.assign(seg.codes)
        assert (np.diff(cells) >= 0).all() and seg.cell_offsets[-1] == seg.rows
        rows += seg.rows
    assert rows == 220
    with pytest.raises(ConfigError, match="exists with 4 cells"):
        run_ingest(str(trained_model), str(tmp_path / "more.npy"), str(index), progress=False, cells=8)


@pytest.mark.slow
def test_an_encoder_pool_the_cluster_cannot_place_fails_clearly_instead_of_waiting(ray_local, trained_model,
                                                                                    synthetic_gallery, tmp_path):
    """Last in this module on purpose: Ray Data keeps the half-started pool's actors, and their CPUs, for about
    30 s after the failure (Ray 2.60: its operator still holds them; the exception dropped and gc.collect() do not
    release them), and an ingest on this module's Ray started meanwhile ran at half speed (58 s against 28 s)."""
    from facepq_core.errors import ConfigError

    actors = 2 * os.cpu_count() + 1  # the local Ray holds 2 actors of 0.5 CPU per CPU: one never starts
    with pytest.raises(ConfigError, match=f"{actors} encoder actors .* did not all start within 3 s"):
        run_ingest(str(trained_model), str(synthetic_gallery), str(tmp_path / "idx"), actors=actors,
                   actor_start_timeout=3, progress=False)
    assert not IndexStore(tmp_path / "idx").exists()
