"""Command-line flags generated from the config dataclasses, so every default lives in one place.

`add_config_flags(parser, ModelConfig, ...)` adds `--field-name` for each field (help from the
class docstring's `Args:` section, the default shown from the dataclass); a flag left out is
None and `config_from_flags` then keeps the dataclass's own default. So `facepq train --help`
and `TrainConfig()` can never disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import re

_ARG_LINE = re.compile(r"^\s{8}([\w, ]+):\s*(.*)$")


def field_docs(cls) -> dict[str, str]:
    """{field name: description} from the `Args:` section of `cls`'s docstring."""
    docs: dict[str, str] = {}
    current: list[str] = []
    in_args = False
    for line in (cls.__doc__ or "").splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        match = _ARG_LINE.match(line)
        if match:
            current = [n.strip() for n in match.group(1).split(",")]
            for name in current:
                docs[name] = match.group(2).strip()
        elif line.startswith(" " * 12) and current:
            for name in current:
                docs[name] += " " + line.strip()
        elif line.strip():
            current = []
    return docs


def _scalar_type(annotation):
    """int / float / str of a field annotation such as 'int | None' (None for anything else)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if re.fullmatch(rf"{name}(\s*\|\s*None)?", text.strip()):
            return kind
    return None


def add_config_flags(parser, cls, fields=None, names: dict | None = None, extra_help: dict | None = None) -> None:
    """Add a flag per field of dataclass `cls` (or only `fields`), default None = the dataclass default.

    Args:
        names: field -> list of option strings replacing the default `--field-name`.
        extra_help: field -> text appended to the docstring help.
    """
    docs, names, extra_help = field_docs(cls), names or {}, extra_help or {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        kind = _scalar_type(hints[f.name])
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = " ".join(t for t in (docs.get(f.name, ""), extra_help.get(f.name, "")) if t)
        text = text.replace("%", "%%") + ("" if default is None else f" (default {default})")
        parser.add_argument(*names.get(f.name, [f"--{f.name.replace('_', '-')}"]), dest=f.name, type=kind,
                            default=None, help=text)


def config_from_flags(cls, args: argparse.Namespace, **overrides):
    """An instance of `cls` with the flags the user gave (None = not given) and `overrides` on top of its defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if getattr(args, f.name, None) is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
