"""From the nodes' merged top faces to what a person asked: operating points, similarities, people.

Pure functions the coordinator service applies after the fan-out, so the gRPC and HTTP edges
answer the same way:

* `operating_point`: a search's or verification's `far` (through the model's calibration,
  facepq_core.calibration) or raw `threshold` -> the score a hit must reach;
* `answer`: one query's hits with their calibrated similarity, cut at the operating point
  (`unknown` when nothing reaches it: "this person is not in the gallery"), and, for
  group_by=person, the best k people each with their best faces;
* `gather`: how many faces to ask the nodes for, asking again for more when k people are not
  yet among them.

`far` is a per-comparison rate: the share of (stranger, gallery face) pairs that pass. A stranger
searched against N gallery faces passes when any of the N does, at most about N x far (README,
"Choosing an operating point").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from facepq_core.errors import InvalidRequest, NotCalibrated
from facepq_core.expansion import Expansion
from query_node.merge import Hit
from query_node.wire import MAX_TOP_K

GROUP_BY = ("face", "person")
FACE_SELECTION = ("largest", "all")
DEFAULT_FACES_PER_PERSON = 3
MAX_FACES_PER_PERSON = 100
DEFAULT_MIN_FACE_PX = 40
# group_by=person asks the nodes for k * faces_per_person * this many faces first, then 4x more
# while fewer than k people are among them (capped at MAX_TOP_K faces).
PERSON_FETCH_FACTOR = 2


@dataclass(frozen=True)
class SearchOptions:
    """How a search answers, besides k.

    time_remaining: seconds left of the caller's deadline (None = the service's own timeout).
    far / threshold: the operating point (at most one; None = every hit, no `unknown`).
    group_by: "face" (the top k faces) or "person" (the top k people, `faces_per_person` faces each).
    faces: for a photo, "largest" (its largest face) or "all" (every face at least `min_face_px` wide).
    refine_candidates: candidates per shard a two-stage search re-scores (None = the default; 0 = the first
    pass alone); ignored on an index without a refinement tier.
    expansion: α-query expansion (n top hits, alpha); None or n = 0: none.
    nprobe: on an index with a cell partition, the cells each shard scans (0 = all: exhaustive).
    """

    time_remaining: float | None = None
    refine_candidates: int | None = None
    expansion: Expansion | None = None    # αQE (checked by the service: facepq_core.expansion.check_expansion)
    nprobe: int = 0                       # on an index with a cell partition: cells each shard scans (0: all)
    far: float | None = None
    threshold: float | None = None
    group_by: str = "face"
    faces_per_person: int = DEFAULT_FACES_PER_PERSON
    faces: str = "largest"
    min_face_px: int = DEFAULT_MIN_FACE_PX

    def check(self) -> None:
        """InvalidRequest for values no search can use (before any work)."""
        if self.group_by not in GROUP_BY:
            raise InvalidRequest(f"group_by must be one of {', '.join(GROUP_BY)}, got {self.group_by!r}")
        if self.faces not in FACE_SELECTION:
            raise InvalidRequest(f"faces must be one of {', '.join(FACE_SELECTION)}, got {self.faces!r}")
        if not 1 <= self.faces_per_person <= MAX_FACES_PER_PERSON:
            raise InvalidRequest(f"faces_per_person must be in 1..{MAX_FACES_PER_PERSON}, got {self.faces_per_person}")
        if self.nprobe < 0:
            raise InvalidRequest(f"nprobe must be >= 0 (0: every cell), got {self.nprobe}")
        if not 0 <= self.min_face_px <= 10_000:
            raise InvalidRequest(f"min_face_px must be in 0..10000, got {self.min_face_px}")


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float          # accept a score >= threshold
    far: float | None = None  # the per-comparison false-accept rate it was chosen for (None: a raw threshold)


@dataclass
class PersonMatch:
    """One person of a group_by=person answer: their best faces, best first."""

    person: str
    faces: list[Hit]
    score: float = 0.0                 # the best face's
    similarity: float | None = None    # the best face's


@dataclass
class FaceAnswer:
    """One query face's answer."""

    hits: list[Hit]
    people: list[PersonMatch] = field(default_factory=list)
    unknown: bool = False
    box: tuple[int, int, int, int] | None = None


def operating_point(calibration, far: float | None, threshold: float | None,
                    default_far: float | None = None) -> OperatingPoint | None:
    """The score threshold of a request: from `far` (needs a calibration), a raw `threshold`, or `default_far`
    when the model is calibrated and neither is given; None when there is none.

    Raises:
        InvalidRequest: both given, a far outside (0, 1) or outside what was measured, a non-finite threshold.
        NotCalibrated: a far for a model without calibration.
    """
    if far is not None and threshold is not None:
        raise InvalidRequest("give far or threshold, not both")
    if threshold is not None:
        if not math.isfinite(threshold):
            raise InvalidRequest(f"threshold must be a finite score, got {threshold}")
        return OperatingPoint(float(threshold))
    if far is None:
        if default_far is None or calibration is None:
            return None
        far = default_far
    if calibration is None:
        raise NotCalibrated("this model has no calibration, so a false-accept rate means no score: run `facepq "
                            "calibrate --model MODEL --data PHOTOS` (people not used in training) and restart the "
                            "coordinator, or give a raw score threshold")
    return OperatingPoint(calibration.threshold_for(far), far)


def with_similarity(hits: list[Hit], calibration) -> list[Hit]:
    """The hits with `similarity` set from the calibration (unchanged without one)."""
    if calibration is None or not hits:
        return hits
    sims = calibration.similarity([h.score for h in hits])
    return [dataclasses.replace(h, similarity=float(s)) for h, s in zip(hits, sims)]


def group_by_person(hits: list[Hit], k: int, faces_per_person: int) -> list[PersonMatch]:
    """The first k people of best-first `hits`, each with up to `faces_per_person` of their faces, best first.

    A person's faces are their best among `hits`: the ranking of people is exact (a person's best face is
    the first of theirs), and a person with fewer faces here than asked may have more below the cut.
    """
    people: dict[str, PersonMatch] = {}
    for h in hits:
        match = people.get(h.person)
        if match is None:
            if len(people) == k:
                continue
            match = people[h.person] = PersonMatch(h.person, [], h.score, h.similarity)
        if len(match.faces) < faces_per_person:
            match.faces.append(h)
    return list(people.values())


def answer(hits: list[Hit], k: int, options: SearchOptions, calibration, point: OperatingPoint | None,
           box=None) -> FaceAnswer:
    """One query's answer from its merged best-first hits (possibly more than k: see `gather`)."""
    hits = with_similarity(hits, calibration)
    if point is not None:
        hits = [h for h in hits if h.score >= point.threshold]
    if options.group_by == "person":
        people = group_by_person(hits, k, options.faces_per_person)
        kept = [f for p in people for f in p.faces]
    else:
        people, kept = [], hits[:k]
    return FaceAnswer(kept, people, unknown=point is not None and not kept, box=box)


def first_fetch(k: int, options: SearchOptions) -> int:
    """Faces to ask the nodes for first."""
    if options.group_by == "face":
        return k
    return min(MAX_TOP_K, k * options.faces_per_person * PERSON_FETCH_FACTOR)


def need_more(hits_per_query: list[list[Hit]], k: int, fetched: int, options: SearchOptions,
              point: OperatingPoint | None) -> bool:
    """True when a group_by=person answer may lack people that more faces would bring."""
    if options.group_by != "person" or fetched >= MAX_TOP_K:
        return False
    for hits in hits_per_query:
        if len(hits) < fetched:          # the index has no more faces
            continue
        if point is not None and hits and hits[-1].score < point.threshold:
            continue                     # every further face is below the operating point
        if len({h.person for h in hits}) < k:
            return True
    return False


def gather(search, k: int, options: SearchOptions, point: OperatingPoint | None):
    """Call `search(fetch)` (-> an object with `.hits`: best-first hits per query) until the answer is complete."""
    fetch = first_fetch(k, options)
    while True:
        result = search(fetch)
        if not need_more(result.hits, k, fetch, options, point):
            return result
        fetch = min(MAX_TOP_K, fetch * 4)
