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

    @property
    def calibration(self):
        """facepq_core.calibration.Calibration of the model (`facepq calibrate`), None when not measured."""
        return getattr(self.encoder, "calibration", None)

    def model_meta(self, refine=None):
        """indexer.manifest.ModelMeta of this model (what an index it writes into must hold), with the
        index's refinement tier `refine` (facepq_core.refine.RefineTier) when it has one."""
        from indexer.manifest import ModelMeta

        return ModelMeta.from_encoder(self.encoder, refine)

    def refine_codec(self, tier):
        """This model's codec for an index's refinement tier (ConfigError when it does not offer it)."""
        from facepq_core.errors import IndexFormatError
        from facepq_core.refine import RefineTier

        codec = self.encoder.refine_codec(tier.kind)
        if RefineTier.of(tier.kind, codec) != tier:
            raise IndexFormatError(f"the index's refinement tier {tier.to_dict()} is not this model's "
                                   f"{RefineTier.of(tier.kind, codec).to_dict()}")
        return codec

    def tables_for(self, query) -> np.ndarray:
        """A photo (bytes) or an embedding (floats) -> lookup tables float32 [1, M, K].

        Raises:
            NoFaceFound: the photo decoded but holds no face.
            InvalidRequest: the photo is not a usable image; ConfigError: an embedding of the wrong
                length or with NaN/inf values.
        """
        if not is_photo(query):
            return embedding_tables(self.codec, query)
        return self.codec.query_tables(self._photo_embedding(query))

    def refined_tables_for(self, query, tier) -> tuple[np.ndarray, np.ndarray]:
        """A two-stage search's tables: (lookup tables float32 [1, M, K], refinement tables float32 [1, a, b]
        of the index's tier), from one trunk pass. Errors as `tables_for`."""
        refine = self.refine_codec(tier)
        if not is_photo(query):
            return embedding_tables(self.codec, query), embedding_tables(refine, query)
        feats = self._photo_embedding(query)
        return self.codec.query_tables(feats), refine.query_tables(feats)

    def expansion_start(self, query, tier=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The first round of an αQE search, from one trunk pass: (lookup tables float32 [1, M, K], the
        tier's refinement tables [1, a, b] or None when `tier` is None, the query's vector float32 [1, D]
        in the codec's expansion space). Errors as `tables_for`; ConfigError for a codec without expansion."""
        feats = self._photo_embedding(query) if is_photo(query) else checked_embedding(self.codec, query)
        refine = self.refine_codec(tier).query_tables(feats) if tier is not None else None
        return self.codec.query_tables(feats), refine, self.codec.expansion_vector(feats)

    def expanded_tables(self, vector: np.ndarray, codes: list[bytes], alpha: float) -> np.ndarray:
        """Lookup tables float32 [1, M, K] of the query `vector` [1, D] expanded with the stored `codes` of its
        top hits (facepq_core.expansion.alpha_expand over codec.reconstruct)."""
        from facepq_core.expansion import alpha_expand

        stored = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), self.codec.code_bytes)
        expanded = alpha_expand(vector[0], self.codec.reconstruct(stored), alpha)
        return self.codec.tables_from_vector(expanded[None])

    def _photo_embedding(self, photo) -> np.ndarray:
        """The embedding float32 [1, E] of a query photo's face (NoFaceFound / InvalidRequest otherwise)."""
        feats, kept, skipped = photo_features(self.encoder, [photo])
        if not kept:
            _refuse(skipped.get(0, "unknown"))
        return feats[:1]

    def face_tables(self, photo: bytes, min_face_px: int) -> tuple[np.ndarray, np.ndarray]:
        """Every face of a photo at least `min_face_px` wide -> (tables float32 [F, M, K], boxes int [F, 4]).

        Raises NoFaceFound (no face that large) or InvalidRequest (not a usable image) like `tables_for`.
        """
        from facepq_core.errors import PhotoSkipped

        try:
            feats, boxes = photo_face_features(self.encoder, bytes(photo), min_face_px)
        except NoFaceFound:
            raise  # its message names the size asked for
        except PhotoSkipped as exc:
            _refuse(exc.reason)
        return self.codec.query_tables(feats), boxes

    def codes_for(self, query) -> np.ndarray:
        """A photo (its largest face) or an embedding -> its stored code uint8 [1, code_bytes] (verification)."""
        if not is_photo(query):
            embedding_tables(self.codec, query)  # the one check of an embedding's length and values
            return self.codec.encode(np.asarray(query, dtype=np.float32)[None])
        codes, kept, skipped = self.encode_photos([query])
        if not kept:
            _refuse(skipped.get(0, "unknown"))
        return codes

    def encode_photo_faces(self, contents: list[bytes], min_face_px: int):
        """Every face of each photo -> (codes uint8 [F, code_bytes], photo position per face, face number within
        its photo per face, boxes int [F, 4], {photo position: reason skipped})."""
        from facepq_core.errors import PhotoSkipped

        feats, photo_of, face_of, boxes, skipped = [], [], [], [], {}
        for i, content in enumerate(contents):
            try:
                f, b = photo_face_features(self.encoder, bytes(content), min_face_px)
            except PhotoSkipped as exc:
                skipped[i] = exc.reason
                continue
            feats.append(f)
            boxes.append(b)
            photo_of += [i] * len(f)
            face_of += list(range(len(f)))
        if not feats:
            return np.zeros((0, self.codec.spec.code_bytes), np.uint8), [], [], np.zeros((0, 4), np.int64), skipped
        return self.codec.encode(np.concatenate(feats)), photo_of, face_of, np.concatenate(boxes), skipped

    def encode_photos(self, contents: list[bytes]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Encoded photos -> (codes uint8 [n_ok, code_bytes], indices kept, {index: reason skipped})."""
        feats, kept, skipped = photo_features(self.encoder, contents)
        codes = self.codec.encode(feats) if kept else np.zeros((0, self.codec.spec.code_bytes), np.uint8)
        return codes, kept, skipped

    def encode_photos_refined(self, contents: list[bytes], tier):
        """Encoded photos -> (codes, refinement rows uint8 [n_ok, tier bytes], indices kept, {index: reason}) for
        an index with refinement tier `tier`."""
        refine = self.refine_codec(tier)
        feats, kept, skipped = photo_features(self.encoder, contents)
        codes = self.codec.encode(feats) if kept else np.zeros((0, self.codec.spec.code_bytes), np.uint8)
        rows = refine.encode(feats) if kept else np.zeros((0, refine.code_bytes), np.uint8)
        return codes, rows, kept, skipped


def _refuse(reason: str):
    """The error of a query photo skipped for `reason` (a PhotoSkipped reason)."""
    if reason == NoFaceFound.reason:
        raise NoFaceFound("no face found in the photo; send a photo with a visible, frontal face")
    raise InvalidRequest(f"the photo cannot be used: {reason} (send JPEG/PNG/PGM bytes of a face photo)")


def embedding_tables(codec, values) -> np.ndarray:
    """Embedding floats -> lookup tables float32 [1, M, K] of `codec` (a facepq_core.codecs.Codec).

    ConfigError for a wrong length, NaN/inf or values beyond the one embedding policy
    (facepq_core.codecs.check_embeddings), and for an embedding whose tables are not finite.
    """
    return codec.query_tables(checked_embedding(codec, values))


def checked_embedding(codec, values) -> np.ndarray:
    """Embedding floats -> float32 [1, E] of `codec`'s length (ConfigError otherwise; values are checked by the
    codec's own calls)."""
    emb = np.asarray(values, dtype=np.float32)
    if emb.ndim != 1 or emb.shape[0] != codec.embedding_dim:
        raise ConfigError(f"embedding must have {codec.embedding_dim} values for this model, "
                          f"got {emb.shape[0] if emb.ndim == 1 else emb.shape}")
    return emb[None]


def photo_features(encoder, contents: list[bytes]) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Encoded photos -> (trunk features float32 [n_ok, E], positions kept, {position: reason skipped}).

    Reasons are those of facepq_core.errors.PhotoSkipped ('no_face', 'not_an_image', ...).
    """
    crops, kept, skipped = encoder.prepare_photos([bytes(c) for c in contents])
    feats = encoder.trunk_features(crops) if kept else np.zeros((0, encoder.embedding_dim), np.float32)
    return feats, kept, skipped


def photo_face_features(encoder, content: bytes, min_face_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Every face of one photo at least `min_face_px` wide -> (features float32 [F, E], boxes int [F, 4]).

    Raises the photo's PhotoSkipped (BadImage; NoFaceFound when no face is that large).
    """
    from opqn_model.photos import align_faces

    crops, boxes = align_faces(content, encoder.pipeline, min_face_px)
    return encoder.trunk_features(crops), boxes
