"""Photos -> aligned face crops: the one decode -> convert -> align step, and the loop its users share.

A photo that cannot be used raises `PhotoSkipped` (facepq_core.errors) with a short `reason`
('no_face', 'truncated', 'not_an_image', ...); that reason is what run summaries count
(`SkipCounter`), what Enrol reports per photo, and what the ingest job's read stage writes
in its `skip` column. Training, evaluation, the feature cache, ingest and the coordinator
all align photos through `align_photo`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facepq_core.errors import PhotoSkipped
from opqn_model.images import load_image_with_note, read_bytes


def align_photo(source, pipeline) -> tuple[np.ndarray, str | None]:
    """A photo (path, file bytes, or an already decoded RGB uint8 array) -> (crop uint8 [S, S, 3], note).

    `note` names the conversion applied while decoding (grey, 16-bit, CMYK, alpha...), None for plain RGB.
    Raises PhotoSkipped (BadImage with its reason, or NoFaceFound) for a photo without a usable face.
    """
    if isinstance(source, np.ndarray):
        return pipeline(source), None
    content, _ = read_bytes(source)
    image, note = load_image_with_note(content)
    return pipeline(image), note


def align_faces(source, pipeline, min_face_px: int = 0, max_faces: int = 32):
    """Every face of one photo at least `min_face_px` wide (FacePipeline.faces), largest first, at most `max_faces`.

    Returns (crops uint8 [F, S, S, 3], boxes int [F, 4] as left, top, right, bottom in the photo's pixels).
    Raises PhotoSkipped (BadImage, or NoFaceFound when no face is large enough).
    """
    if isinstance(source, np.ndarray):
        image = source
    else:
        content, _ = read_bytes(source)
        image, _ = load_image_with_note(content)
    found = pipeline.faces(image, min_face_px)[:max_faces]
    return np.stack([crop for crop, _ in found]), np.array([box for _, box in found], dtype=np.int64)


@dataclass
class AlignedPhotos:
    """What `align_photos` made of a list of photos, by input position."""

    crops: np.ndarray                                   # uint8 [n_kept, S, S, 3]
    kept: list[int] = field(default_factory=list)       # input positions of the crops, in order
    skipped: dict[int, str] = field(default_factory=dict)  # input position -> reason
    notes: dict[int, str] = field(default_factory=dict)    # input position -> conversion applied (kept photos)

    def counter(self, names):
        """A SkipCounter of these photos, with `names[i]` (e.g. paths) as examples."""
        from opqn_model.datasets import SkipCounter

        counter = SkipCounter()
        for i, reason in self.skipped.items():
            counter.add(reason, str(names[i]))
        for i, note in self.notes.items():
            counter.add_note(note, str(names[i]))
        return counter


def align_photos(sources, pipeline, progress: bool = False, desc: str = "align") -> AlignedPhotos:
    """`align_photo` over `sources` (paths, bytes or decoded arrays); unusable photos are skipped with their reason."""
    from tqdm import tqdm

    crops, kept, skipped, notes = [], [], {}, {}
    for i, source in enumerate(tqdm(sources, desc=desc, unit="photo", disable=not progress, leave=False)):
        try:
            crop, note = align_photo(source, pipeline)
        except PhotoSkipped as exc:
            skipped[i] = exc.reason
            continue
        crops.append(crop)
        kept.append(i)
        if note:
            notes[i] = note
    size = pipeline.size
    return AlignedPhotos(np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8), kept, skipped, notes)
