"""Training methods, registered by name: how a model's codes are learned and how its checkpoint becomes a codec.

A method owns three things for the models it trains:
    train(setup)      -> summary dict; writes `model.pt` (and resumable checkpoints) under setup.out_dir
    codec(payload)    -> the numpy codec (facepq_core.codecs) of a validated checkpoint payload
    verify(payload)   -> raises CheckpointError when the payload does not prove what it claims
and the name of the codec it produces (`codec_name`; with ModelConfig.whitening the checkpoint's codec is
'whitened' around it: opqn_model.checkpoint.checkpoint_codec_name). The checkpoint records the method;
`facepq train --method NAME` picks one. Registered like trunks (opqn_model.trunks):

    opqn   the OPQN head: orthonormal product quantization (the paper's method)
    itq    ITQ binary codes of a frozen trunk's embedding, scored by Hamming distance
    dmh    Deep Metric Hashing: hash head + softmax, center and quantization losses (binary codes)
    dagh   Deep Discrete Attention Guided Hashing: attention + discrete sign layer (binary_gated codes)
"""
from __future__ import annotations

import importlib

from facepq_core.errors import ConfigError

_METHODS: dict[str, object] = {}
_METHOD_MODULES = ("opqn_model.methods.opqn", "opqn_model.methods.itq", "opqn_model.methods.dmh",
                   "opqn_model.methods.dagh")


def register_method(cls):
    """Class decorator: record an instance of `cls` under `cls.name`."""
    _METHODS[cls.name] = cls()
    return cls


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def method_names() -> list[str]:
    """Names of the methods this facepq has, without importing them (for `--help`)."""
    return sorted(m.rsplit(".", 1)[1] for m in _METHOD_MODULES)


def list_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str):
    """The registered method `name`; ConfigError naming the known methods otherwise."""
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown training method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


__all__ = ["register_method", "get_method", "list_methods", "method_names"]
