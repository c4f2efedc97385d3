"""Trunk 'dlib': dlib's pretrained face recognition ResNet, frozen (128-d descriptors).

King, "Dlib-ml: A Machine Learning Toolkit", JMLR 2009; the model
`dlib_face_recognition_resnet_model_v1` is a ResNet-29 trained with a metric
loss on ~3M faces and reaches 99.38% on the LFW verification benchmark.

It expects 150x150 RGB chips aligned the way `dlib.get_face_chip` aligns them
from the 5-point landmarks with padding 0.25: use `default_pipeline()`.
The trunk is frozen (`trainable = False`), so its features can be computed
once and cached (`opqn_model.feature_cache`); only the OPQN head trains.
"""
from __future__ import annotations

import logging

import numpy as np

from opqn_model import dlib_models
from opqn_model.face_pipeline import FacePipeline
from opqn_model.trunks import register_trunk

log = logging.getLogger(__name__)


class DlibTrunk:
    """Aligned 150x150 chips -> 128-d dlib descriptors.

    Args:
        num_jitters: 0 (default) for one pass; n > 1 averages n randomly jittered
            passes (n times slower, slightly more robust).

    Holds no dlib object (the ResNet is a per-process singleton), so it pickles for Ray.
    """

    name = "dlib"
    input_size = 150
    feature_dim = 128
    trainable = False

    def __init__(self, num_jitters: int = 0):
        self.num_jitters = int(num_jitters)

    @property
    def cache_key(self) -> str:
        """Changes when the weights or the jitter setting change (feature-cache key part)."""
        weights = dlib_models.model_sha256(dlib_models.FACE_RECOGNITION_RESNET)[:16]
        return f"trunk:dlib:{weights}:jitters={self.num_jitters}"

    @staticmethod
    def default_pipeline(**overrides) -> FacePipeline:
        """The alignment the dlib model was trained with: dlib detection, 150 px, padding 0.25."""
        settings = dict(size=150, mode="dlib", padding=0.25)
        settings.update(overrides)
        return FacePipeline(**settings)

    def features(self, crops: np.ndarray) -> np.ndarray:
        """Descriptors of aligned face chips.

        Parameters
        ----------
        crops : uint8 [N, 150, 150, 3] (a list of [150, 150, 3] arrays works too)

        Returns
        -------
        float32 [N, 128], dlib's raw descriptors (not normalised; two photos less than
        ~0.6 apart in Euclidean distance are usually the same person).
        """
        chips = [np.ascontiguousarray(c, dtype=np.uint8) for c in crops] if isinstance(crops, list) else None
        if chips is None:
            crops = np.asarray(crops)
            if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (150, 150, 3):
                raise ValueError(f"dlib trunk takes uint8 [N, 150, 150, 3] chips, got {crops.dtype} {crops.shape}")
            chips = [np.ascontiguousarray(c) for c in crops]
        elif any(c.shape != (150, 150, 3) for c in chips):
            raise ValueError("dlib trunk takes uint8 [150, 150, 3] chips")
        if not chips:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        # The batch overload runs the whole list through the network in one call.
        vectors = dlib_models.face_recognizer().compute_face_descriptor(chips, self.num_jitters)
        return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32).reshape(len(chips), self.feature_dim)

    def __repr__(self) -> str:
        return f"DlibTrunk(num_jitters={self.num_jitters})"


@register_trunk
def dlib(num_jitters: int = 0) -> DlibTrunk:
    """Frozen dlib ResNet trunk: 150x150 aligned chips -> 128-d features."""
    return DlibTrunk(num_jitters=num_jitters)
