"""Turn photo records into model inputs: aligned crops (trainable trunks) or cached embeddings (frozen trunks).

Both paths skip unusable photos with a counted reason; one bad file never ends a run.
"""
from __future__ import annotations

import logging

import numpy as np

from facepq_core.errors import DataError

log = logging.getLogger(__name__)


def load_crops(records, pipeline, progress: bool = True):
    """Read and align photos.

    Returns (crops uint8 [n_ok, S, S, 3], kept records, SkipCounter).
    """
    from opqn_model.photos import align_photos

    paths = [rec.path for rec in records]
    aligned = align_photos(paths, pipeline, progress=progress)
    return aligned.crops, [records[i] for i in aligned.kept], aligned.counter(paths)


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
