"""Score calibration of one model: which score to trust, and what a score means in [0, 1].

Scores of different codecs and models mean different things (OPQN scores are sums of
log-probabilities, binary codes minus a Hamming distance), and a score alone says nothing about
whether two faces are the same person. `fit_calibration` measures it: given the scores of
*genuine* pairs (two photos of one person) and *impostor* pairs (two people), computed as the
query nodes compute them (a query's lookup tables against a stored code), it finds

* for each target false-accept rate (FAR) the threshold t such that at most FAR of the impostor
  pairs score >= t, with the true-accept rate (TAR: genuine pairs >= t) measured there;
* the impostor tail (`far_curve`): thresholds at log-spaced FARs, so any FAR between the
  largest and the smallest measured maps to a threshold (interpolated in log FAR);
* a calibrated similarity in [0, 1]: a logistic function of the score fitted to the two sets
  with equal weight, i.e. the probability that the faces are one person when same and
  different are a priori equally likely. It only re-labels scores: its order is the score's.

A calibration belongs to one model: it records the model's fingerprint and codec, and
`Calibration.load` refuses a file made for another model. It is stored beside the checkpoint
(opqn_model.calibrate writes it; `facepq calibrate`), as versioned JSON (`format`).

FAR is estimated from counts: a target below 1 / impostor pairs cannot be measured and is not
stored (more people or photos measure it).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from facepq_core.errors import CheckpointError, InvalidRequest

CALIBRATION_FORMAT = "facepq-calibration/1"
DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
CURVE_POINTS_PER_DECADE = 8
FIT_MAX_IMPOSTORS = 200_000  # impostor pairs the logistic fit sees at most (a seeded sample)


@dataclass(frozen=True)
class OperatingPoint:
    """A target false-accept rate, the score threshold that meets it, and the true-accept rate there."""

    far: float        # the target
    threshold: float  # accept when score >= threshold
    tar: float        # genuine pairs accepted at the threshold
    measured_far: float  # impostor pairs accepted at the threshold (<= far)


@dataclass(frozen=True)
class Calibration:
    """What `fit_calibration` measured for one model (see the module docstring)."""

    model_fingerprint: str
    codec: str
    operating_points: tuple[OperatingPoint, ...]
    far_curve: tuple[tuple[float, float], ...]   # (far, threshold), far decreasing, threshold increasing
    logistic: tuple[float, float]                # similarity = 1 / (1 + exp(-(a * score + b)))
    genuine_pairs: int
    impostor_pairs: int
    people: int = 0
    photos: int = 0
    source: str = ""                             # what it was measured on (the data folder)
    created_at: str = ""
    extra: dict = field(default_factory=dict)

    # ---- use ---------------------------------------------------------------------------------
    @property
    def far_range(self) -> tuple[float, float]:
        """(smallest, largest) FAR a threshold can be given for."""
        return self.far_curve[-1][0], self.far_curve[0][0]

    def threshold_for(self, far: float) -> float:
        """The score threshold of a target FAR (interpolated in log FAR along the measured curve).

        Raises InvalidRequest for a FAR outside (0, 1) or outside what was measured.
        """
        if not (isinstance(far, (int, float)) and 0 < far < 1):
            raise InvalidRequest(f"far must be a number in (0, 1), e.g. 0.001, got {far!r}")
        low, high = self.far_range
        if far < low * (1 - 1e-9):
            raise InvalidRequest(f"far {far:g} is below what this model's calibration measured ({low:g}, from "
                                 f"{self.impostor_pairs} impostor pairs); calibrate on more people, or choose a "
                                 f"far >= {low:g}")
        fars = np.log10([f for f, _ in self.far_curve])
        thresholds = np.array([t for _, t in self.far_curve], dtype=np.float64)
        if far >= high:
            return float(thresholds[0])
        # far_curve's fars decrease: np.interp wants increasing x
        return float(np.interp(math.log10(far), fars[::-1], thresholds[::-1]))

    def similarity(self, scores) -> np.ndarray:
        """Calibrated similarity in [0, 1] of raw scores (float array of any shape)."""
        a, b = self.logistic
        z = a * np.asarray(scores, dtype=np.float64) + b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def far_at(self, score: float) -> float:
        """The impostor share at or above `score` along the measured curve (clamped to its ends)."""
        fars = np.log10([f for f, _ in self.far_curve])
        thresholds = np.array([t for _, t in self.far_curve], dtype=np.float64)
        return float(10 ** np.interp(score, thresholds, fars))

    # ---- storage -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = CALIBRATION_FORMAT
        d["operating_points"] = [asdict(p) for p in self.operating_points]
        d["far_curve"] = [list(p) for p in self.far_curve]
        d["logistic"] = list(self.logistic)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration") -> Calibration:
        if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"{where} is not a facepq calibration of format {CALIBRATION_FORMAT} (found "
                                  f"{found!r}); run `facepq calibrate` again")
        try:
            points = tuple(OperatingPoint(**{k: float(v) for k, v in p.items()}) for p in d["operating_points"])
            curve = tuple((float(f), float(t)) for f, t in d["far_curve"])
            a, b = (float(v) for v in d["logistic"])
            cal = cls(model_fingerprint=str(d["model_fingerprint"]), codec=str(d["codec"]), operating_points=points,
                      far_curve=curve, logistic=(a, b), genuine_pairs=int(d["genuine_pairs"]),
                      impostor_pairs=int(d["impostor_pairs"]), people=int(d.get("people", 0)),
                      photos=int(d.get("photos", 0)), source=str(d.get("source", "")),
                      created_at=str(d.get("created_at", "")), extra=dict(d.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} is malformed ({exc!r}); run `facepq calibrate` again") from None
        if not curve or not all(math.isfinite(v) for p in curve for v in p) or not (math.isfinite(a) and
                                                                                     math.isfinite(b)):
            raise CheckpointError(f"{where} has an empty or non-finite curve; run `facepq calibrate` again")
        return cal

    def save(self, path: str | os.PathLike) -> None:
        from facepq_core.atomic import write_bytes_atomic

        write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None) -> Calibration:
        """Read a calibration file; with `fingerprint`, refuse one made for another model (CheckpointError)."""
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read())
        except OSError as exc:
            raise CheckpointError(f"cannot read the calibration {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise CheckpointError(f"the calibration {path} is not valid JSON ({exc}); run `facepq calibrate` "
                                  f"again") from None
        cal = cls.from_dict(d, str(path))
        if fingerprint is not None and cal.model_fingerprint != fingerprint:
            raise CheckpointError(f"the calibration {path} was measured for model {cal.model_fingerprint}, not "
                                  f"{fingerprint}: its thresholds mean nothing for this model; run `facepq calibrate "
                                  f"--model ...` for it (or remove the file)")
        return cal


# ---- fitting -------------------------------------------------------------------------------------
def threshold_at_far(impostor_desc: np.ndarray, far: float) -> float:
    """The smallest float32 threshold t with at most floor(far * n) impostor scores >= t.

    Args:
        impostor_desc: float32 impostor scores sorted in decreasing order.
    """
    n = impostor_desc.shape[0]
    allowed = math.floor(far * n + 1e-9)
    if allowed >= n:
        return float(np.nextafter(np.float32(impostor_desc[-1]), np.float32(-np.inf)))
    # Just above the (allowed+1)-th highest score: it and everything tied with it are refused.
    return float(np.nextafter(np.float32(impostor_desc[allowed]), np.float32(np.inf)))


def _logistic_fit(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(a, b) of P(same | s) = 1 / (1 + exp(-(a s + b))), both classes weighted equally (Newton's method)."""
    x = np.concatenate([genuine, impostor]).astype(np.float64)
    y = np.concatenate([np.ones(genuine.size), np.zeros(impostor.size)])
    w = np.concatenate([np.full(genuine.size, 0.5 / genuine.size), np.full(impostor.size, 0.5 / impostor.size)])
    mu, sd = float(x.mean()), float(x.std()) or 1.0
    z = (x - mu) / sd
    a, b = 1.0, 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * z + b, -60, 60)))
        g = np.array([np.sum(w * (p - y) * z), np.sum(w * (p - y))]) + 1e-6 * np.array([a, 0.0])
        r = w * p * (1 - p)
        h = np.array([[np.sum(r * z * z) + 1e-6, np.sum(r * z)], [np.sum(r * z), np.sum(r) + 1e-12]])
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a / sd), float(b - a * mu / sd)


def fit_calibration(genuine, impostor, model_fingerprint: str, codec: str, fars=DEFAULT_FARS, seed: int = 0,
                    **info) -> Calibration:
    """Measure thresholds, TARs, the impostor tail and the similarity mapping from pair scores.

    Args:
        genuine: scores of pairs of one person (float, any shape; flattened).
        impostor: scores of pairs of two people.
        fars: target false-accept rates; those below 1 / len(impostor) cannot be measured and are
            left out (listed in `extra["unmeasurable_fars"]`).
        info: people, photos, source, created_at (recorded as they are).
    Raises:
        InvalidRequest: no genuine or no impostor pairs, or non-finite scores.
    """
    gen = np.asarray(genuine, dtype=np.float32).reshape(-1)
    imp = np.asarray(impostor, dtype=np.float32).reshape(-1)
    if gen.size == 0 or imp.size == 0:
        raise InvalidRequest(f"calibration needs genuine and impostor pairs (got {gen.size} and {imp.size}): "
                             f"at least two people with two usable photos each")
    if not (np.isfinite(gen).all() and np.isfinite(imp).all()):
        raise InvalidRequest("calibration scores contain NaN or infinite values")
    imp_desc = np.sort(imp)[::-1]
    gen_sorted = np.sort(gen)
    min_far = 1.0 / imp.size
    points, skipped = [], []
    for far in sorted({float(f) for f in fars}, reverse=True):
        if far < min_far:
            skipped.append(far)
            continue
        t = threshold_at_far(imp_desc, far)
        tar = 1.0 - np.searchsorted(gen_sorted, np.float32(t), side="left") / gen.size
        measured = float(np.count_nonzero(imp_desc >= np.float32(t)) / imp.size)
        points.append(OperatingPoint(far=far, threshold=t, tar=float(tar), measured_far=measured))
    decades = max(1, math.ceil(-math.log10(min_far) * CURVE_POINTS_PER_DECADE))
    curve_fars = sorted({min(0.5, 10 ** (-i / CURVE_POINTS_PER_DECADE)) for i in range(decades + 1)}
                        | {min_far}, reverse=True)
    curve = tuple((f, threshold_at_far(imp_desc, f)) for f in curve_fars if f >= min_far)
    rng = np.random.default_rng(seed)
    fit_imp = imp if imp.size <= FIT_MAX_IMPOSTORS else rng.choice(imp, FIT_MAX_IMPOSTORS, replace=False)
    extra = dict(info.pop("extra", {}) or {})
    if skipped:
        extra["unmeasurable_fars"] = skipped
    return Calibration(model_fingerprint=str(model_fingerprint), codec=str(codec), operating_points=tuple(points),
                       far_curve=curve, logistic=_logistic_fit(gen, fit_imp), genuine_pairs=int(gen.size),
                       impostor_pairs=int(imp.size), extra=extra, **info)


def pair_scores(scores: np.ndarray, query_labels, gallery_labels, same_item=None) -> tuple[np.ndarray, np.ndarray]:
    """Split a score matrix into genuine and impostor pair scores.

    Args:
        scores: float [Q, G] (query i against gallery item j).
        query_labels, gallery_labels: person of each query / gallery item.
        same_item: optional bool [Q, G], True where query and gallery item are the same photo
            (left out: a photo against itself is no pair).
    Returns:
        (genuine float32 [n_g], impostor float32 [n_i]).
    """
    q = np.asarray(query_labels)
    g = np.asarray(gallery_labels)
    same = q[:, None] == g[None, :]
    keep = np.ones_like(same) if same_item is None else ~np.asarray(same_item, dtype=bool)
    scores = np.asarray(scores, dtype=np.float32)
    return scores[same & keep], scores[~same & keep]
