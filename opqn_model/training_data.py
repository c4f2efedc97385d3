"""Turn photo records into model inputs: aligned crops (trainable trunks) or cached embeddings (frozen trunks).

Both paths skip unusable photos with a counted reason; one bad file never ends a run.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from facepq_core.errors import BadImage, DataError, NoFaceFound

log = logging.getLogger(__name__)


def load_crops(records, pipeline, progress: bool = True):
    """Read and align photos.

    Returns (crops uint8 [n_ok, S, S, 3], kept records, SkipCounter).
    """
    from opqn_model.datasets import SkipCounter
    from opqn_model.images import load_image_with_note

    skips = SkipCounter()
    crops, kept = [], []
    for rec in tqdm(records, desc="align", unit="photo", disable=not progress, leave=False):
        try:
            image, note = load_image_with_note(rec.path)
            crops.append(pipeline(image))
            kept.append(rec)
            if note:
                skips.add_note(note, rec.path)
        except NoFaceFound:
            skips.add("no_face", rec.path)
        except BadImage as exc:
            skips.add(exc.reason, rec.path)
    size = pipeline.size
    return (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)), kept, skips


def model_inputs(records, trunk, pipeline, progress: bool = True):
    """Inputs the training loop feeds: crops for a trainable trunk, embeddings for a frozen one.

    Returns (inputs np.ndarray, kept records, SkipCounter). Raises DataError when nothing is usable.
    """
    if getattr(trunk, "trainable", False):
        inputs, kept, skips = load_crops(records, pipeline, progress)
    else:
        from opqn_model.feature_cache import FeatureCache, embed_records

        inputs, kept, skips = embed_records(records, trunk, pipeline, FeatureCache(), progress=progress)
    if len(kept) == 0 and len(records):
        raise DataError(f"none of the {len(records)} photos could be used: " + "; ".join(skips.summary_lines()))
    return inputs, kept, skips


def embeddings_of(inputs: np.ndarray, trunk) -> np.ndarray:
    """Trunk embeddings of model inputs (identity for frozen trunks, whose inputs already are embeddings)."""
    if getattr(trunk, "trainable", False):
        return np.asarray(trunk.features(inputs), dtype=np.float32)
    return np.asarray(inputs, dtype=np.float32)
