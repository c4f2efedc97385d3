"""Training: the data split and inputs every method shares, then the method (opqn_model.methods) trains.

Data split (seeded, stored in the checkpoint so `facepq eval` reuses it):
- `test_people` of the people are held out entirely (unseen protocol);
- of the rest, `val_people` pick the best checkpoint by unseen-identity code mAP;
- of the remaining training people, `queries_per_person` photos each are held out
  as seen-protocol queries; everything else trains.

Unlabelled photos (`unlabelled`: e.g. a sample of the gallery the model will index, or the
gallery itself) join the fit of a frozen trunk's codes (the opqn data start, itq, the
refinement codes) but not the identity loss or the validation: on LFW validation people,
fitting the codebooks on the gallery as well raised 64-bit mAP from 0.936x to 0.968x of
float, and people enrolled after the fit gained too (README, "Codes for unseen people").

A frozen trunk (dlib) is run once per photo and its embeddings cached on disk, so
training touches only the head; a trainable trunk (resnet20) trains end to end on
aligned crops kept in memory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time

import numpy as np
import torch

from facepq_core.errors import DataError
from opqn_model.checkpoint import load_checkpoint
from opqn_model.config import ModelConfig, TrainConfig
from opqn_model.evaluate import evaluate_embeddings
from opqn_model.input_whitening import check_whitening
from opqn_model.training_data import embeddings_of, model_inputs

log = logging.getLogger(__name__)
WHITENING_PHOTOS = 2000  # training photos whose R-MAC regions initialise the whitening (a PCA of C-d vectors)


@dataclasses.dataclass
class DataSplit:
    train: list
    val: list
    test: list
    seen_queries: list

    def to_dict(self, root: str) -> dict:
        rel = lambda recs: [os.path.relpath(r.path, root) for r in recs]  # noqa: E731
        return {"root": os.path.abspath(root), "train_people": sorted({r.person for r in self.train}),
                "val_people": sorted({r.person for r in self.val}), "test_people": sorted({r.person for r in self.test}),
                "seen_queries": rel(self.seen_queries)}


def make_split(records, cfg: TrainConfig) -> DataSplit:
    from opqn_model.datasets import split_people, split_photos_per_person

    train, test = split_people(records, cfg.test_people, cfg.seed) if cfg.test_people > 0 else (list(records), [])
    val = []
    if cfg.val_people > 0 and len({r.person for r in train}) >= 6:
        train, val = split_people(train, cfg.val_people, cfg.seed + 1)
    seen_queries = []
    if cfg.queries_per_person > 0:
        try:
            train, seen_queries = split_photos_per_person(train, cfg.queries_per_person, cfg.seed + 2)
        except DataError:
            seen_queries = []
    return DataSplit(train, val, test, seen_queries)


@dataclasses.dataclass
class TrainSetup:
    """What every method trains from: configs, trunk, pipeline, split and the loaded inputs.

    `inputs` are aligned crops uint8 [n, S, S, 3] for a trainable trunk, embeddings float32
    [n, E] for a frozen one (`embeddings()` gives embeddings either way); `labels` are the
    training people's indices in `people`.
    """

    data_root: str
    out_dir: pathlib.Path
    model_config: ModelConfig
    train_config: TrainConfig
    trunk: object
    pipeline: object
    split: DataSplit
    people: list
    inputs: np.ndarray
    labels: torch.Tensor
    val_inputs: np.ndarray
    val_labels: list
    skips: object
    unlabelled: np.ndarray | None = None  # frozen trunk: embeddings of unlabelled photos for fitting codes
    resumed: dict | None = None
    resume_path: str | None = None
    progress: bool = True
    started: float = dataclasses.field(default_factory=time.monotonic)
    input_seconds: float = 0.0  # reading, aligning (and for a frozen trunk embedding) the photos

    @property
    def trainable_trunk(self) -> bool:
        return isinstance(self.trunk, torch.nn.Module) and getattr(self.trunk, "trainable", False)

    def embeddings(self) -> np.ndarray:
        return self._embeddings(self.inputs)

    def val_embeddings(self) -> np.ndarray:
        return self._embeddings(self.val_inputs)

    def _embeddings(self, inputs) -> np.ndarray:
        if not len(inputs):
            return np.zeros((0, self.trunk.feature_dim), np.float32)
        if isinstance(self.trunk, torch.nn.Module):
            was_training = self.trunk.training
            self.trunk.eval()
            try:
                with torch.inference_mode():
                    return embeddings_of(inputs, self.trunk)
            finally:
                self.trunk.train(was_training)
        return embeddings_of(inputs, self.trunk)

    def fit_embeddings(self, with_val: bool = False) -> np.ndarray:
        """What a frozen trunk's codes are fitted on: the training embeddings (+ the validation people's with
        `with_val`), plus the unlabelled photos' embeddings when there are any."""
        parts = [self.embeddings()] + ([self.val_embeddings()] if with_val else [])
        if self.unlabelled is not None and len(self.unlabelled):
            parts.append(np.asarray(self.unlabelled, dtype=np.float32))
        return np.concatenate(parts)

    def final_embeddings(self, model_path) -> np.ndarray:
        """Embeddings of the training, validation (and unlabelled) photos under the trained model at
        `model_path` (a frozen trunk's are the inputs themselves; a trained trunk embeds its crops again)."""
        if not self.trainable_trunk:
            return self.fit_embeddings(with_val=True)
        from opqn_model.api import FaceEncoder

        encoder = FaceEncoder.load(model_path)
        crops = [c for c in (self.inputs, self.val_inputs) if len(c)]
        return np.concatenate([np.concatenate([encoder.trunk_features(c[i:i + 256]) for i in range(0, len(c), 256)])
                               for c in crops])

    def checkpoint_extra(self) -> dict:
        """Keys every checkpoint of this run carries (train config, split, class count)."""
        return dict(train_config=self.train_config.to_dict(), split=self.split.to_dict(self.data_root),
                    num_classes=len(self.people))

    def validation_map(self, codec) -> float:
        """Unseen-identity code mAP of `codec` on the validation people (NaN without them)."""
        from opqn_model.datasets import PhotoRecord, split_photos_per_person

        if len(self.val_inputs) == 0:
            return float("nan")
        emb = self.val_embeddings()
        recs = [PhotoRecord(str(i), p) for i, p in enumerate(self.val_labels)]
        try:
            gallery, queries = split_photos_per_person(recs, 1, self.train_config.seed)
        except DataError:
            return float("nan")
        gi = np.array([int(r.path) for r in gallery])
        qi = np.array([int(r.path) for r in queries])
        res = evaluate_embeddings(codec, emb[qi], [self.val_labels[i] for i in qi], emb[gi],
                                  [self.val_labels[i] for i in gi])
        return res["map"]

    def summary(self, model_path: pathlib.Path, fingerprint: str, **fields) -> dict:
        """The summary `train` returns; `seconds` is the wall time of the whole run, of which `input_seconds`
        went to reading the photos (and embedding them, for a frozen trunk) and `fit_seconds` to the rest."""
        seconds = time.monotonic() - self.started
        return {"model": str(model_path), "fingerprint": fingerprint, "train_photos": len(self.labels),
                "train_people": len(self.people), "skipped": self.skips.skipped,
                "seconds": seconds, "input_seconds": self.input_seconds, "frozen_trunk": not self.trainable_trunk,
                "fit_seconds": seconds - self.input_seconds, **fields}


def train(data, out_dir, model_config: ModelConfig, train_config: TrainConfig, resume: str | None = None,
          progress: bool = True, records=None, unlabelled=None) -> dict:
    """Train a model with `train_config.method` on `data` (folder of person folders or a CSV/Parquet list).

    Writes `out_dir/model.pt` (for inference) and whatever the method keeps for resuming
    (opqn: `last.pt` every epoch, `best.pt` on a better validation mAP). Returns a summary dict.
    `unlabelled`: photos (a folder, a list file, or PhotoRecords; people ignored) whose embeddings join
    the fit of a frozen trunk's codes (see the module docstring).
    """
    from opqn_model.api import build_pipeline, build_trunk
    from opqn_model.datasets import list_photos
    from opqn_model.methods import get_method

    started = time.monotonic()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_config.seed)
    np.random.seed(train_config.seed)
    resumed = None
    if resume:
        resumed = load_checkpoint(resume)
        model_config, train_config = resumed["model_config"], TrainConfig.from_dict(resumed["train_config"])
    method = get_method(train_config.method)
    model_config = model_config.resolved()
    trunk = build_trunk(model_config)
    pipeline = build_pipeline(model_config, trunk)
    model_config.pipeline = pipeline.to_dict()
    check_whitening(model_config, trunk)  # refuse before any photo is read
    method.check_config(model_config, train_config, trunk)
    if train_config.resolved_refine_bits(trunk.feature_dim):
        from opqn_model.refine_fit import refine_shape

        refine_shape(train_config.resolved_refine_bits(trunk.feature_dim), trunk.feature_dim)
    log.info("model config: %s", json.dumps(model_config.to_dict(), sort_keys=True))
    log.info("train config: %s", json.dumps(train_config.to_dict(), sort_keys=True))

    records = records if records is not None else list_photos(data)
    split = make_split(records, train_config)
    people = sorted({r.person for r in split.train})
    if len(people) < 2:
        raise DataError(f"training needs at least 2 people, the split left {len(people)}")
    what = "embedding" if not getattr(trunk, "trainable", False) else "aligning"
    log.info("%s %d training and %d validation photos", what, len(split.train), len(split.val))
    t_inputs = time.monotonic()
    inputs, kept, skips = model_inputs(split.train, trunk, pipeline, progress)
    labels_map = {p: i for i, p in enumerate(people)}
    labels = torch.tensor([labels_map[r.person] for r in kept], dtype=torch.long)
    val_inputs, val_kept, _ = model_inputs(split.val, trunk, pipeline, progress) if split.val else ([], [], None)
    input_seconds = time.monotonic() - t_inputs
    log.info("photos ready in %.0f s: %d training photos of %d people, %d validation photos", input_seconds,
             len(kept), len(people), len(val_kept))
    for line in skips.summary_lines():
        log.info("skipped while loading training photos: %s", line)
    extra = _unlabelled_embeddings(unlabelled, trunk, pipeline, progress) if unlabelled is not None else None
    if resumed is None and hasattr(trunk, "init_whitening"):
        # R-MAC's learned whitening starts as the PCA-whitening of training region descriptors (a resumed
        # run restores it with the trunk's weights)
        regions = trunk.init_whitening(inputs[:WHITENING_PHOTOS])
        if regions:
            log.info("R-MAC whitening initialised from the PCA of %d regions of %d training photos", regions,
                     min(len(inputs), WHITENING_PHOTOS))
    setup = TrainSetup(str(data) if data else ".", out_dir, model_config, train_config, trunk, pipeline, split,
                       people, inputs, labels, val_inputs, [r.person for r in val_kept], skips, extra, resumed,
                       resume, progress, started, input_seconds)
    summary = method.train(setup)
    summary["unlabelled_photos"] = 0 if extra is None else len(extra)
    refine_bits = train_config.resolved_refine_bits(trunk.feature_dim)
    if refine_bits:
        from opqn_model.refine_fit import add_refine_codes

        # fitted on the embeddings of the model just written (its own trunk weights when trained)
        summary["fingerprint"] = add_refine_codes(summary["model"], setup.final_embeddings(summary["model"]),
                                                  refine_bits, train_config.seed)
        summary["refine"] = f"codes:{refine_bits}"
    return summary


def _unlabelled_embeddings(unlabelled, trunk, pipeline, progress: bool) -> np.ndarray:
    """Embeddings float32 [U, E] of unlabelled photos for a frozen trunk (ConfigError for a trainable one)."""
    from facepq_core.errors import ConfigError
    from opqn_model.datasets import list_photos

    if getattr(trunk, "trainable", False):
        raise ConfigError(f"unlabelled photos only help fit a frozen trunk's codes; trunk {trunk.name!r} is trained "
                          f"end to end by an identity loss (use --trunk dlib, or leave out --unlabelled)")
    records = list_photos(unlabelled) if isinstance(unlabelled, (str, os.PathLike)) else list(unlabelled)
    emb, kept, skips = model_inputs(records, trunk, pipeline, progress)
    log.info("%d unlabelled photos join the fit of the codes (%s skipped)", len(kept), skips.total)
    return emb
