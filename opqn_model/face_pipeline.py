"""The face pipeline: photo -> detect -> align -> square crop that a trunk takes.

mode 'dlib' (photos of people)
    dlib's HOG frontal face detector finds faces; the 5-point landmark model
    places eye corners and nose; `dlib.get_face_chip` rotates the face upright
    and crops it with `padding` (0.25 = the margin the dlib face recognition
    ResNet was trained with) to `size` x `size`.

    Detection runs with `upsample` (each step doubles the image side, so faces
    down to ~40 px are found at 1). When nothing is found and the photo is small
    enough that one more doubling stays cheap (<= RETRY_MAX_PIXELS after
    upsampling; e.g. AT&T's 92x112 or LFW's 250x250), detection is tried once
    more at `upsample + 1`, and then at `upsample - 1` (cheap: a quarter of
    the pixels) because a face filling a small photo can be too large for the
    upsampled scales.

    Large photos are detected on a downscaled copy, so detection costs about the same for a
    3000x3000 photo as for a 1000x1000 one: the copy is at most DETECT_MAX_PIXELS pixels
    once the detector has upsampled it (`detection_image`). The boxes are scaled back, and the
    landmarks and the aligned crop come from the full-resolution photo, so a crop keeps every
    pixel the photo has. The price: in a photo over the budget the smallest face found grows
    with the photo (about 40 px per 1,225 px of the photo's longer side at upsample 1, e.g.
    faces from ~100 px in a 3000x3000 photo); portraits and photos up to ~1,200 px a side
    (upsample 0: ~2,400 px) are detected exactly as before.

    Several faces: `__call__` returns the face with the largest box; boxes of
    equal area (HOG boxes come in discrete pyramid sizes, so ties happen) go to
    the one whose centre is closest to the photo's centre. `crop_all` returns
    every face in that order.

    No face: `on_no_face='skip'` raises NoFaceFound (the run counts it);
    `on_no_face='centre-crop'` falls back to the photo's centred square, resized
    (for galleries of photos that are already roughly framed faces).

mode 'none' (photos that are already aligned face crops: the synthetic
    generator's output or a user's own crops): centred square crop, resized.

The pipeline holds only its settings (plain values) so it pickles for Ray
actors and stores in checkpoints via `to_dict` / `from_dict`; dlib models come
from the per-process singletons in `opqn_model.dlib_models`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from facepq_core.errors import ConfigError, NoFaceFound
from opqn_model import dlib_models

log = logging.getLogger(__name__)

MODES = ("dlib", "none")
ON_NO_FACE = ("skip", "centre-crop")
# One extra upsampling step is tried only below this many pixels after upsampling (cost ~ pixels).
RETRY_MAX_PIXELS = 1_500_000
# Pixels the HOG detector scans at most (after its upsampling): larger photos are downscaled for
# detection only. On the 2-core development machine a 3000x3000 photo took 6.7 s to search before.
DETECT_MAX_PIXELS = 1_500_000


@dataclass(frozen=True)
class FacePipeline:
    """Detect, align and crop faces.

    Args:
        size: side of the square output crop in pixels (150 for trunk 'dlib').
        mode: 'dlib' (detect + align) or 'none' (input already is a face crop).
        padding: margin around the aligned face as a fraction of its size (dlib convention).
        on_no_face: 'skip' (raise NoFaceFound) or 'centre-crop' (fallback crop).
        upsample: HOG detector upsampling steps (0-3).
    """

    size: int
    mode: str = "dlib"
    padding: float = 0.25
    on_no_face: str = "skip"
    upsample: int = 1

    def __post_init__(self):
        # Settings come back from JSON/torch checkpoints as numpy or float scalars: store plain
        # Python values so to_dict() is JSON-serialisable and equality/pickling stay exact.
        for name, kind in (("padding", float), ("upsample", int)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except (TypeError, ValueError):
                raise ConfigError(f"face pipeline {name} must be a number, got {getattr(self, name)!r}") from None
        if isinstance(self.size, np.integer):
            object.__setattr__(self, "size", int(self.size))
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 8 <= self.size <= 1024:
            raise ConfigError(f"face crop size must be an integer in [8, 1024], got {self.size!r}")
        if self.mode not in MODES:
            raise ConfigError(f"face pipeline mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.on_no_face not in ON_NO_FACE:
            raise ConfigError(f"on_no_face must be one of {', '.join(ON_NO_FACE)}, got {self.on_no_face!r}")
        if not 0 <= self.padding <= 2:
            raise ConfigError(f"face padding must be in [0, 2], got {self.padding}")
        if not 0 <= self.upsample <= 3:
            raise ConfigError(f"detector upsample must be in [0, 3], got {self.upsample}")

    # ---- settings ----
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> "FacePipeline":
        """Inverse of `to_dict`; unknown keys (from newer versions) are ignored, missing ones take defaults."""
        known = {k: settings[k] for k in ("size", "mode", "padding", "on_no_face", "upsample") if k in settings}
        return cls(**known)

    @property
    def cache_key(self) -> str:
        """A string that changes whenever the crops would change (feature-cache key part)."""
        return (f"pipeline:{self.mode}:size={self.size}:padding={self.padding:g}:"
                f"upsample={self.upsample}:no_face={self.on_no_face}")

    # ---- cropping ----
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One crop per photo: uint8 [H, W, 3] (or [H, W]) -> uint8 [size, size, 3].

        Raises NoFaceFound in mode 'dlib' with on_no_face='skip' when no face is detected.
        """
        image = _as_rgb(image)
        if self.mode == "none":
            return centre_crop(image, self.size)
        boxes = self.detect(image)
        if not boxes:
            return self._no_face(image)
        return self._align(image, boxes[0])

    def crop_all(self, image: np.ndarray) -> list[np.ndarray]:
        """Every detected face, largest first (see module docstring); mode 'none' gives one crop.

        Raises NoFaceFound like `__call__` (with on_no_face='centre-crop': [centre crop]).
        """
        image = _as_rgb(image)
        if self.mode == "none":
            return [centre_crop(image, self.size)]
        boxes = self.detect(image)
        if not boxes:
            return [self._no_face(image)]
        return [self._align(image, box) for box in boxes]

    def faces(self, image: np.ndarray, min_face_px: int = 0) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
        """(crop, box) of every detected face whose box is at least `min_face_px` on its shorter side, largest
        first; mode 'none' gives the centre crop and the photo as its box.

        Raises NoFaceFound when no face (of that size) is found, whatever `on_no_face` says: a photo searched or
        enrolled face by face names its faces, and a centre crop is not one.
        """
        image = _as_rgb(image)
        height, width = image.shape[:2]
        if self.mode == "none":
            return [(centre_crop(image, self.size), (0, 0, width - 1, height - 1))]
        boxes = [b for b in self.detect(image) if min(b[2] - b[0], b[3] - b[1]) >= min_face_px]
        if not boxes:
            raise NoFaceFound(f"no face of at least {min_face_px} px found in a {width}x{height} photo "
                              f"(HOG detector, upsample {self.upsample})")
        return [(self._align(image, box), box) for box in boxes]

    def detect(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (left, top, right, bottom) in the photo's pixels, largest first, ties by distance to centre.

        A photo over the detection budget is scanned downscaled (`detection_image`); the boxes are
        scaled back to the photo.
        """
        image = _as_rgb(image)
        small, scale = detection_image(image, self.upsample)
        rects = _detect_rects(small, self.upsample)
        height, width = image.shape[:2]
        boxes = [(max(0, round(r.left() / scale)), max(0, round(r.top() / scale)),
                  min(width - 1, round(r.right() / scale)), min(height - 1, round(r.bottom() / scale)))
                 for r in rects]
        return order_boxes(boxes, image.shape[:2])

    def _align(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        import dlib

        shape = dlib_models.shape_predictor()(image, dlib.rectangle(*box))
        chip = dlib.get_face_chip(image, shape, size=int(self.size), padding=float(self.padding))
        return np.ascontiguousarray(chip, dtype=np.uint8)

    def _no_face(self, image: np.ndarray) -> np.ndarray:
        if self.on_no_face == "centre-crop":
            return centre_crop(image, self.size)
        raise NoFaceFound(f"no face found in a {image.shape[1]}x{image.shape[0]} photo "
                          f"(HOG detector, upsample {self.upsample})")


def order_boxes(boxes, image_shape) -> list[tuple[int, int, int, int]]:
    """Sort boxes (left, top, right, bottom): largest area first; equal areas by distance to the centre.

    Parameters
    ----------
    boxes : iterable of (left, top, right, bottom) in pixels
    image_shape : (height, width) of the photo
    """
    height, width = image_shape[:2]
    cx, cy = width / 2.0, height / 2.0

    def order(box):
        left, top, right, bottom = box
        centre_distance = ((left + right) / 2.0 - cx) ** 2 + ((top + bottom) / 2.0 - cy) ** 2
        return (-(right - left) * (bottom - top), centre_distance, left, top)

    return sorted((tuple(int(v) for v in box) for box in boxes), key=order)


def detection_image(image: np.ndarray, upsample: int,
                    max_pixels: int = DETECT_MAX_PIXELS) -> tuple[np.ndarray, float]:
    """The copy of `image` the detector scans, and its scale (copy side / photo side, <= 1).

    Parameters
    ----------
    image : uint8 [H, W, 3]
    upsample : the detector's upsampling steps (each doubles the side it scans)

    Returns
    -------
    (uint8 [h, w, 3], scale): the photo itself and 1.0 when H * W * 4**upsample <= max_pixels,
    else a box-filtered copy with h * w * 4**upsample <= max_pixels.
    """
    height, width = image.shape[:2]
    scanned = height * width * 4 ** upsample
    if scanned <= max_pixels:
        return image, 1.0
    scale = (max_pixels / scanned) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    # BOX: an area average, as cheap as it gets for large factors and free of aliasing.
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=np.uint8)
    return small, size[0] / width


def _detect_rects(image: np.ndarray, upsample: int):
    detector = dlib_models.face_detector()
    rects = list(detector(image, upsample))
    if not rects and upsample < 3:
        upsampled_pixels = image.shape[0] * image.shape[1] * 4 ** (upsample + 1)
        if upsampled_pixels <= RETRY_MAX_PIXELS:
            rects = list(detector(image, upsample + 1))
    if not rects and upsample > 0:
        # A face that fills a small photo can outgrow the detector's scales once upsampled
        # (AT&T 92x112: 98% found at upsample 0, 94% at 1); one pass at a lower scale is cheap.
        rects = list(detector(image, upsample - 1))
    return rects


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"face pipeline takes uint8 images, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"face pipeline takes [H, W, 3] or [H, W] images, got shape {image.shape}")
    return np.ascontiguousarray(image)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centred square crop of uint8 [H, W, 3], resized to uint8 [size, size, 3]."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(square).resize((size, size), resample), dtype=np.uint8)
