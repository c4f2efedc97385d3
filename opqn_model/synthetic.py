"""Synthetic identity-labelled faces: cartoon faces of people who do not exist.

THESE IMAGES ARE SYNTHETIC. They are drawn from random numbers; no real person
is depicted and no photo of a real person was used. They exist so that
training, evaluation, ingest and search run end to end (and in CI) without a
face data set.

An identity is a fixed set of drawing parameters: face shape (ellipse ratios,
jaw width), ear size, eye spacing/size/height/shape and iris colour, brow
height/arch/tilt/thickness, nose length/width, mouth width/height/lip
thickness/resting smile, skin tone, hair colour and style (short, fringe, side
part, curly, long, bald), and sometimes a beard, moustache, glasses or a mole.
Each photo of that identity varies: head pose (roll, small yaw, scale, shift),
expression (eye openness, smile, open mouth, gaze), background, clothing,
lighting direction, gain and colour cast, sensor noise and sometimes blur.
Faces are drawn at twice the output size and box-downsampled (anti-aliasing).

Everything is a pure function of (seed, person index, photo index): the same
arguments give identical pixels on every run, and adding people does not
change the existing ones. Identity is recoverable but not trivially so:
see `identity_check` (1-nearest-neighbour retrieval on raw pixels).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import re
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facepq_core.errors import DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER = ".facepq-synthetic.json"
README = """SYNTHETIC FACES - NOT REAL PEOPLE

Every image in this folder was drawn by facepq's synthetic face generator
(opqn_model/synthetic.py) from random numbers. No real person is depicted and
no photograph was used. Folder names are made-up identity labels.

Parameters: {params}
"""
_HAIR_COLOURS = np.array([(28, 24, 22), (58, 40, 30), (98, 68, 44), (188, 156, 98), (148, 70, 36),
                          (156, 154, 150), (214, 212, 206)], dtype=np.float64)
_SKIN_LIGHT, _SKIN_DARK = np.array([236, 200, 178.0]), np.array([92, 62, 46.0])
_HAIR_STYLES = ("short", "fringe", "side_part", "curly", "long", "bald")


def person_label(index: int) -> str:
    return f"synth_{index:05d}"


def _identity(rng: np.random.Generator) -> dict:
    """The drawing parameters fixed for one person (all lengths relative to face size)."""
    u = rng.uniform
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u(0, 1) ** 1.3 + rng.normal(0, 6, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 8, 3)
    return dict(
        face_w=u(0.23, 0.31), face_h=u(0.30, 0.37), jaw=u(0.55, 0.95), chin=u(1.2, 3.0),
        ear=u(0.12, 0.22), skin=skin, lips=skin * np.array([0.85, 0.6, 0.6]) + rng.normal(0, 6, 3),
        eye_y=u(0.05, 0.25), eye_sep=u(0.32, 0.50), eye_w=u(0.12, 0.20), eye_aspect=u(0.35, 0.65),
        iris=np.array([(60, 40, 25), (90, 60, 30), (70, 110, 150), (80, 120, 80), (40, 30, 25)][rng.integers(5)],
                      dtype=np.float64),
        brow_gap=u(0.10, 0.22), brow_arch=u(0.0, 0.07), brow_tilt=u(-0.05, 0.05), brow_thick=u(0.025, 0.06),
        nose_len=u(0.12, 0.32), nose_w=u(0.12, 0.26),
        mouth_y=u(0.45, 0.65), mouth_w=u(0.25, 0.45), lip_t=u(0.02, 0.05), smile=u(-0.03, 0.04),
        hair=hair, hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))], hairline=u(0.45, 0.75),
        hair_volume=u(1.04, 1.18), hair_len=u(0.6, 1.4), part_side=rng.choice([-1, 1]),
        curls=rng.uniform(0, 2 * math.pi, 14),
        beard=u() < 0.18, moustache=u() < 0.18, glasses=u() < 0.15,
        mole=(u(-0.6, 0.6), u(0.0, 0.5)) if u() < 0.4 else None,
    )


def _photo(rng: np.random.Generator) -> dict:
    """The parameters of one photo: pose, expression, scene, camera."""
    u = rng.uniform
    return dict(
        roll=float(np.clip(rng.normal(0, 6), -14, 14)), yaw=u(-0.09, 0.09), scale=u(0.9, 1.1),
        shift=np.clip(rng.normal(0, 0.03, 2), -0.07, 0.07),
        eyes_open=0.15 if u() < 0.08 else u(0.55, 1.0), smile=u(0, 0.07),
        mouth_open=0.0 if u() < 0.6 else u(0.02, 0.09), gaze=u(-0.25, 0.25, 2),
        background=u(50, 210) + u(-35, 35, 3), background_slope=u(-40, 40, 2), clothes=u(20, 230, 3),
        light_angle=u(0, 2 * math.pi), light_strength=u(0.0, 0.35), gain=u(0.75, 1.2),
        cast=u(0.92, 1.08, 3), noise=u(1.0, 6.0), noise_seed=int(rng.integers(2**31)), blur=u(0.3, 1.0) if u() < 0.3 else 0.0,
    )


def _rgb(colour) -> tuple[int, int, int]:
    r, g, b = colour
    return (min(255, max(0, int(r + 0.5))), min(255, max(0, int(g + 0.5))), min(255, max(0, int(b + 0.5))))


@functools.lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [-0.5, 0.5), float32 [side, side] each (cached: built once per size)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    return yy, xx


def _draw(ident: dict, photo: dict, size: int) -> np.ndarray:
    """One face as uint8 [size, size, 3]."""
    s2 = 2 * size  # drawn at 2x, box-downsampled at the end
    # a linear background ramp: computed on 8x8 and upscaled, the same ramp at a fraction of the cost
    yy, xx = _grid(8)
    slope_x, slope_y = photo["background_slope"]
    bg = (xx * slope_x + yy * slope_y)[..., None] + photo["background"][None, None, :]
    small_bg = Image.fromarray(np.clip(np.rint(bg), 0, 255).astype(np.uint8))
    canvas = small_bg.resize((s2, s2), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(canvas)
    cx, cy = 0.5 * s2, 0.53 * s2
    rx, ry = ident["face_w"] * s2, ident["face_h"] * s2
    yaw = photo["yaw"] * rx  # features slide sideways when the head turns
    skin, hair = ident["skin"], ident["hair"]
    bald = ident["hair_style"] == "bald"

    # shoulders, neck, hair behind the head, ears
    d.ellipse((cx - 2.2 * rx, cy + 1.25 * ry, cx + 2.2 * rx, cy + 3.2 * ry), fill=_rgb(photo["clothes"]))
    d.rectangle((cx - 0.5 * rx, cy + 0.5 * ry, cx + 0.5 * rx, cy + 1.5 * ry), fill=_rgb(skin * 0.82))
    hv = ident["hair_volume"]
    if ident["hair_style"] == "long":
        d.rounded_rectangle((cx - hv * 1.15 * rx, cy - hv * ry, cx + hv * 1.15 * rx, cy + ident["hair_len"] * ry),
                            radius=0.6 * rx, fill=_rgb(hair))
    if not bald:
        d.ellipse((cx - hv * rx, cy - hv * 1.05 * ry, cx + hv * rx, cy + 0.6 * ry), fill=_rgb(hair))
    ear_y, ear_r = cy - ident["eye_y"] * ry + 0.15 * ry, ident["ear"] * ry
    for side in (-1, 1):
        ex = cx + side * 0.97 * rx
        d.ellipse((ex - 0.45 * ear_r, ear_y - ear_r, ex + 0.45 * ear_r, ear_y + ear_r), fill=_rgb(skin * 0.92))

    # face outline: an ellipse whose lower half narrows towards the jaw
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    lower = np.clip(np.sin(t), 0, None) ** ident["chin"]
    px = cx + rx * np.cos(t) * (1 - (1 - ident["jaw"]) * lower)
    d.polygon(list(zip(px, cy + ry * np.sin(t))), fill=_rgb(skin))
    if ident["beard"]:
        tb = np.linspace(0.05 * math.pi, 0.95 * math.pi, 30)
        lb = np.sin(tb) ** ident["chin"]
        pts = list(zip(cx + rx * np.cos(tb) * (1 - (1 - ident["jaw"]) * lb), cy + ry * np.sin(tb) + 0.04 * ry))
        d.polygon(pts + [(cx + yaw - 0.5 * rx, cy + 0.35 * ry), (cx + yaw + 0.5 * rx, cy + 0.35 * ry)][::-1],
                  fill=_rgb(hair * 0.9))

    # hair in front: the part of the hair ellipse above the hairline
    if not bald:
        hairline = cy - ident["hairline"] * ry * (0.6 if ident["hair_style"] == "fringe" else 1.0)
        top, h_ry = cy - hv * 1.05 * ry, (hv * 1.05 * ry + 0.6 * ry) / 2
        h_cy = top + h_ry
        phi = math.degrees(math.asin(np.clip((hairline - h_cy) / h_ry, -1, 1)))
        d.chord((cx - hv * rx, top, cx + hv * rx, cy + 0.6 * ry), 180 - phi, 360 + phi, fill=_rgb(hair))
        if ident["hair_style"] == "side_part":
            sx = ident["part_side"] * rx
            d.polygon([(cx - 0.1 * sx, top + 0.1 * ry), (cx + 1.05 * sx, hairline), (cx + 0.95 * sx, cy - 0.1 * ry)],
                      fill=_rgb(hair))
        if ident["hair_style"] == "curly":
            for a in ident["curls"]:
                qx, qy = cx + hv * rx * math.cos(a) * 0.95, h_cy - h_ry * abs(math.sin(a)) * 0.95
                r = 0.16 * rx
                d.ellipse((qx - r, qy - r, qx + r, qy + r), fill=_rgb(hair * 1.1))

    # eyes, brows, glasses
    eye_y = cy - ident["eye_y"] * ry
    ew = ident["eye_w"] * rx
    eh_full = ew * ident["eye_aspect"]
    eh = max(eh_full * photo["eyes_open"], 0.06 * eh_full)
    brow_y = eye_y - ident["brow_gap"] * ry
    for side in (-1, 1):
        ex = cx + yaw + side * ident["eye_sep"] * rx
        d.ellipse((ex - ew, eye_y - eh, ex + ew, eye_y + eh), fill=(238, 236, 230))
        if photo["eyes_open"] > 0.2:
            ir = min(0.5 * ew, 0.95 * eh_full)
            gx, gy = ex + photo["gaze"][0] * ew, eye_y + photo["gaze"][1] * eh
            d.ellipse((gx - ir, gy - min(ir, eh), gx + ir, gy + min(ir, eh)), fill=_rgb(ident["iris"]))
            d.ellipse((gx - 0.4 * ir, gy - 0.4 * min(ir, eh), gx + 0.4 * ir, gy + 0.4 * min(ir, eh)), fill=(15, 12, 12))
        d.line([(ex - ew, eye_y), (ex - ew * 0.2, eye_y - eh), (ex + ew, eye_y)], fill=_rgb(skin * 0.5),
               width=max(1, int(0.012 * s2)))
        inner, outer = ex - side * 1.1 * ew, ex + side * 1.1 * ew
        tilt = ident["brow_tilt"] * ry
        d.line([(inner, brow_y + 0.3 * tilt), (ex, brow_y - ident["brow_arch"] * ry), (outer, brow_y - tilt)],
               fill=_rgb(hair * 0.8 if not bald else skin * 0.45), width=max(1, int(ident["brow_thick"] * s2)),
               joint="curve")
        if ident["glasses"]:
            g = 1.35 * ew
            d.ellipse((ex - g, eye_y - 0.8 * g, ex + g, eye_y + 0.8 * g), outline=(25, 25, 30),
                      width=max(1, int(0.015 * s2)))
    if ident["glasses"]:
        gl = cx + yaw - (ident["eye_sep"] * rx - 1.35 * ew)
        gr = cx + yaw + (ident["eye_sep"] * rx - 1.35 * ew)
        d.line([(gl, eye_y), (gr, eye_y)], fill=(25, 25, 30), width=max(1, int(0.015 * s2)))

    # nose: bridge shadow, tip, nostrils (the nose moves most with yaw)
    nose_bottom = cy + ident["nose_len"] * ry
    nw = ident["nose_w"] * rx
    nx = cx + 1.5 * yaw
    d.line([(cx + yaw + 0.3 * nw, eye_y + 0.1 * ry), (nx + 0.6 * nw, nose_bottom - 0.05 * ry)],
           fill=_rgb(skin * 0.78), width=max(1, int(0.02 * s2)))
    d.ellipse((nx - 0.55 * nw, nose_bottom - 0.45 * nw, nx + 0.55 * nw, nose_bottom + 0.15 * nw), fill=_rgb(skin * 1.05))
    for side in (-1, 1):
        ox = nx + side * 0.45 * nw
        d.ellipse((ox - 0.22 * nw, nose_bottom - 0.1 * nw, ox + 0.22 * nw, nose_bottom + 0.12 * nw),
                  fill=_rgb(skin * 0.45))

    # mouth: smile bends the corners up, an open mouth shows dark inside
    my = cy + max(ident["mouth_y"], ident["nose_len"] + 0.13) * ry
    mw = ident["mouth_w"] * rx
    smile = (ident["smile"] + photo["smile"]) * ry
    opening = photo["mouth_open"] * ry
    xs = np.linspace(-1, 1, 15)
    upper = [(cx + yaw + mw * x, my - smile * x * x) for x in xs]
    lower = [(cx + yaw + mw * x, my - smile * x * x + opening * (1 - x * x)) for x in xs]
    if opening > 0:
        d.polygon(upper + lower[::-1], fill=(60, 20, 25))
    lip_w = max(1, int(ident["lip_t"] * s2))
    d.line(upper, fill=_rgb(ident["lips"]), width=lip_w, joint="curve")
    d.line([(x, y + 0.5 * lip_w) for x, y in lower], fill=_rgb(ident["lips"] * 1.05), width=lip_w, joint="curve")
    if ident["moustache"]:
        d.line([(cx + yaw - 0.8 * mw, my - 0.05 * ry), (cx + yaw, my - 0.12 * ry), (cx + yaw + 0.8 * mw, my - 0.05 * ry)],
               fill=_rgb(hair * 0.85), width=max(1, int(0.04 * s2)), joint="curve")
    if ident["mole"] is not None:
        mx_, my_ = cx + yaw + ident["mole"][0] * rx, cy + ident["mole"][1] * ry
        r = 0.012 * s2
        d.ellipse((mx_ - r, my_ - r, mx_ + r, my_ + r), fill=_rgb(skin * 0.4))
    return _camera(canvas, photo, size)


def _camera(canvas: Image.Image, photo: dict, size: int) -> np.ndarray:
    """Pose (roll/scale/shift), 2x box downsampling, then light, blur and noise."""
    s2 = canvas.size[0]
    a = math.radians(photo["roll"])
    cos_a, sin_a, k = math.cos(a) / photo["scale"], math.sin(a) / photo["scale"], s2 / 2
    tx, ty = k + photo["shift"][0] * s2, k + photo["shift"][1] * s2
    # inverse map: output pixel -> canvas pixel
    matrix = (cos_a, sin_a, k - cos_a * tx - sin_a * ty, -sin_a, cos_a, k + sin_a * tx - cos_a * ty)
    fill = _rgb(photo["background"])
    canvas = canvas.transform((s2, s2), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=fill)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    if photo["blur"] > 0:
        small = small.filter(ImageFilter.GaussianBlur(photo["blur"] * size / 64))
    img = np.asarray(small, dtype=np.float32)
    yy, xx = _grid(size)
    light = 1 + photo["light_strength"] * 2 * (xx * math.cos(photo["light_angle"]) + yy * math.sin(photo["light_angle"]))
    img = img * (photo["gain"] * light)[..., None] * photo["cast"][None, None, :].astype(np.float32)
    noise_rng = np.random.default_rng(photo["noise_seed"])
    img += noise_rng.normal(0, photo["noise"], img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_faces(n_people: int, photos_per_person: int, size: int = 64, seed: int = 0):
    """Draw `photos_per_person` photos of each of `n_people` synthetic identities.

    Returns
    -------
    images : np.ndarray uint8 [n_people * photos_per_person, size, size, 3], person-major order
    labels : list[str] of the same length, `synth_00000`, `synth_00001`, ...
    """
    if n_people < 1 or photos_per_person < 1:
        raise DataError(f"need at least one person and one photo each, got {n_people} x {photos_per_person}")
    if not 32 <= size <= 512:
        raise DataError(f"synthetic face size must be in [32, 512], got {size}")
    images = np.empty((n_people * photos_per_person, size, size, 3), dtype=np.uint8)
    labels = []
    for p in range(n_people):
        ident = _identity(np.random.default_rng([seed, 1, p]))
        for j in range(photos_per_person):
            images[p * photos_per_person + j] = _draw(ident, _photo(np.random.default_rng([seed, 2, p, j])), size)
            labels.append(person_label(p))
    return images, labels


def write_faces(root, n_people: int, photos_per_person: int, size: int = 64, seed: int = 0) -> pathlib.Path:
    """Write `<root>/<person>/<j>.png` (j = 000, 001, ...) plus README.txt saying they are synthetic.

    Idempotent: when `root` already holds the complete set for the same
    parameters (marker file written last), nothing is rewritten. A previous
    synthetic set with other parameters is replaced; a non-empty folder that is
    not a synthetic set is refused (DataError) rather than written into.
    """
    root = pathlib.Path(root)
    params = dict(generator_version=GENERATOR_VERSION, n_people=n_people, photos_per_person=photos_per_person,
                  size=size, seed=seed)
    marker = root / MARKER
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == params and _complete(root, n_people, photos_per_person):
            log.info("synthetic faces already in %s (%s); not rewriting", root, params)
            return root
        marker.unlink()
        for entry in root.iterdir():  # only our own person folders are removed
            if entry.is_dir() and re.fullmatch(r"synth_\d{5}", entry.name):
                shutil.rmtree(entry)
    elif root.exists() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and holds no synthetic face set; choose an empty or new folder")
    images, labels = generate_faces(n_people, photos_per_person, size, seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text(README.format(params=json.dumps(params)))
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / label
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i % photos_per_person:03d}.png")
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(params))
    os.replace(tmp, marker)
    return root


def _complete(root: pathlib.Path, n_people: int, photos_per_person: int) -> bool:
    return all((root / person_label(p) / f"{j:03d}.png").is_file()
               for p in range(n_people) for j in range(photos_per_person))


def identity_check(images: np.ndarray, labels) -> dict:
    """Leave-one-out 1-nearest-neighbour identity retrieval, to show identity is learnable but not trivial.

    Parameters
    ----------
    images : uint8 [N, S, S, 3]; labels : N person labels

    Returns
    -------
    dict with 'pixels' (1-NN accuracy on raw pixels, L2), 'mean_colour' (1-NN
    accuracy on the per-image mean RGB) and 'chance' (1 / number of people).
    """
    labels = np.asarray(labels)
    flat = images.reshape(len(images), -1).astype(np.float32)

    def one_nn(features):
        sq = (features * features).sum(1)
        dist = sq[:, None] + sq[None, :] - 2 * features @ features.T
        np.fill_diagonal(dist, np.inf)
        return float((labels[dist.argmin(1)] == labels).mean())

    return {"pixels": one_nn(flat), "mean_colour": one_nn(images.reshape(len(images), -1, 3).mean(1)),
            "chance": 1.0 / len(set(labels.tolist()))}
