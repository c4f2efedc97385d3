"""1:1 verification: is face a the same person as face b, or as an enrolled person?

`a` (a photo's largest face, or an embedding) is scored exactly as a search query: its lookup
tables against `b`'s stored code (a photo's largest face or an embedding, encoded as the index
would store it) or, for an enrolled person, against the codes of every live face of theirs,
the best counting. So a verification score is a search score, and the calibration that gives
searches their operating points (facepq calibrate: code scores against query tables) gives
verification its threshold, similarity and decision.

The operating point is `far` (a calibrated model; default 0.001) or a raw `threshold`; a model
without calibration needs the threshold (NotCalibrated otherwise).

Against a person the coordinator reads that person's codes from the index (indexer.people.person_codes,
the version current now): the person's rows are found by scanning the name column of every
segment, so a verification costs a pass over the names, not over the codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facepq_core.codes import score_codes
from facepq_core.errors import InvalidRequest
from query_node.answers import operating_point

DEFAULT_FAR = 1e-3


@dataclass
class VerifyResult:
    score: float
    same: bool                     # score >= threshold
    threshold: float
    far: float | None              # the operating point's per-comparison false-accept rate (None: a raw threshold)
    similarity: float | None       # calibrated models only
    best_face_id: int = 0          # against a person: the face that scored best
    faces_compared: int = 1


def verify(model, store, a, b=None, person_b: str | None = None, far: float | None = None,
           threshold: float | None = None) -> VerifyResult:
    """Score `a` against `b` or `person_b` and decide at the operating point.

    Args:
        model: query_node.face_model.FaceModel.  store: indexer.store.IndexStore (for `person_b`).
        a, b: photo bytes or embedding values.  person_b: an enrolled person's name (instead of b).
    Raises:
        InvalidRequest: a or b missing (or b and person_b both given); bad photos or embeddings as in search.
        NoFaceFound: no face in a photo.  NotFound: `person_b` has no live face.
        NotCalibrated: no threshold given and the model has no calibration.
    """
    if a is None:
        raise InvalidRequest("send photo_a or embedding_a: the face to verify")
    if (b is None) == (person_b is None):
        raise InvalidRequest("send exactly one of photo_b, embedding_b or person_b: what to verify against")
    calibration = getattr(model, "calibration", None)
    if threshold is None and far is None and calibration is None:
        from facepq_core.errors import NotCalibrated

        raise NotCalibrated("verification needs an operating point: give a raw score threshold, or run `facepq "
                            "calibrate --model MODEL --data PHOTOS` so a false-accept rate (default 0.001) can be used")
    point = operating_point(calibration, far, threshold, default_far=DEFAULT_FAR)
    tables = model.tables_for(a)
    if person_b is not None:
        from indexer.people import person_codes

        ids, codes = person_codes(store, person_b)
    else:
        ids, codes = np.zeros(1, np.uint64), model.codes_for(b)
    scores = score_codes(tables[0], codes, model.codec.spec)
    best = int(np.argmax(scores))
    score = float(scores[best])
    similarity = None if calibration is None else float(calibration.similarity(score))
    return VerifyResult(score=score, same=score >= point.threshold, threshold=point.threshold, far=point.far,
                        similarity=similarity, best_face_id=int(ids[best]) if person_b is not None else 0,
                        faces_compared=len(ids))
