"""The pretrained dlib models: where their files are, and one loaded copy per process.

The files ship in the PyPI package `face_recognition_models`. Its `__init__`
imports `pkg_resources`, which recent setuptools no longer provide, so the
package is located with `importlib.util.find_spec` without importing it.

Loaded models are per-process singletons created on first use (the ResNet
takes ~0.3 s and 22 MB to load). Objects that must be pickled for Ray (the face
pipeline, the dlib trunk) hold no dlib object and call these getters instead.
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


@_singleton
def face_detector():
    """dlib's HOG + linear SVM frontal face detector."""
    return _dlib().get_frontal_face_detector()


@_singleton
def shape_predictor():
    """dlib's 5-point landmark predictor (eye corners and nose base), which get_face_chip aligns on."""
    return _dlib().shape_predictor(model_path(SHAPE_PREDICTOR_5))


@_singleton
def face_recognizer():
    """dlib's face recognition ResNet: 150x150 aligned chip -> 128-d descriptor."""
    log.debug("loading %s", FACE_RECOGNITION_RESNET)
    return _dlib().face_recognition_model_v1(model_path(FACE_RECOGNITION_RESNET))
