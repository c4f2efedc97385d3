"""The one recipe for a tiny trained model: a real OPQN checkpoint trained by `opqn_model.train.train` on
generated faces, small enough that a test session can afford it.

tests/conftest.py trains it once per session (`tiny_model`) and every test that only needs *a* trained
model uses that one (the checkpoint tests, the coordinator, the reliability cluster, the ingest job).
A test trains its own only where it needs something else, and passes only what differs (e.g. 112-pixel
input), so every tiny model in the suite comes from this function.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass


@dataclass(frozen=True)
class TinyModel:
    """A trained checkpoint and what it was trained on.

    path: `model.pt`; `last.pt` (resumable) and `best.pt` are in the same folder (`run_dir`).
    data: the folder of generated faces (one sub-folder per person) it was trained on.
    summary: what `train()` returned (history per epoch, fingerprint, ...).
    """

    path: pathlib.Path
    data: pathlib.Path
    bits: int
    summary: dict

    @property
    def run_dir(self) -> pathlib.Path:
        return self.path.parent


def train_tiny_model(root: pathlib.Path, *, bits: int = 32, K: int | None = None, people: int = 24,
                     photos: int = 6, photo_size: int = 64, input_size: int = 32, trunk_width: int = 16,
                     epochs: int = 2, batch_size: int = 64, hold_out_people: bool = True, seed: int = 0,
                     data_seed: int = 0, head_refit: str = "off", trunk: str = "resnet20",
                     method: str = "opqn", pooling: str = "flat") -> TinyModel:
    """Train `trunk` (resnet20, width `trunk_width`, pooling `pooling`) + the head of `method` (OPQN) of `bits`
    bits on `people` x `photos` generated faces of `photo_size` px, read at `input_size` px without face
    detection (`mode="none"`).

    With `hold_out_people` the default protocol splits off test and validation people and seen-protocol
    queries (so `facepq eval` has unseen people to score); without it every photo trains. `head_refit="data"`
    refits the head to the trunk's embeddings (the demo's setting): codes that separate people.
    """
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.synthetic import write_faces
    from opqn_model.train import train

    data = write_faces(root / "faces", people, photos, size=photo_size, seed=data_seed)
    model_config = ModelConfig(trunk=trunk, bits=bits, K=K, input_size=input_size, trunk_width=trunk_width,
                               pooling=pooling, pipeline=FacePipeline(size=input_size, mode="none").to_dict())
    split = {} if hold_out_people else dict(test_people=0.0, val_people=0.0, queries_per_person=0)
    train_config = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, seed=seed, device="cpu",
                               head_refit=head_refit, **split)
    summary = train(data, root / "model", model_config, train_config, progress=False)
    return TinyModel(pathlib.Path(summary["model"]), pathlib.Path(data), bits, summary)
