"""Inference API of a trained model.

    enc = FaceEncoder.load("model.pt")         # or the folder `facepq train --out` wrote
    crops, kept, skipped = enc.prepare_photos([photo_path_or_bytes, ...])   # face pipeline
    feats = enc.trunk_features(crops)          # float32 [N, enc.embedding_dim]
    codes = enc.codec.encode(feats)            # uint8 [N, enc.codec.spec.code_bytes]
    tables = enc.codec.query_tables(feats)     # float32 [N, M, K]; score = sum_m tables[m, c_m], higher is better

A refinement tier (facepq_core.refine) of an index comes from the model too:
`enc.refine_codec("codes:256")` (fitted with the model) or `enc.refine_codec("float16")`.

`feats` are the trunk's embeddings ("embeddings" in the CLI and the ingest job: for
trunk 'dlib' the 128-d dlib descriptors). Everything after the trunk is the codec
(facepq_core.codecs: numpy, no torch), which the training method builds from the
checkpoint, so a user who already has embeddings of the same trunk needs only
`enc.codec`.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from facepq_core.codecs import codec_from_state
from facepq_core.errors import ConfigError
from opqn_model.checkpoint import load_checkpoint
from opqn_model.config import ModelConfig
from opqn_model.trunks import create_trunk, trunk_options

log = logging.getLogger(__name__)


def build_trunk(config: ModelConfig):
    options = trunk_options(config.trunk, input_size=config.input_size, width=config.trunk_width,
                            pooling=config.pooling)
    if config.pooling != "flat" and "pooling" not in options:
        raise ConfigError(f"pooling {config.pooling!r} needs a convolutional trunk's feature maps; trunk "
                          f"{config.trunk!r} gives a vector (leave --pooling at flat)")
    return create_trunk(config.trunk, **options)


def build_pipeline(config: ModelConfig, trunk, **overrides):
    """The face pipeline stored in the config, else the trunk's default alignment, with `overrides`
    (FacePipeline fields; None = keep) on top of the default."""
    from opqn_model.face_pipeline import FacePipeline

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config.pipeline and not overrides:
        return FacePipeline.from_dict(config.pipeline)
    if hasattr(trunk, "default_pipeline"):
        return trunk.default_pipeline(**overrides)
    return FacePipeline(**{"size": config.input_size, "mode": "dlib", **overrides})


def refine_codecs_of(payload: dict) -> dict:
    """{kind: Codec} of the refinement tiers fitted with a checkpoint (`load_checkpoint` payload)."""
    return {kind: codec_from_state(str(state["codec"]), state)
            for kind, state in (payload.get("refine_codecs") or {}).items()}


def refine_codec(fitted: dict, embedding_dim: int, kind: str):
    """The codec of refinement tier `kind`: one of `fitted` ({kind: Codec}), or float16 (needs no fitting).

    Raises ConfigError naming the tiers on offer.
    """
    from facepq_core.codecs.float16 import Float16Codec
    from facepq_core.refine import FLOAT16

    if kind == FLOAT16:
        return Float16Codec(embedding_dim)
    if kind not in fitted:
        offered = ", ".join(sorted(fitted) + [FLOAT16])
        raise ConfigError(f"this model has no refinement tier {kind}; it offers {offered} (codes:BITS are fitted "
                          f"with the model: `facepq train --refine-bits BITS`)")
    return fitted[kind]


class FaceEncoder:
    """A loaded model: photos -> aligned crops -> trunk embeddings, and its codec (embeddings -> codes, tables).

    Attributes:
        config: resolved ModelConfig. method: training method name. codec: facepq_core.codecs.Codec.
        fingerprint: model identity stored in every index. trunk_name, input_size, embedding_dim.
        calibration: its score calibration (facepq_core.calibration.Calibration) or None.
        pipeline: FacePipeline configured as in training (picklable).
    """

    def __init__(self, config: ModelConfig, codec, trunk, fingerprint: str, method: str = "opqn", pipeline=None,
                 refine_codecs: dict | None = None, calibration=None):
        self.config = config
        self.calibration = calibration  # facepq_core.calibration.Calibration, None until `facepq calibrate`
        self.codec = codec
        self.refine_codecs = dict(refine_codecs or {})  # kind ('codes:256') -> Codec fitted with the model
        self.method = method
        self.trunk = trunk
        if isinstance(trunk, torch.nn.Module):
            trunk.eval()
        self.fingerprint = fingerprint
        self.trunk_name = config.trunk
        self.input_size = trunk.input_size
        self.embedding_dim = trunk.feature_dim
        if codec.embedding_dim != self.embedding_dim:
            raise ConfigError(f"the model's codec takes {codec.embedding_dim}-d embeddings but trunk "
                              f"{config.trunk!r} gives {self.embedding_dim}-d")
        self.pipeline = pipeline if pipeline is not None else build_pipeline(config, trunk)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceEncoder":
        """The checkpoint at `path` and, when `facepq calibrate` measured it, its calibration (stored beside it;
        CheckpointError when that file belongs to another model)."""
        from opqn_model.calibrate import load_calibration

        encoder = cls.from_checkpoint(load_checkpoint(path))
        encoder.calibration = load_calibration(path, encoder.fingerprint)
        return encoder

    @classmethod
    def from_checkpoint(cls, payload: dict) -> "FaceEncoder":
        """Build from an already validated `load_checkpoint` payload (no second read of the file)."""
        from opqn_model.methods import get_method

        config: ModelConfig = payload["model_config"]
        trunk = build_trunk(config)
        if payload["trunk_state"]:
            trunk.load_state_dict(payload["trunk_state"])
        codec = get_method(payload["method"]).codec(payload)
        refine = refine_codecs_of(payload)
        log.debug("loaded model: method=%s codec=%s trunk=%s bits=%d fingerprint=%s", payload["method"], codec.name,
                  config.trunk, codec.spec.bits, payload["fingerprint"])
        return cls(config, codec, trunk, payload["fingerprint"], payload["method"], refine_codecs=refine)

    def refine_codec(self, kind: str):
        """The codec of refinement tier `kind` ('codes:BITS' fitted with the model, or 'float16');
        ConfigError naming the tiers this model offers."""
        return refine_codec(self.refine_codecs, self.embedding_dim, kind)

    def model_meta(self) -> dict:
        """What an index records about the model that wrote its codes."""
        return {"fingerprint": self.fingerprint, "trunk": self.trunk_name, **self.codec.describe()}

    # ---- photos -> trunk inputs -> trunk features ----------------------------------------------
    def prepare_photos(self, images) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Align each photo (RGB uint8 array, path or file bytes) with the model's face pipeline.

        Returns (crops uint8 [n_ok, S, S, 3], positions of the photos kept, {position: skip reason}).
        """
        from opqn_model.photos import align_photos

        aligned = align_photos(images, self.pipeline)
        return aligned.crops, aligned.kept, aligned.skipped

    def trunk_features(self, crops: np.ndarray) -> np.ndarray:
        """Aligned crops uint8 [N, S, S, 3] -> embeddings float32 [N, embedding_dim]."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (self.input_size, self.input_size, 3) or crops.dtype != np.uint8:
            raise ConfigError(f"crops must be uint8 [N, {self.input_size}, {self.input_size}, 3], "
                              f"got {crops.dtype} {list(crops.shape)}")
        with torch.inference_mode():
            return np.asarray(self.trunk.features(crops), dtype=np.float32)
