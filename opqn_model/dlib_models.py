"""The pretrained dlib models: where their files are, and one loaded copy per process.

The files ship in the PyPI package `face_recognition_models`. Its `__init__`
imports `pkg_resources`, which recent setuptools no longer provide, so the
package is located with `importlib.util.find_spec` without importing it.

Loaded models are created on first use (the ResNet takes ~0.3 s and 22 MB to
load, the HOG detector ~1 s). Objects that must be pickled for Ray (the face
pipeline, the dlib trunk) hold no dlib object and call these getters instead.

Threads. dlib's HOG detector keeps the image pyramid of the photo it is scanning in
the object itself and releases the GIL while it scans, so two threads detecting with
one detector overwrite each other's pyramid: a coordinator answering concurrent photo
searches died with SIGSEGV (photos of different sizes reallocate the buffers under the
other thread; equal sizes give silently wrong boxes). `face_detector()` therefore hands
out a pool: each call borrows a detector no other thread is using (a new one is made
when all are busy, so there are at most as many as concurrent detections) and gives it
back. The face recognition network keeps per-call buffers in the object too; it holds
the GIL while it runs anyway, so it is used under a lock rather than copied (22 MB
each). The 5-point shape predictor only reads its model (a const call in dlib) and is
shared.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading

from facepq_core.digest import sha256_file
from facepq_core.errors import ConfigError

log = logging.getLogger(__name__)

SHAPE_PREDICTOR_5 = "shape_predictor_5_face_landmarks.dat"
FACE_RECOGNITION_RESNET = "dlib_face_recognition_resnet_model_v1.dat"

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def model_dir() -> str:
    """Folder holding the dlib model files. Raises ConfigError when the package is missing."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ConfigError("the dlib model files are missing: install them with "
                          "`pip install face_recognition_models` (needed by trunk 'dlib' and face pipeline mode 'dlib')")
    return os.path.join(locations[0], "models")


def model_path(filename: str) -> str:
    """Path of one model file; ConfigError when it is absent."""
    path = os.path.join(model_dir(), filename)
    if not os.path.isfile(path):
        raise ConfigError(f"dlib model file {path} is missing; reinstall with "
                          "`pip install --force-reinstall face_recognition_models`")
    return path


@functools.lru_cache(maxsize=None)
def model_sha256(filename: str) -> str:
    """Hex sha256 of a model file: part of feature-cache keys, so new weights never reuse old features."""
    return sha256_file(model_path(filename))


def _dlib():
    try:
        import dlib
    except ImportError:
        raise ConfigError("dlib is not installed: `pip install dlib-bin` (needed by trunk 'dlib' and "
                          "face pipeline mode 'dlib')") from None
    return dlib


def _singleton(fn):
    """Create on first call, once per process even with threads (dlib loading is not cheap)."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def get():
        with _lock:
            return cached()

    get.cache_clear = cached.cache_clear
    return get


class DetectorPool:
    """Call it like a dlib detector; each call runs on a detector no other thread is using at that moment.

    Args:
        factory: makes one detector (e.g. dlib.get_frontal_face_detector).
    """

    def __init__(self, factory):
        self.factory = factory
        self._free: list = []
        self._lock = threading.Lock()
        self.created = 0

    def __call__(self, *args, **kwargs):
        with self._lock:
            detector = self._free.pop() if self._free else None
        if detector is None:
            detector = self.factory()  # outside the lock: ~1 s, and other threads may return theirs meanwhile
            with self._lock:
                self.created += 1
        try:
            return detector(*args, **kwargs)
        finally:
            with self._lock:
                self._free.append(detector)


class LockedRecognizer:
    """dlib's face recognition network behind a lock: `compute_face_descriptor` one call at a time."""

    def __init__(self, net):
        self.net = net
        self._lock = threading.Lock()

    def compute_face_descriptor(self, *args, **kwargs):
        with self._lock:
            return self.net.compute_face_descriptor(*args, **kwargs)


@_singleton
def face_detector() -> DetectorPool:
    """dlib's HOG + linear SVM frontal face detector, safe to call from several threads (see the module docstring)."""
    dlib = _dlib()
    return DetectorPool(dlib.get_frontal_face_detector)


@_singleton
def shape_predictor():
    """dlib's 5-point landmark predictor (eye corners and nose base), which get_face_chip aligns on."""
    return _dlib().shape_predictor(model_path(SHAPE_PREDICTOR_5))


@_singleton
def face_recognizer() -> LockedRecognizer:
    """dlib's face recognition ResNet: 150x150 aligned chip -> 128-d descriptor (one call at a time)."""
    log.debug("loading %s", FACE_RECOGNITION_RESNET)
    return LockedRecognizer(_dlib().face_recognition_model_v1(model_path(FACE_RECOGNITION_RESNET)))
