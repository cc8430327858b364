"""Drafter names as users write them: 'none', 'ngram', 'suffix', their tree-proposing forms
'ngram-tree' and 'suffix-tree', or 'draft:MODEL'."""

from __future__ import annotations

from verispec.errors import InvalidInputError

LOOKUPS = ("ngram", "ngram-tree", "suffix", "suffix-tree")  # drafters that need no model
DRAFTERS = ("none", *LOOKUPS, "draft:MODEL")
TREE = "-tree"


def parse_drafter(name: str | None) -> tuple[str, str | None]:
    """-> (kind, model): ('none', None), ('ngram' | 'ngram-tree' | 'suffix' | 'suffix-tree', None)
    or ('draft', MODEL)."""
    if name in (None, "none"):
        return "none", None
    if name in LOOKUPS:
        return name, None
    if isinstance(name, str) and name.startswith("draft:") and name[len("draft:"):]:
        return "draft", name[len("draft:"):]
    raise InvalidInputError(f"drafter={name!r} is not allowed; allowed: {', '.join(DRAFTERS)} "
                            "(MODEL: a built-in name, a .gguf file or a Hugging Face folder)")
