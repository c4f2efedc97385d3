"""Trunk registry: feature extractors created by name (after timm's registry).

A trunk turns aligned face crops into feature vectors that the OPQN head
quantizes. Every trunk module registers a builder with `@register_trunk`;
`create_trunk(name, **kwargs)` builds one, dropping `None` kwargs so the
builder's own defaults win.

A trunk object has:
    name: str            registry name, stored in checkpoints
    input_size: int      side of the square RGB crop it takes (uint8 [N, S, S, 3])
    feature_dim: int     length of the feature vector
    trainable: bool      True for torch modules trained end to end (resnet20),
                         False for frozen extractors (dlib), whose features can be cached
    features(crops) -> np.ndarray float32 [N, feature_dim]   (inference)
"""
from __future__ import annotations

import importlib
from typing import Callable

from facepq_core.errors import ConfigError

_TRUNK_BUILDERS: dict[str, Callable] = {}
_UNAVAILABLE: dict[str, str] = {}
# Modules that register trunks; imported on first use so `import opqn_model` stays light.
_TRUNK_MODULES = ("opqn_model.trunks.resnet", "opqn_model.trunks.dlib", "opqn_model.trunks.densenet")


def register_trunk(fn: Callable) -> Callable:
    """Decorator: record `fn` as the builder of the trunk named `fn.__name__`."""
    _TRUNK_BUILDERS[fn.__name__] = fn
    return fn


def _load_all() -> None:
    for module in _TRUNK_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # e.g. dlib missing: the other trunks still work
            _UNAVAILABLE[module.rsplit(".", 1)[-1]] = str(exc)


def list_trunks() -> list[str]:
    _load_all()
    return sorted(_TRUNK_BUILDERS)


def create_trunk(name: str, **kwargs):
    """Build the trunk `name`. Raises ConfigError naming the known trunks for an unknown name.

    `None` values are dropped so the builder's own defaults win.
    """
    _load_all()
    if name not in _TRUNK_BUILDERS and name in _UNAVAILABLE:
        raise ConfigError(f"trunk {name!r} cannot be loaded here: {_UNAVAILABLE[name]}")
    if name not in _TRUNK_BUILDERS:
        raise ConfigError(f"unknown trunk {name!r}; known trunks: {', '.join(sorted(_TRUNK_BUILDERS))}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _TRUNK_BUILDERS[name](**kwargs)


def trunk_options(name: str, **options) -> dict:
    """The `options` (e.g. a ModelConfig's input_size and width) that trunk `name`'s builder takes.

    A frozen trunk has a fixed input and no width: the model config's values for those
    apply to trainable trunks only, so they are left out here instead of refused.
    """
    import inspect

    _load_all()
    builder = _TRUNK_BUILDERS.get(name)
    if builder is None:
        return options
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}
