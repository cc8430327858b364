"""Benchmark prompts: the bundled Spec-Bench questions (data/NOTICE.md), the bundled repetitive
workload (benchmarks/repetitive.py), or a JSONL file: of the same shape, of chat conversations, or
an OpenAI-style request log (one /v1/completions or /v1/chat/completions body per line)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from verispec.errors import InvalidInputError
from verispec.text import Prompt


@dataclass(frozen=True)
class BenchPrompt:
    category: str
    question_id: str
    text: Prompt  # the first turn, a completion's prompt, or a conversation (chat messages)
    chat: bool = True  # wrapped in the chat template ('turns', 'messages'); a completion's 'prompt' is not


BUNDLED = {"spec-bench": "spec_bench.jsonl", "repetitive": "repetitive.jsonl"}


def load_prompts(source: str, categories: list[str] | None = None, per_category: int | None = None
                 ) -> list[BenchPrompt]:
    """source: a bundled set (BUNDLED) or a JSONL file with, per line, {"category", "turns": [...]},
    {"prompt": ...} (a completion's, not wrapped in the chat template) or {"messages": [...]} (other
    keys, as in a logged request body, are ignored). The prompts keep the file's order."""
    if source in BUNDLED:
        text = resources.files("verispec.data").joinpath(BUNDLED[source]).read_text()
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"prompts={source!r} is not allowed: use {', '.join(map(repr, BUNDLED))} "
                                    "or a JSONL file path")
        text = path.read_text()
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turn = row["turns"][0] if "turns" in row else row["messages"] if "messages" in row else row["prompt"]
            if not isinstance(turn, (str, list)) or not turn:
                raise TypeError
            prompts.append(BenchPrompt(str(row.get("category", "all")), str(row.get("question_id", number)), turn,
                                       "turns" in row or "messages" in row))
        except (ValueError, KeyError, IndexError, TypeError):
            raise InvalidInputError(f"{source}, line {number}: need a JSON object with 'turns', 'prompt' or "
                                    "'messages' (a non-empty string or list)") from None
    known = sorted({p.category for p in prompts})
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise InvalidInputError(f"categories {unknown} are not in {source}; it has: {', '.join(known)}")
        prompts = [p for p in prompts if p.category in categories]
    if per_category:
        taken: dict[str, int] = {}
        kept = []
        for p in prompts:
            if taken.get(p.category, 0) < per_category:
                kept.append(p)
                taken[p.category] = taken.get(p.category, 0) + 1
        prompts = kept
    return prompts
