"""`facepq calibrate`: measure a model's score thresholds on people it never trained on.

    cal = calibrate_model("model/", "photos/")        # writes model/model.calibration.json
    cal.threshold_for(1e-3)

Every usable photo of the data's people is both a query and a stored face: its code is
computed as an index stores it, its lookup tables as the coordinator builds them, and every
query is scored against every other photo's code exactly as the query nodes score it
(facepq_core.codes.score_codes). Pairs of one person are genuine, pairs of two people impostors
(facepq_core.calibration.pair_scores); a photo is never paired with itself.

People the checkpoint records as training or validation people are left out (their scores
would flatter the model); data with nobody else is refused. The result is saved beside the
checkpoint (`calibration_path`), and FaceEncoder.load picks it up for the coordinator.
"""
from __future__ import annotations

import logging
import pathlib
import time

import numpy as np

from facepq_core.calibration import DEFAULT_FARS, Calibration, fit_calibration, pair_scores
from facepq_core.codes import score_codes
from facepq_core.errors import DataError

log = logging.getLogger(__name__)

CALIBRATION_SUFFIX = ".calibration.json"
MAX_PHOTOS = 6000           # queries x stored faces = 36M pair scores at most (144 MB of float32)
QUERY_CHUNK = 512


def calibration_path(model_path) -> pathlib.Path:
    """Where a checkpoint's calibration lives: beside it, `<name>.calibration.json` (model.pt ->
    model.calibration.json)."""
    from opqn_model.checkpoint import resolve_model_path

    path = resolve_model_path(model_path)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def load_calibration(model_path, fingerprint: str) -> Calibration | None:
    """The checkpoint's calibration, None when it has none; CheckpointError when it belongs to another model."""
    path = calibration_path(model_path)
    return Calibration.load(path, fingerprint) if path.is_file() else None


def code_pair_scores(codec, embeddings: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) code scores of every ordered pair of distinct photos.

    Args:
        codec: facepq_core.codecs.Codec.  embeddings: float32 [N, E].  labels: person per row.
    """
    codes = codec.encode(embeddings)
    labels = np.asarray(labels)
    genuine, impostor = [], []
    for start in range(0, len(embeddings), QUERY_CHUNK):
        stop = min(len(embeddings), start + QUERY_CHUNK)
        scores = score_codes(codec.query_tables(embeddings[start:stop]), codes, codec.spec)
        itself = np.zeros(scores.shape, dtype=bool)
        itself[np.arange(stop - start), np.arange(start, stop)] = True
        g, i = pair_scores(scores, labels[start:stop], labels, itself)
        genuine.append(g)
        impostor.append(i)
    return np.concatenate(genuine), np.concatenate(impostor)


def calibrate_model(model_path, data, fars=DEFAULT_FARS, out=None, max_photos: int = MAX_PHOTOS, seed: int = 0,
                    progress: bool = False) -> tuple[Calibration, pathlib.Path]:
    """Measure and save the calibration of the checkpoint at `model_path` on the people in `data`.

    Returns (the calibration, where it was written).
    Raises:
        DataError: no usable people (every person trained on, or fewer than two people with two photos).
    """
    import torch

    from opqn_model.api import FaceEncoder
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.datasets import list_photos
    from opqn_model.training_data import embeddings_of, model_inputs

    t0 = time.monotonic()
    payload = load_checkpoint(model_path)
    encoder = FaceEncoder.from_checkpoint(payload)
    split = payload.get("split") or {}
    trained = set(split.get("train_people", [])) | set(split.get("val_people", []))
    records = list_photos(data)
    unseen = [r for r in records if r.person not in trained]
    left_out = len({r.person for r in records} & trained)
    if left_out:
        log.warning("left out %d people the model trained on (calibration needs people it never saw)", left_out)
    if len(unseen) > max_photos:
        keep = np.sort(np.random.default_rng(seed).choice(len(unseen), max_photos, replace=False))
        unseen = [unseen[i] for i in keep]
    if len({r.person for r in unseen}) < 2:
        raise DataError(f"{data} has {len({r.person for r in unseen})} people the model did not train on "
                        f"({left_out} left out as training people); calibration needs at least two")
    with torch.inference_mode():
        inputs, kept, skips = model_inputs(unseen, encoder.trunk, encoder.pipeline, progress)
        emb = embeddings_of(inputs, encoder.trunk)
    labels = [r.person for r in kept]
    genuine, impostor = code_pair_scores(encoder.codec, emb, labels)
    if not genuine.size:
        raise DataError(f"no person in {data} has two usable photos: nothing to measure genuine pairs on")
    from datetime import datetime, timezone

    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cal = fit_calibration(genuine, impostor, encoder.fingerprint, encoder.codec.name, fars, seed=seed,
                          people=len(set(labels)), photos=len(labels), source=str(data), created_at=created,
                          extra={"left_out_training_people": left_out, "skipped": skips.skipped,
                                 "seconds": round(time.monotonic() - t0, 1)})
    path = pathlib.Path(out) if out else calibration_path(model_path)
    cal.save(path)
    return cal, path
