"""Checkpoint format: resumable training state plus everything inference needs.

A checkpoint is one torch file holding named keys:
    format            CHECKPOINT_FORMAT ("facepq-opqn/1" files, written before methods existed,
                      are read as method 'opqn')
    method            training method (opqn_model.methods): says how the file becomes a codec
    codec             the codec it produces (facepq_core.codecs), e.g. 'opqn', 'binary'; 'whitened' (around the
                      method's own) for a model with ModelConfig.whitening (`checkpoint_codec_name`)
    model_config      ModelConfig.to_dict() (resolved: M, K, d filled in)
    train_config      TrainConfig.to_dict()
    trunk             trunk registry name (also in model_config)
    head, trunk_state state dicts of the trained torch parts ({} where there is none)
    codec_state       for methods whose codec is not a function of `head` (e.g. itq): the
                      codec's own arrays (as tensors) and scalars
    refine_codecs     refinement tiers fitted with the model (facepq_core.refine), by kind:
                      {"codes:256": {"codec": "pq", <that codec's state>}}; absent when none
    fingerprint       sha256 of config + weights (+ method and codec_state where present):
                      the model's identity, stored in every index so codes of different
                      models never mix
    method proofs     e.g. opqn's codebook_fingerprint (checked by the method's `verify`)
    epoch, step, best_map, optimizer, scheduler, loss, split, metrics (training only)

Loading recomputes the fingerprint, lets the method check its own proofs, and refuses a
file whose weights, config or codebooks do not match what it claims. `--model` may name
the file or the folder `facepq train --out` wrote (its model.pt).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import torch

from facepq_core.atomic import atomic_writer
from facepq_core.errors import CheckpointError, ConfigError
from opqn_model.config import ModelConfig

CHECKPOINT_FORMAT = "facepq-model/2"
LEGACY_FORMATS = ("facepq-opqn/1",)   # read as method 'opqn'
MODEL_FILE = "model.pt"               # what `facepq train --out DIR` writes for inference


def _state_digest(h, state: dict) -> None:
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, (int, float, str, bool)):
            h.update(repr(value).encode())


def model_fingerprint(model_config: ModelConfig, head_state: dict, trunk_state: dict, method: str = "opqn",
                      codec_state: dict | None = None, refine_codecs: dict | None = None) -> str:
    """Identity of a model: equal fingerprints give equal codes for equal inputs.

    An opqn model's codec is a function of its head, so its fingerprint covers config + head +
    trunk (as it always has: indexes written before methods existed keep matching); other
    methods add their name and codec state; refinement codecs, when present, add theirs.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model_config.to_dict(), sort_keys=True).encode())
    _state_digest(h, head_state)
    _state_digest(h, trunk_state)
    if method != "opqn" or codec_state:
        h.update(f"method={method}".encode())
        _state_digest(h, codec_state or {})
    for kind in sorted(refine_codecs or {}):
        h.update(f"refine={kind}".encode())
        _state_digest(h, refine_codecs[kind])
    return h.hexdigest()[:16]


def checkpoint_codec_name(method_obj, model_config: ModelConfig) -> str:
    """The codec a checkpoint of `method_obj` with `model_config` produces: the method's own, or the
    whitened codec around it when the config puts a whitening in front of the head (opqn_model.input_whitening)."""
    from facepq_core.codecs.whitened import WhitenedCodec

    return WhitenedCodec.name if model_config.whitening else method_obj.codec_name


def tensor_state(state: dict) -> dict:
    """A codec's state with numpy arrays as tensors (what `torch.load(weights_only=True)` reads back)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in state.items()}


def resolve_model_path(path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint file, or the folder `facepq train --out` wrote (then its model.pt)."""
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        raise CheckpointError(f"{path} is a folder without a {MODEL_FILE} (train one with `facepq train --out {path}`)")
    return path


def save_checkpoint(path: str | os.PathLike, model_config: ModelConfig, head_state: dict, trunk_state: dict,
                    method: str = "opqn", codec_state: dict | None = None, refine_codecs: dict | None = None,
                    **extra) -> str:
    """Write durably and atomically (`facepq_core.atomic`) and return the model fingerprint.

    `refine_codecs`: {kind: {"codec": name, **codec.state()}} of the refinement tiers fitted with the model.
    """
    from opqn_model.methods import get_method

    model_config = model_config.resolved()
    codec_state = tensor_state(codec_state) if codec_state else None
    refine_codecs = {kind: tensor_state(state) for kind, state in refine_codecs.items()} if refine_codecs else None
    fingerprint = model_fingerprint(model_config, head_state, trunk_state, method, codec_state, refine_codecs)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "codec": checkpoint_codec_name(get_method(method), model_config),
        "model_config": model_config.to_dict(),
        "trunk": model_config.trunk,
        "head": head_state,
        "trunk_state": trunk_state,
        "fingerprint": fingerprint,
        **get_method(method).proofs(model_config),
        **({"codec_state": codec_state} if codec_state else {}),
        **({"refine_codecs": refine_codecs} if refine_codecs else {}),
        **extra,
    }
    with atomic_writer(path) as f:
        torch.save(payload, f)
    return fingerprint


def load_checkpoint(path: str | os.PathLike, method: str | None = None) -> dict:
    """Read and validate a checkpoint (file or `facepq train --out` folder); raises CheckpointError with what is wrong.

    The returned payload has `model_config` as a resolved ModelConfig and `method` filled in.
    `method`: the method the caller expects (e.g. `--method`); a checkpoint of another one is refused.
    """
    from opqn_model.methods import get_method

    path = resolve_model_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train one with `facepq train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable facepq checkpoint ({type(exc).__name__}: {exc})") from None
    fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if fmt != CHECKPOINT_FORMAT and fmt not in LEGACY_FORMATS:
        raise CheckpointError(f"{path} is not a facepq checkpoint of format {CHECKPOINT_FORMAT} (found {fmt!r})")
    if fmt in LEGACY_FORMATS:
        payload["method"] = "opqn"
    try:
        model_config = ModelConfig.from_dict(payload["model_config"]).resolved()
        method_obj = get_method(str(payload.get("method")))
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} has an invalid model config or method: {exc}") from None
    if method is not None and method != method_obj.name:
        raise CheckpointError(f"{path} was trained with method {method_obj.name!r}, not {method!r} "
                              f"(drop --method, or pass --method {method_obj.name})")
    codec_name = checkpoint_codec_name(method_obj, model_config)
    if fmt not in LEGACY_FORMATS and payload.get("codec") != codec_name:
        raise CheckpointError(f"{path}: codec {payload.get('codec')!r} does not match method {method_obj.name!r}, "
                              f"whose codes here are {codec_name!r} (file edited, or a newer facepq wrote it)")
    if model_config.trunk != payload.get("trunk"):
        raise CheckpointError(f"{path}: trunk {payload.get('trunk')!r} does not match its config ({model_config.trunk!r})")
    method_obj.verify(payload, model_config, path)
    fingerprint = model_fingerprint(model_config, payload["head"], payload["trunk_state"], method_obj.name,
                                    payload.get("codec_state"), payload.get("refine_codecs"))
    if fingerprint != payload.get("fingerprint"):
        raise CheckpointError(
            f"{path}: model fingerprint mismatch (stored {payload.get('fingerprint')}, weights give {fingerprint}); "
            "the file was modified or damaged")
    payload["model_config"] = model_config
    payload["codec"] = codec_name
    return payload
