"""Open-set answers with a calibrated model: `facepq calibrate` on people the model never saw, then "is this
person in the gallery?" through the coordinator service (real model, real index, nodes answering from real
LiveIndex views in-process)."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from facepq_core.calibration import Calibration
from facepq_core.codes import score_codes
from facepq_core.errors import CheckpointError
from indexer.writer import IndexWriter
from tests.support.processes import run_cli


def test_calibrate_measures_thresholds_on_unseen_people_and_the_encoder_picks_them_up(tiny_model, tmp_path):
    """The tiny model holds out test people: calibration uses only them, and its thresholds are the ones the
    definition gives on their code pairs (at most FAR of the impostor pairs score at or above, the next lower
    float32 lets more through)."""
    from opqn_model.api import FaceEncoder
    from opqn_model.calibrate import calibration_path, code_pair_scores
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.datasets import list_photos
    from opqn_model.training_data import embeddings_of, model_inputs

    import shutil

    model = tmp_path / "model.pt"  # a copy: the session's model stays uncalibrated for every other test
    shutil.copy(tiny_model.path, model)
    out = run_cli("calibrate", "--model", model, "--data", tiny_model.data, "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert calibration_path(model) == tmp_path / "model.calibration.json"
    cal = Calibration.load(calibration_path(model), FaceEncoder.load(model).fingerprint)
    assert cal.to_dict() == printed and cal.extra["left_out_training_people"] > 0
    split = load_checkpoint(model)["split"]
    trained = set(split["train_people"]) | set(split["val_people"])
    unseen = [r for r in list_photos(tiny_model.data) if r.person not in trained]
    assert cal.people == len({r.person for r in unseen}) >= 2
    enc = FaceEncoder.load(model)
    assert enc.calibration == cal and FaceEncoder.load(tiny_model.path).calibration is None
    inputs, kept, _ = model_inputs(unseen, enc.trunk, enc.pipeline, progress=False)
    genuine, impostor = code_pair_scores(enc.codec, embeddings_of(inputs, enc.trunk), [r.person for r in kept])
    assert (cal.genuine_pairs, cal.impostor_pairs) == (genuine.size, impostor.size)
    measurable = list(cal.operating_points)
    assert [p.far for p in measurable] == [f for f in (1e-2, 1e-3, 1e-4) if f * impostor.size >= 1]
    assert cal.extra.get("unmeasurable_fars", []) == [f for f in (1e-2, 1e-3, 1e-4) if f * impostor.size < 1]
    for p in measurable:
        t = np.float32(p.threshold)
        assert np.mean(impostor >= t) <= p.far < np.mean(impostor >= np.nextafter(t, np.float32(-np.inf)))
        assert p.tar == pytest.approx(np.mean(genuine >= t))
    sims = cal.similarity(np.sort(np.concatenate([genuine, impostor])))
    assert (np.diff(sims) >= 0).all() and 0 <= sims[0] and sims[-1] <= 1
    other = tmp_path / "other.pt"  # a calibration beside another model's checkpoint is refused, not used
    shutil.copy(tiny_model.path, other)
    (tmp_path / "other.calibration.json").write_text(json.dumps({**printed, "model_fingerprint": "0" * 16}))
    with pytest.raises(CheckpointError, match="measured for model 0000000000000000"):
        FaceEncoder.load(other)


def _side_by_side(left, right) -> bytes:
    """PNG bytes of two photos next to each other on a grey canvas."""
    import io

    from PIL import Image

    a, b = Image.open(left), Image.open(right)
    canvas = Image.new("L", (a.width + b.width + 40, max(a.height, b.height) + 20), color=128)
    canvas.paste(a, (10, 10))
    canvas.paste(b, (a.width + 30, 10))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def _link_people(root: pathlib.Path, source: pathlib.Path, people) -> pathlib.Path:
    root.mkdir()
    for person in people:
        os.symlink(source / person, root / person)
    return root


@pytest.mark.slow  # dlib detection and embedding of ~60 ORL photos at enrolment and search time
def test_a_stranger_is_unknown_and_an_enrolled_person_is_found_at_far_1e_3_on_orl(att_faces, tmp_path):
    """ORL: a dlib model fitted on 20 people, calibrated on 10 others, 5 of the last 10 enrolled (9 photos
    each); each enrolled person's held-out photo is found as them, each stranger's photo answers unknown."""
    from opqn_model.api import FaceEncoder
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.datasets import list_photos
    from opqn_model.train import train
    from query_node.coordinator import Coordinator
    from query_node.face_model import FaceModel
    from query_node.service import CoordinatorService, Photo, SearchOptions
    from tests.support.fake_nodes import FakeNodeClients, FakeRegistry, LiveNode, record

    records = list_photos(att_faces)
    people = sorted({r.person for r in records})
    assert len(people) == 40
    trained, calibration_people, gallery_people = people[:20], people[20:30], people[30:]
    summary = train(str(att_faces), tmp_path / "model", ModelConfig(trunk="dlib", bits=32, K=16),
                    TrainConfig(epochs=0, batch_size=256, lr=0.1, seed=0, test_people=0.0, queries_per_person=0),
                    records=[r for r in records if r.person in trained], progress=False)
    out = run_cli("calibrate", "--model", summary["model"], "--data",
                  _link_people(tmp_path / "calibration", att_faces, calibration_people), "--no-progress")
    assert out.returncode == 0 and "1e-03" in out.stdout, out.stderr
    encoder = FaceEncoder.load(summary["model"])
    assert encoder.calibration is not None and encoder.calibration.people == 10

    model = FaceModel(encoder)
    index = tmp_path / "index"
    w = IndexWriter(str(index), model.model_meta(), shard_count=2)
    w.add(np.array([1], np.uint64), ["nobody"], ["placeholder"], np.zeros((1, encoder.codec.spec.code_bytes), np.uint8))
    w.commit("an index to enrol into")
    nodes = FakeNodeClients(nodes={"a": LiveNode(index, [0]), "b": LiveNode(index, [1])})
    coord = Coordinator(FakeRegistry([record("a", [0]), record("b", [1])]), 2, node_clients=nodes)
    service = CoordinatorService(coord, model, str(index))
    service.delete(face_ids=[1])
    enrolled, strangers = gallery_people[:5], gallery_people[5:]
    try:
        for person in enrolled:
            photos = sorted((att_faces / person).glob("*.pgm"))
            service.enrol(person, [Photo(p.read_bytes(), str(p)) for p in photos if p.name != "1.pgm"])
        wrong = []
        for person in enrolled:
            photo = (att_faces / person / "1.pgm").read_bytes()
            found = service.search(photo, 5, SearchOptions(far=1e-3, group_by="person"))
            if found.unknown or found.people[0].person != person:
                wrong.append(f"enrolled {person}: unknown={found.unknown}, {[p.person for p in found.people]}")
            check = service.verify(photo, None, person_b=person)
            if not check.same or not 0.5 < check.similarity <= 1:
                wrong.append(f"verify {person}: {check}")
        for person in strangers:
            stranger = service.search((att_faces / person / "1.pgm").read_bytes(), 5, SearchOptions(far=1e-3))
            if not stranger.unknown or stranger.hits:
                wrong.append(f"stranger {person}: {[(h.person, h.score) for h in stranger.hits]}")
        assert not wrong, "\n".join(wrong)
        # a photo of two of them side by side: every face is searched, each answer says where its face is
        two = _side_by_side(att_faces / enrolled[0] / "1.pgm", att_faces / enrolled[1] / "1.pgm")
        both = service.search(two, 3, SearchOptions(far=1e-3, group_by="person", faces="all", min_face_px=20))
        by_left = sorted(both.faces, key=lambda f: f.box[0])
        assert [f.people[0].person for f in by_left] == enrolled[:2] and not any(f.unknown for f in both.faces)
        assert by_left[0].box[2] < by_left[1].box[0]  # two separate boxes, left to right
        assert service.search(two, 3).faces == []  # by default: the largest face only
        plain = service.search((att_faces / strangers[0] / "1.pgm").read_bytes(), 3)  # no operating point
        assert len(plain.hits) == 3 and not plain.unknown and plain.calibrated
        # the stranger was unknown at far 1e-3, so every hit scores below that threshold, and the similarity,
        # a monotone relabelling of scores, stays below the threshold's (0.5 would be a claim about the
        # calibration's prior that a stranger's best of 45 faces may cross)
        cal = encoder.calibration
        cut = float(cal.similarity(np.array([cal.threshold_for(1e-3)]))[0])
        assert all(0.0 <= h.similarity < cut for h in plain.hits), ([h.similarity for h in plain.hits], cut)
        scores = score_codes(model.tables_for((att_faces / enrolled[0] / "1.pgm").read_bytes())[0],
                             model.codes_for((att_faces / enrolled[0] / "2.pgm").read_bytes()), encoder.codec.spec)
        assert service.verify((att_faces / enrolled[0] / "1.pgm").read_bytes(),
                              (att_faces / enrolled[0] / "2.pgm").read_bytes()).score == pytest.approx(scores[0])
    finally:
        coord.close()
