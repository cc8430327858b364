"""Drafter names as users write them: 'none', 'ngram', 'suffix', their tree-proposing forms
'ngram-tree' and 'suffix-tree', 'draft:MODEL', or 'eagle:DIR' (an EAGLE-3 head; 'eagle' alone: the
head built in for the default model) and its tree form 'eagle-tree[:DIR]' (EAGLE-2's dynamic trees)."""

from __future__ import annotations

from verispec.errors import InvalidInputError

LOOKUPS = ("ngram", "ngram-tree", "suffix", "suffix-tree")  # drafters that need no model
DRAFTERS = ("none", *LOOKUPS, "draft:MODEL", "eagle", "eagle:DIR", "eagle-tree", "eagle-tree:DIR")
TREE = "-tree"


def parse_drafter(name: str | None) -> tuple[str, str | None]:
    """-> (kind, model): ('none', None), ('ngram' | 'ngram-tree' | 'suffix' | 'suffix-tree', None),
    ('draft', MODEL) or ('eagle' | 'eagle-tree', DIR or None)."""
    if name in (None, "none"):
        return "none", None
    if name in LOOKUPS:
        return name, None
    if name in ("eagle", "eagle" + TREE):
        return name, None
    for kind in ("draft", "eagle", "eagle" + TREE):
        if isinstance(name, str) and name.startswith(kind + ":") and name[len(kind) + 1:]:
            return kind, name[len(kind) + 1:]
    raise InvalidInputError(f"drafter={name!r} is not allowed; allowed: {', '.join(DRAFTERS)} "
                            "(MODEL: a built-in name, a .gguf file or a Hugging Face folder; DIR: a head's "
                            "folder, as verispec train-drafter writes it)")
