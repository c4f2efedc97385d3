"""Checkpoint format: resumable training state plus everything inference needs.

A checkpoint is one torch file holding named keys:
    format            CHECKPOINT_FORMAT
    model_config      ModelConfig.to_dict() (resolved: M, K, d filled in)
    train_config      TrainConfig.to_dict()
    trunk             trunk registry name (also in model_config)
    head, trunk_state state dicts (trunk_state is empty for frozen trunks)
    codebook_fingerprint  sha256 of the fixed codebooks the config implies
    fingerprint       sha256 of config + codebooks + weights: the model's identity,
                      stored in every index so codes of different models never mix
    epoch, step, best_map, optimizer, scheduler, loss, split, metrics (training only)

Loading recomputes both fingerprints and refuses a file whose weights, config or
codebooks do not match what it claims.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import torch

from facepq_core.atomic import atomic_writer
from facepq_core.errors import CheckpointError, ConfigError
from opqn_model.codebooks import codebook_fingerprint, orthonormal_codebooks
from opqn_model.config import ModelConfig

CHECKPOINT_FORMAT = "facepq-opqn/1"


def _state_digest(h, state: dict) -> None:
    for name in sorted(state):
        tensor = state[name]
        h.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def model_fingerprint(model_config: ModelConfig, head_state: dict, trunk_state: dict) -> str:
    """Identity of a model: equal fingerprints give equal codes for equal inputs."""
    h = hashlib.sha256()
    h.update(json.dumps(model_config.to_dict(), sort_keys=True).encode())
    _state_digest(h, head_state)
    _state_digest(h, trunk_state)
    return h.hexdigest()[:16]


def expected_codebook_fingerprint(model_config: ModelConfig) -> str:
    cfg = model_config.resolved()
    return codebook_fingerprint(orthonormal_codebooks(cfg.M, cfg.K, cfg.sub_dim))


def save_checkpoint(path: str | os.PathLike, model_config: ModelConfig, head_state: dict, trunk_state: dict,
                    **extra) -> str:
    """Write durably and atomically (`facepq_core.atomic`) and return the model fingerprint."""
    model_config = model_config.resolved()
    fingerprint = model_fingerprint(model_config, head_state, trunk_state)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config.to_dict(),
        "trunk": model_config.trunk,
        "head": head_state,
        "trunk_state": trunk_state,
        "codebook_fingerprint": expected_codebook_fingerprint(model_config),
        "fingerprint": fingerprint,
        **extra,
    }
    with atomic_writer(path) as f:
        torch.save(payload, f)
    return fingerprint


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint; raises CheckpointError with what is wrong."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train one with `facepq train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable facepq checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a facepq checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
    try:
        model_config = ModelConfig.from_dict(payload["model_config"]).resolved()
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from None
    if model_config.trunk != payload.get("trunk"):
        raise CheckpointError(f"{path}: trunk {payload.get('trunk')!r} does not match its config ({model_config.trunk!r})")
    books = expected_codebook_fingerprint(model_config)
    stored_books = payload["head"].get("codebooks")
    if payload.get("codebook_fingerprint") != books or stored_books is None or \
            codebook_fingerprint(stored_books.numpy()) != books:
        raise CheckpointError(
            f"{path}: codebooks do not match the construction for M={model_config.M}, K={model_config.K}, "
            f"d={model_config.sub_dim} (file edited, or written by an incompatible facepq)")
    fingerprint = model_fingerprint(model_config, payload["head"], payload["trunk_state"])
    if fingerprint != payload.get("fingerprint"):
        raise CheckpointError(
            f"{path}: model fingerprint mismatch (stored {payload.get('fingerprint')}, weights give {fingerprint}); "
            "the file was modified or damaged")
    payload["model_config"] = model_config
    return payload
