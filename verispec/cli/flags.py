"""CLI flags derived from the config dataclasses, so a new parameter is a flag without more code."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, TypeVar

T = TypeVar("T")

# annotation (as written in config.py) -> argparse keywords
_KINDS: dict[str, dict[str, Any]] = {
    "int": {"type": int},
    "float": {"type": float},
    "str": {"type": str},
    "int | None": {"type": int},
    "str | None": {"type": str},
    "bool": {"action": "store_true"},
    "tuple[str, ...]": {"action": "append", "type": str},
    "tuple[int, ...]": {"action": "append", "type": int},
    "tuple[tuple[int, float], ...]": {"action": "append", "type": lambda text: _pair(text), "metavar": "ID=BIAS"},
    "ResponseFormat | None": {"type": lambda text: _json(text), "metavar": "JSON"},
}


def _json(text: str) -> Any:
    """A JSON value, as --response-format takes OpenAI's object, e.g. '{"type": "json_object"}'."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: it must be JSON ({e})") from None


def _pair(text: str) -> tuple[int, float]:
    """ID=BIAS, as --logit-bias writes it."""
    try:
        token, bias = text.split("=")
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: write TOKEN_ID=BIAS, e.g. 42=-100") from None


def on_off(text: str) -> bool:
    """A switch as flags write it: on or off."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use on or off")
    return text == "on"


def add_flags(parser: argparse.ArgumentParser, cls: type, help: dict[str, str] | None = None,
              skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of the dataclass cls but those in skip (another flag sets them);
    defaults stay the dataclass's."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _KINDS[str(f.type)]
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           help=(help or {}).get(f.name, f"default {f.default!r}"), **kind)


def from_flags(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass built from the flags the user gave (the rest keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
