"""Inference API of a trained OPQN model.

    enc = FaceEncoder.load("model.pt")
    crops, kept, skipped = enc.prepare_photos([rgb_uint8_image, ...])   # face pipeline
    feats = enc.trunk_features(crops)          # float32 [N, enc.embedding_dim]
    codes = enc.encode(feats)                  # uint8 [N, enc.code_spec.code_bytes] (packed when K <= 16)
    luts = enc.lookup_tables(feats)            # float32 [N, M, K]; score = sum_m lut[m, c_m], higher is better

`feats` are the trunk's embeddings ("embeddings" in the CLI and the ingest job:
for trunk 'dlib' the 128-d dlib descriptors). Everything after the trunk runs on
the OPQN head alone, so a user who already has embeddings of the same trunk
calls `encode` / `lookup_tables` directly.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from facepq_core.codes import CodeSpec, pack_codes
from facepq_core.errors import BadImage, ConfigError, NoFaceFound
from opqn_model.checkpoint import load_checkpoint
from opqn_model.config import ModelConfig
from opqn_model.head import OPQNHead
from opqn_model.trunks import create_trunk

log = logging.getLogger(__name__)

MAX_EMBEDDING_VALUE = 1e15  # float32 sums of squares stay finite below this


def build_trunk(config: ModelConfig):
    return create_trunk(config.trunk, input_size=config.input_size if config.trunk != "dlib" else None,
                        width=config.trunk_width if config.trunk != "dlib" else None)


def build_pipeline(config: ModelConfig, trunk):
    """The face pipeline stored in the config, else the trunk's default alignment."""
    from opqn_model.face_pipeline import FacePipeline

    if config.pipeline:
        return FacePipeline.from_dict(config.pipeline)
    if hasattr(trunk, "default_pipeline"):
        return trunk.default_pipeline()
    return FacePipeline(size=config.input_size, mode="dlib")


class FaceEncoder:
    """A loaded model: photos or embeddings -> features, codes, lookup tables.

    Attributes:
        config: resolved ModelConfig. code_spec: CodeSpec (M, K, bits, code_bytes, packed).
        fingerprint: model identity stored in every index. trunk_name, input_size, embedding_dim.
        pipeline: FacePipeline configured as in training (picklable).
    """

    def __init__(self, config: ModelConfig, head: OPQNHead, trunk, fingerprint: str, pipeline=None):
        self.config = config
        self.head = head.eval()
        self.codec = HeadCodec(self.head, CodeSpec(config.M, config.K))
        self.code_spec = self.codec.code_spec
        self.trunk = trunk
        if isinstance(trunk, torch.nn.Module):
            trunk.eval()
        self.fingerprint = fingerprint
        self.trunk_name = config.trunk
        self.input_size = trunk.input_size
        self.embedding_dim = trunk.feature_dim
        self.pipeline = pipeline if pipeline is not None else build_pipeline(config, trunk)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceEncoder":
        return cls.from_checkpoint(load_checkpoint(path))

    @classmethod
    def from_checkpoint(cls, payload: dict) -> "FaceEncoder":
        """Build from an already validated `load_checkpoint` payload (no second read of the file)."""
        config: ModelConfig = payload["model_config"]
        trunk = build_trunk(config)
        if payload["trunk_state"]:
            trunk.load_state_dict(payload["trunk_state"])
        head = OPQNHead(trunk.feature_dim, config.M, config.K, config.sub_dim, config.dropout)
        head.load_state_dict(payload["head"])
        log.debug("loaded model: trunk=%s bits=%d (%dx%d) fingerprint=%s", config.trunk, config.bits,
                  config.M, config.K, payload["fingerprint"])
        return cls(config, head, trunk, payload["fingerprint"])

    def model_meta(self) -> dict:
        """What an index records about the model that wrote its codes."""
        return {"fingerprint": self.fingerprint, "trunk": self.trunk_name, **self.code_spec.to_dict()}

    # ---- photos -> trunk inputs -> trunk features ----------------------------------------------
    def prepare_photos(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Align each RGB uint8 photo with the face pipeline.

        Returns (crops uint8 [n_ok, S, S, 3], indices of the photos kept, {index: skip reason}).
        """
        crops, kept, skipped = [], [], {}
        for i, image in enumerate(images):
            try:
                crops.append(self.pipeline(image))
                kept.append(i)
            except NoFaceFound:
                skipped[i] = "no_face"
            except BadImage as exc:
                skipped[i] = exc.reason
        size = self.pipeline.size
        batch = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
        return batch, kept, skipped

    def trunk_features(self, crops: np.ndarray) -> np.ndarray:
        """Aligned crops uint8 [N, S, S, 3] -> embeddings float32 [N, embedding_dim]."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (self.input_size, self.input_size, 3) or crops.dtype != np.uint8:
            raise ConfigError(f"crops must be uint8 [N, {self.input_size}, {self.input_size}, 3], "
                              f"got {crops.dtype} {list(crops.shape)}")
        with torch.inference_mode():
            return np.asarray(self.trunk.features(crops), dtype=np.float32)

    # ---- embeddings -> head (delegated to the codec) -------------------------------------------
    def encode(self, features: np.ndarray) -> np.ndarray:
        return self.codec.encode(features)

    def lookup_tables(self, features: np.ndarray) -> np.ndarray:
        return self.codec.lookup_tables(features)

    def float_features(self, features: np.ndarray) -> np.ndarray:
        return self.codec.float_features(features)


class HeadCodec:
    """The OPQN head alone: trunk embeddings -> codes, lookup tables, float features.

    This is all the ingest of precomputed embeddings and the coordinator's table
    building need; FaceEncoder adds the face pipeline and the trunk in front.
    """

    def __init__(self, head: OPQNHead, code_spec: CodeSpec):
        self.head, self.code_spec = head, code_spec
        self.embedding_dim = head.projection[2].in_features

    def _embeddings(self, features: np.ndarray) -> torch.Tensor:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.embedding_dim:
            raise ConfigError(f"embeddings must be float32 [N, {self.embedding_dim}], got {list(features.shape)}")
        if not np.isfinite(features).all():
            raise ConfigError("embeddings contain NaN or infinite values")
        # Values this large are not embeddings of any trunk here; they would overflow in
        # the head's normalisation into NaN tables or arbitrary codes.
        if features.size and np.abs(features).max() > MAX_EMBEDDING_VALUE:
            raise ConfigError(f"embedding values must lie within +-{MAX_EMBEDDING_VALUE:g} "
                              f"(largest here {np.abs(features).max():.3g}); is this the right file?")
        return torch.from_numpy(np.ascontiguousarray(features)).to(self.head.codebooks.device)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Embeddings [N, E] -> stored codes uint8 [N, code_bytes]."""
        if len(features) == 0:
            return np.zeros((0, self.code_spec.code_bytes), np.uint8)
        with torch.inference_mode():
            sub = self.head.encode(self._embeddings(features)).cpu().numpy()
        return pack_codes(sub, self.code_spec)

    def lookup_tables(self, features: np.ndarray) -> np.ndarray:
        """Embeddings [N, E] -> query lookup tables float32 [N, M, K]."""
        with torch.inference_mode():
            return self.head.lookup_tables(self._embeddings(features)).cpu().numpy()

    def float_features(self, features: np.ndarray) -> np.ndarray:
        """Embeddings [N, E] -> the head's float features [N, M*d] (per-subspace normalised)."""
        with torch.inference_mode():
            return self.head.float_features(self._embeddings(features)).cpu().numpy()
