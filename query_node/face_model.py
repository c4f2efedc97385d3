"""What the coordinator asks of the trained model: query -> lookup tables, photos -> gallery codes.

`FaceModel.tables_for` is the ONE place a query (photo bytes or an embedding) becomes
lookup tables; `encode_photos` is the one place enrolment photos become codes. The
coordinator service (query_node.service) talks to the model through this class only,
so a new way of building tables changes these few lines, and the service's tests
replace the whole class with a fake that needs no model.
"""
from __future__ import annotations

import numpy as np

from facepq_core.errors import ConfigError, InvalidRequest, NoFaceFound


def is_photo(query) -> bool:
    """A query is a photo when it is bytes (encoded image); anything else is an embedding's values."""
    return isinstance(query, (bytes, bytearray, memoryview))


class FaceModel:
    """A loaded model (opqn_model.api.FaceEncoder) seen from the coordinator.

    Args:
        encoder: the FaceEncoder (its face pipeline, trunk and codec).
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.codec = encoder.codec  # numpy: embedding -> lookup tables without torch's per-op cost

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def model_meta(self):
        """indexer.manifest.ModelMeta of this model (what an index it writes into must hold)."""
        from indexer.manifest import ModelMeta

        return ModelMeta.from_encoder(self.encoder)

    def tables_for(self, query) -> np.ndarray:
        """A photo (bytes) or an embedding (floats) -> lookup tables float32 [1, M, K].

        Raises:
            NoFaceFound: the photo decoded but holds no face.
            InvalidRequest: the photo is not a usable image; ConfigError: an embedding of the wrong
                length or with NaN/inf values.
        """
        if not is_photo(query):
            return embedding_tables(self.codec, query)
        feats, kept, skipped = photo_features(self.encoder, [query])
        if not kept:
            reason = skipped.get(0, "unknown")
            if reason == NoFaceFound.reason:
                raise NoFaceFound("no face found in the photo; send a photo with a visible, frontal face")
            raise InvalidRequest(f"the photo cannot be used: {reason} (send JPEG/PNG/PGM bytes of a face photo)")
        return self.codec.query_tables(feats[:1])

    def encode_photos(self, contents: list[bytes]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Encoded photos -> (codes uint8 [n_ok, code_bytes], indices kept, {index: reason skipped})."""
        feats, kept, skipped = photo_features(self.encoder, contents)
        codes = self.codec.encode(feats) if kept else np.zeros((0, self.codec.spec.code_bytes), np.uint8)
        return codes, kept, skipped


def embedding_tables(codec, values) -> np.ndarray:
    """Embedding floats -> lookup tables float32 [1, M, K] of `codec` (a facepq_core.codecs.Codec).

    ConfigError for a wrong length, NaN/inf or values beyond the one embedding policy
    (facepq_core.codecs.check_embeddings), and for an embedding whose tables are not finite.
    """
    emb = np.asarray(values, dtype=np.float32)
    if emb.ndim != 1 or emb.shape[0] != codec.embedding_dim:
        raise ConfigError(f"embedding must have {codec.embedding_dim} values for this model, "
                          f"got {emb.shape[0] if emb.ndim == 1 else emb.shape}")
    return codec.query_tables(emb[None])


def photo_features(encoder, contents: list[bytes]) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Encoded photos -> (trunk features float32 [n_ok, E], positions kept, {position: reason skipped}).

    Reasons are those of facepq_core.errors.PhotoSkipped ('no_face', 'not_an_image', ...).
    """
    crops, kept, skipped = encoder.prepare_photos([bytes(c) for c in contents])
    feats = encoder.trunk_features(crops) if kept else np.zeros((0, encoder.embedding_dim), np.float32)
    return feats, kept, skipped
