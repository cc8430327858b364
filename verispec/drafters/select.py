"""Drafter names as users write them: 'none' or 'ngram' (more to come)."""

from __future__ import annotations

from verispec.drafters.base import Drafter
from verispec.drafters.ngram import NgramDrafter
from verispec.errors import InvalidInputError

DRAFTERS = ("none", "ngram")


def make_drafter(name: str | None) -> Drafter | None:
    if name in (None, "none"):
        return None
    if name == "ngram":
        return NgramDrafter()
    raise InvalidInputError(f"drafter={name!r} is not allowed; allowed: {', '.join(DRAFTERS)}")
