"""Open-set identification: "is this person in the gallery, and who?", scored as DIR at FAR.

A probe either has a *mate* in the gallery (a photo of a person enrolled there) or not
(*non-mated*: a person never enrolled). At a score threshold t

* FAR(t)  = share of non-mated probes whose best gallery score is >= t (a stranger taken for
            somebody: the complaint "a person who is not in the gallery still gets a match");
* DIR(t)  = detection and identification rate: share of mated probes whose best gallery item
            is their own person AND scores >= t.

`dir_at_far` sets t from the non-mated probes for each target FAR (at most FAR of them pass)
and reports DIR there; `dir_at_threshold` reports both rates at a given threshold (e.g. the
one `facepq calibrate` measured on other people, to see how a calibration carries over).
Both take `ProbeOutcomes` made from a score matrix (and several galleries' outcomes pool), so the same evaluation serves float embeddings (`cosine_scores`),
codes (`code_scores`: lookup tables against stored codes, as the query nodes score), and any
protocol that builds gallery / probe sets (bench/open_set.py on LFW; a distractor protocol).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facepq_core.calibration import threshold_at_far
from facepq_core.codes import score_codes
from opqn_model.evaluate import cosine_scores

__all__ = ["ProbeOutcomes", "best_matches", "code_scores", "cosine_scores", "dir_at_far", "dir_at_threshold",
           "float_scores"]


def code_scores(codec, probe_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
    """float32 [P, G]: probes' lookup tables against the gallery's codes (what a search through the nodes scores)."""
    return score_codes(codec.query_tables(probe_emb), codec.encode(gallery_emb), codec.spec)


def float_scores(probe_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
    """float32 [P, G]: cosine similarity of the trunk embeddings (the reference codes are judged against)."""
    return cosine_scores(probe_emb, gallery_emb).astype(np.float32)


def best_matches(scores: np.ndarray, gallery_labels) -> tuple[np.ndarray, np.ndarray]:
    """(best score float32 [P], label of the best gallery item [P]) per probe (ties: the first item)."""
    scores = np.asarray(scores, dtype=np.float32)
    best = np.argmax(scores, axis=1)
    return scores[np.arange(scores.shape[0]), best], np.asarray(gallery_labels)[best]


@dataclass
class ProbeOutcomes:
    """What open-set metrics need of each probe: its best score, whether that best item is its own person, and
    whether its person is in the gallery at all. Outcomes of several galleries (folds) concatenate."""

    best: np.ndarray    # float32 [P]
    right: np.ndarray   # bool [P]: the best gallery item is the probe's person
    mated: np.ndarray   # bool [P]: the probe's person has gallery items

    @classmethod
    def of(cls, scores, probe_labels, gallery_labels) -> ProbeOutcomes:
        """From a score matrix float [P, G] and the labels of probes and gallery items."""
        probe_labels = np.asarray(probe_labels)
        enrolled = set(np.asarray(gallery_labels).tolist())
        mated = np.array([p in enrolled for p in probe_labels.tolist()], dtype=bool)
        best, label = best_matches(scores, gallery_labels)
        return cls(best, label == probe_labels, mated)

    @classmethod
    def concat(cls, parts) -> ProbeOutcomes:
        parts = list(parts)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("best", "right", "mated")))


def dir_at_threshold(outcomes: ProbeOutcomes, threshold: float) -> dict:
    """DIR and FAR at one score threshold (accept when the best score >= threshold).

    Returns {"threshold", "dir", "far", "n_mated", "n_nonmated"}; a rate with no probes is NaN.
    """
    o = outcomes
    passed = o.best >= np.float32(threshold)
    n_m, n_n = int(o.mated.sum()), int((~o.mated).sum())
    return {"threshold": float(threshold), "n_mated": n_m, "n_nonmated": n_n,
            "dir": float((passed & o.right & o.mated).sum() / n_m) if n_m else math.nan,
            "far": float((passed & ~o.mated).sum() / n_n) if n_n else math.nan}


def dir_at_far(outcomes: ProbeOutcomes, fars=(1e-2, 1e-3)) -> dict:
    """Open-set identification rates of probes (`ProbeOutcomes.of(scores, probe_labels, gallery_labels)`).

    A probe whose person has no gallery item is non-mated; distractors are gallery items of people no
    probe is. For each target FAR the threshold lets at most floor(far * non-mated) non-mated probes pass;
    a target below 1 / non-mated probes is reported with `measurable` False (its threshold is just above
    the highest non-mated score, so none passes).
    Returns:
        {"rank1": closed-set identification rate of the mated probes, "n_mated", "n_nonmated",
         "points": [{"far", "threshold", "dir", "measured_far", "measurable"} ...]}.
    """
    o = outcomes
    n_m, n_n = int(o.mated.sum()), int((~o.mated).sum())
    if not n_m or not n_n:
        raise ValueError(f"open-set identification needs mated and non-mated probes (got {n_m} and {n_n})")
    nonmated_desc = np.sort(o.best[~o.mated])[::-1]
    points = []
    for far in fars:
        t = threshold_at_far(nonmated_desc, far)
        at = dir_at_threshold(o, t)
        points.append({"far": float(far), "threshold": t, "dir": at["dir"], "measured_far": at["far"],
                       "measurable": far * n_n >= 1})
    return {"rank1": float((o.right & o.mated).sum() / n_m), "n_mated": n_m, "n_nonmated": n_n, "points": points}
