"""Synthetic faces: deterministic, labelled, idempotent on disk, and identity learnable but not trivial."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from facepq_core.errors import DataError
from opqn_model.datasets import list_photos
from opqn_model.images import load_image
from opqn_model.synthetic import MARKER, generate_faces, identity_check, write_faces


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    a, labels_a = generate_faces(4, 3, size=64, seed=5)
    b, labels_b = generate_faces(4, 3, size=64, seed=5)
    c, _ = generate_faces(4, 3, size=64, seed=6)
    assert a.tobytes() == b.tobytes() and labels_a == labels_b
    assert a.dtype == np.uint8 and a.shape == (12, 64, 64, 3)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 10


def test_labels_are_person_major_and_adding_people_keeps_existing_ones():
    images, labels = generate_faces(3, 4, size=64, seed=0)
    assert labels == ["synth_00000"] * 4 + ["synth_00001"] * 4 + ["synth_00002"] * 4
    more, _ = generate_faces(5, 4, size=64, seed=0)
    assert np.array_equal(more[:12], images)
    assert len({img.tobytes() for img in images}) == 12  # every photo differs


def test_other_sizes_are_drawn():
    images, _ = generate_faces(2, 2, size=112, seed=0)
    assert images.shape == (4, 112, 112, 3)
    with pytest.raises(DataError):
        generate_faces(0, 2)


def test_identity_is_recoverable_from_pixels_but_not_from_mean_colour():
    images, labels = generate_faces(60, 8, size=64, seed=1)
    result = identity_check(images, labels)
    assert result["chance"] == pytest.approx(1 / 60)
    # clearly above chance, far from perfect: a model has to learn the identity
    assert 4 * result["chance"] < result["pixels"] < 0.6
    assert result["mean_colour"] < 3 * result["chance"]


def _digest(root):
    digest = hashlib.sha256()
    for record in list_photos(root):
        digest.update(record.person.encode() + open(record.path, "rb").read())
    return digest.hexdigest()


def test_write_faces_writes_a_labelled_gallery_with_a_readme_and_is_idempotent(tmp_path):
    root = write_faces(tmp_path / "synth", 3, 4, size=64, seed=2)
    records = list_photos(root)
    assert len(records) == 12 and {r.person for r in records} == {"synth_00000", "synth_00001", "synth_00002"}
    assert "SYNTHETIC" in (root / "README.txt").read_text() and "not real people".upper() in \
        (root / "README.txt").read_text().upper()
    images, _ = generate_faces(3, 4, size=64, seed=2)
    assert np.array_equal(load_image(records[0].path), images[0])  # PNG is lossless
    first = records[0].path
    mtime = os.stat(first).st_mtime_ns
    digest = _digest(root)
    write_faces(root, 3, 4, size=64, seed=2)
    assert os.stat(first).st_mtime_ns == mtime and _digest(root) == digest  # not rewritten


def test_write_faces_repairs_an_incomplete_set_and_replaces_other_parameters(tmp_path):
    root = write_faces(tmp_path / "synth", 3, 4, size=64, seed=2)
    digest = _digest(root)
    os.remove(root / "synth_00001" / "002.png")
    write_faces(root, 3, 4, size=64, seed=2)
    assert _digest(root) == digest
    write_faces(root, 2, 3, size=64, seed=9)
    assert len(list_photos(root)) == 6 and not (root / "synth_00002").exists()
    assert json.loads((root / MARKER).read_text())["seed"] == 9


def test_write_faces_refuses_a_folder_that_is_not_a_synthetic_set(tmp_path):
    (tmp_path / "photos" / "alice").mkdir(parents=True)
    with pytest.raises(DataError, match="not empty"):
        write_faces(tmp_path / "photos", 2, 2)
    assert os.listdir(tmp_path / "photos") == ["alice"]
