"""query_node.face_model.FaceModel's interface without a model, for the coordinator service's tests.

An embedding's M*K values are its lookup table; a "photo" FACE + an M-byte code gets the table
that scores its own code highest (1 per matching sub-code, so a score counts the sub-codes two
faces share); anything else has no usable face. A photo FACES + several codes holds several faces
(faces="all"), each with a box. `calibration` is None unless a test sets one.
"""
from __future__ import annotations

import numpy as np

from facepq_core.codes import CodeSpec
from facepq_core.errors import ConfigError, NoFaceFound
from query_node.face_model import is_photo

M, K = 8, 256
FACE = b"face:"    # one face: FACE + its M-byte code
FACES = b"faces:"  # several faces: FACES + M bytes per face, largest first


class _Codec:
    spec = CodeSpec(M, K)

    def encode(self, embeddings):
        """An embedding's table's row maxima are its code (what the fake's tables score highest)."""
        return np.asarray(embeddings, np.float32).reshape(-1, M, K).argmax(2).astype(np.uint8)


class FakeModel:
    def __init__(self, meta, calibration=None):
        self.meta = meta
        self.fingerprint = meta.fingerprint
        self.calibration = calibration
        self.codec = _Codec()

    def model_meta(self, refine=None):
        assert refine is None, "the fake model's indexes have no refinement tier"
        return self.meta

    @staticmethod
    def table_of(code: bytes) -> np.ndarray:
        table = np.zeros((M, K), np.float32)
        table[np.arange(M), np.frombuffer(code, np.uint8)] = 1.0
        return table

    def tables_for(self, query) -> np.ndarray:
        if is_photo(query):
            faces = self._faces(bytes(query))
            if not faces:
                raise NoFaceFound("no face found in the photo; send a photo with a visible, frontal face")
            return self.table_of(faces[0])[None]  # the largest face
        values = np.asarray(query, np.float32)
        if values.size != M * K:
            raise ConfigError(f"embedding must have {M * K} values for this model, got {values.size}")
        return values.reshape(1, M, K)

    def _faces(self, content: bytes) -> list[bytes]:
        if content.startswith(FACES):
            body = content[len(FACES):]
            return [body[i:i + M] for i in range(0, len(body) - M + 1, M)]
        if content.startswith(FACE):
            return [content[len(FACE):len(FACE) + M].ljust(M, b"\0")]
        return []

    def face_tables(self, photo, min_face_px):
        codes = self._faces(bytes(photo))
        if not codes:
            raise NoFaceFound("no face found in the photo")
        boxes = np.array([[10 * i, 0, 10 * i + 100 - i, 100 - i] for i in range(len(codes))])
        return np.stack([self.table_of(c) for c in codes]), boxes

    def codes_for(self, query) -> np.ndarray:
        if is_photo(query):
            faces = self._faces(bytes(query))
            if not faces:
                raise NoFaceFound("no face found in the photo")
            return np.frombuffer(faces[0], np.uint8).reshape(1, M)
        return self.codec.encode(query)

    def encode_photos(self, contents):
        kept = [i for i, c in enumerate(contents) if c.startswith(FACE) and len(c) == len(FACE) + M]
        skipped = {i: "not_an_image" for i in range(len(contents)) if i not in kept}
        codes = np.array([np.frombuffer(contents[i][len(FACE):], np.uint8) for i in kept], np.uint8).reshape(-1, M)
        return codes, kept, skipped

    def encode_photo_faces(self, contents, min_face_px):
        codes, photo_of, face_of, boxes, skipped = [], [], [], [], {}
        for i, c in enumerate(contents):
            faces = self._faces(bytes(c))
            if not faces:
                skipped[i] = "no_face"
            for f, code in enumerate(faces):
                codes.append(np.frombuffer(code, np.uint8))
                photo_of.append(i)
                face_of.append(f)
                boxes.append([10 * f, 0, 10 * f + 50, 50])
        return (np.array(codes, np.uint8).reshape(-1, M), photo_of, face_of, np.array(boxes).reshape(-1, 4),
                skipped)
