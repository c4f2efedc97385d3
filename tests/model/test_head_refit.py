"""TrainConfig.head_refit='data': a trained resnet20's head is replaced by a quantizer of its embeddings, whose
codes keep apart photos the trained head (prototypes of the training people) gives one code."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_refitted_head_gives_distinct_codes_where_the_trained_one_collapses(tmp_path):
    from opqn_model.api import FaceEncoder
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.datasets import list_photos
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.synthetic import write_faces
    from opqn_model.train import train
    from opqn_model.training_data import load_crops

    data = write_faces(tmp_path / "faces", 14, 5, size=40, seed=3)
    model_config = ModelConfig(trunk="resnet20", bits=32, input_size=32, trunk_width=8,
                               pipeline=FacePipeline(size=32, mode="none").to_dict())
    runs = {}
    for refit in ("off", "data"):
        summary = train(data, tmp_path / refit, model_config,
                        TrainConfig(epochs=2, batch_size=32, seed=0, head_refit=refit, opq_iterations=5),
                        progress=False)
        runs[refit] = (summary, FaceEncoder.load(summary["model"]))
    assert runs["data"][0]["head_refitted"] is True and runs["off"][0]["head_refitted"] is False
    (_, trained), (_, refitted) = runs["off"], runs["data"]
    crops, _, _ = load_crops(list_photos(data), trained.pipeline, progress=False)
    # the same trunk weights (the best epoch's): only the head differs
    assert (trained.trunk_features(crops) == refitted.trunk_features(crops)).all()
    distinct = {name: len({bytes(c) for c in enc.codec.encode(enc.trunk_features(crops))})
                for name, enc in (("off", trained), ("data", refitted))}
    assert distinct["data"] > distinct["off"], distinct
    assert distinct["data"] >= len(crops) // 2, distinct  # codes apart, where the trained head has a handful
