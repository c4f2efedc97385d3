"""Face pipeline on real photos: detection rate, largest-face choice, no-face handling, settings round trip."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from facepq_core.errors import ConfigError, NoFaceFound
from opqn_model.face_pipeline import DETECT_MAX_PIXELS, FacePipeline, centre_crop, detection_image, order_boxes
from opqn_model.images import load_image


def first_photos(root, n_people, per_person=1):
    """The first `per_person` photos of the first `n_people` people (sorted: deterministic)."""
    paths = []
    for person in sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p)))[:n_people]:
        folder = os.path.join(root, person)
        paths += [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:per_person]]
    return paths


@pytest.mark.shared_data
def test_detects_faces_in_at_least_90_percent_of_lfw_photos(lfw5):
    pipeline = FacePipeline(size=150)
    crops, misses = [], 0
    for path in first_photos(lfw5, 30):
        try:
            crops.append(pipeline(load_image(path)))
        except NoFaceFound:
            misses += 1
    assert 1 - misses / 30 >= 0.9
    assert all(c.shape == (150, 150, 3) and c.dtype == np.uint8 for c in crops)


@pytest.mark.shared_data
def test_upsample_policy_finds_faces_in_small_grey_att_photos(att_faces):
    # 92x112 grey photos whose face fills the frame: the retry at a lower scale matters here
    pipeline = FacePipeline(size=64)
    paths = first_photos(att_faces, 40)
    found = 0
    for path in paths:
        image = load_image(path)
        assert image.shape == (112, 92, 3)
        try:
            assert pipeline(image).shape == (64, 64, 3)
            found += 1
        except NoFaceFound:
            pass
    assert found / len(paths) >= 0.9


@pytest.fixture(scope="module")
def two_faces(lfw5):
    big_path, small_path = first_photos(lfw5, 2)
    big, small = load_image(big_path), load_image(small_path)
    small_resized = np.asarray(Image.fromarray(small).resize((180, 180), Image.Resampling.LANCZOS))
    canvas = np.full((250, 520, 3), 127, dtype=np.uint8)
    canvas[35:215, 10:190] = small_resized  # the other person, shrunk to 72%, on the left
    canvas[:, 270:520] = big
    return canvas, big, small_resized


def _crop_distance(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.shared_data
def test_several_faces_take_the_largest_and_crop_all_lists_largest_first(two_faces):
    canvas, big, small = two_faces
    pipeline = FacePipeline(size=150)
    boxes = pipeline.detect(canvas)
    assert len(boxes) == 2
    assert boxes[0][0] >= 270 and boxes[1][2] <= 190  # the big face (right) comes first
    chosen = pipeline(canvas)
    alone_big, alone_small = pipeline(big), pipeline(small)
    assert _crop_distance(chosen, alone_big) < 0.5 * _crop_distance(chosen, alone_small)
    crops = pipeline.crop_all(canvas)
    assert len(crops) == 2 and np.array_equal(crops[0], chosen)
    assert _crop_distance(crops[1], alone_small) < _crop_distance(crops[1], alone_big)


def test_equal_boxes_are_ordered_by_distance_to_the_centre():
    shape = (200, 400)  # centre at x=200, y=100
    far, near, large = (0, 50, 100, 150), (220, 50, 320, 150), (10, 10, 121, 121)
    assert order_boxes([far, near, large], shape) == [large, near, far]
    assert order_boxes([near, far], shape) == [near, far]
    assert order_boxes([], shape) == []


def test_no_face_raises_or_falls_back_to_a_centre_crop():
    rng = np.random.default_rng(0)
    flat = np.full((200, 300, 3), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)
    for image in (flat, noise):
        with pytest.raises(NoFaceFound):
            FacePipeline(size=112)(image)
        with pytest.raises(NoFaceFound):
            FacePipeline(size=112).crop_all(image)
    fallback = FacePipeline(size=112, on_no_face="centre-crop")
    crop = fallback(flat)
    assert crop.shape == (112, 112, 3) and (crop == 128).all()
    assert np.array_equal(fallback(noise), centre_crop(noise, 112))
    assert len(fallback.crop_all(noise)) == 1


def test_mode_none_centre_crops_and_resizes_and_accepts_grey():
    pipeline = FacePipeline(size=64, mode="none")
    face = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(pipeline(face), face)  # already the right size: untouched
    wide = np.zeros((100, 160, 3), dtype=np.uint8)
    wide[:, 30:130] = 255  # the centred 100x100 square is all white
    assert (pipeline(wide) == 255).all() and pipeline(wide).shape == (64, 64, 3)
    assert pipeline(np.zeros((80, 80), dtype=np.uint8)).shape == (64, 64, 3)
    with pytest.raises(ValueError):
        pipeline(face.astype(np.float32))


def test_settings_round_trip_and_pickle_and_validation():
    pipeline = FacePipeline(size=150, mode="dlib", padding=0.3, on_no_face="centre-crop", upsample=2)
    assert FacePipeline.from_dict(pipeline.to_dict()) == pipeline
    assert FacePipeline.from_dict(json.loads(json.dumps(pipeline.to_dict()))) == pipeline
    from_numpy = FacePipeline(size=np.int64(150), padding=np.float32(0.25), upsample=np.int64(1))
    assert from_numpy == FacePipeline(size=150) and json.dumps(from_numpy.to_dict())
    assert pickle.loads(pickle.dumps(pipeline)) == pipeline
    assert pipeline.cache_key != FacePipeline(size=150).cache_key
    for bad in (dict(size=150, mode="mtcnn"), dict(size=150, on_no_face="guess"), dict(size=4),
                dict(size=150, upsample=9), dict(size=150, padding=-1), dict(size=150, padding="wide"),
                dict(size=150.0)):
        with pytest.raises(ConfigError):
            FacePipeline(**bad)


@pytest.mark.parametrize("height,width,upsample", [(3000, 3000, 1), (9400, 9400, 1), (4000, 1000, 0), (1200, 1800, 2)])
def test_detection_scans_a_bounded_copy_of_a_large_photo(height, width, upsample):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    small, scale = detection_image(image, upsample)
    assert small.shape[0] * small.shape[1] * 4 ** upsample <= DETECT_MAX_PIXELS
    assert small.shape[1] == pytest.approx(width * scale, abs=1) and small.shape[0] == pytest.approx(height * scale, abs=1)
    assert small.shape[0] * small.shape[1] * 4 ** upsample > 0.95 * DETECT_MAX_PIXELS  # no smaller than it must be


def test_a_photo_within_the_budget_is_scanned_as_it_is():
    image = np.zeros((250, 250, 3), dtype=np.uint8)  # LFW's size: 250k pixels, 1M after one upsampling
    small, scale = detection_image(image, 1)
    assert small is image and scale == 1.0


@pytest.mark.shared_data
def test_a_3000_pixel_photo_finds_the_face_in_its_own_coordinates(lfw5):
    pipeline = FacePipeline(size=150)
    photos = first_photos(lfw5, 2)
    original = load_image(photos[0])
    big = np.asarray(Image.fromarray(original).resize((3000, 3000), Image.Resampling.BICUBIC))
    (box,), (big_box,) = pipeline.detect(original), pipeline.detect(big)
    factor = 3000 / original.shape[0]
    side = box[2] - box[0]
    for small_edge, big_edge in zip(box, big_box):  # the same face, where the downscaled copy put it x 12
        assert abs(big_edge - small_edge * factor) < 0.2 * side * factor
    crop_big, crop_small = pipeline(big), pipeline(original)
    other = pipeline(load_image(photos[1]))
    assert crop_big.shape == (150, 150, 3)
    assert _crop_distance(crop_big, crop_small) < 0.5 * _crop_distance(crop_big, other)
