"""`verispec train-drafter`: train an EAGLE-3 head for a model on this machine, on its own answers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from verispec import hub
from verispec.cli.flags import add_flags, from_flags
from verispec.config import RuntimeConfig, TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-drafter", help="train an EAGLE-3 head (--drafter eagle:DIR) on the target's own answers")
    p.add_argument("--model", default=hub.DEFAULT_MODEL)
    p.add_argument("--out", required=True, help="the head's folder (also its checkpoint: a second run resumes)")
    p.add_argument("--prompts", default=None,
                   help="a JSONL of prompts or conversations; none: the target writes its own (Spec-Bench is refused)")
    p.add_argument("--num-prompts", type=int, default=400, help="prompts the target writes itself (without --prompts)")
    p.add_argument("--max-tokens", type=int, default=256, help="the longest answer")
    add_flags(p, TrainConfig)
    add_flags(p, RuntimeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from verispec.eagle import data
    from verispec.eagle.train import Trainer, load_examples, save_examples
    from verispec.errors import InvalidInputError
    from verispec.llm import LLM

    config = from_flags(TrainConfig, args)
    for name in ("num_prompts", "max_tokens"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: an integer >= 1")
    folder = Path(args.out)
    llm = LLM(args.model, from_flags(RuntimeConfig, args))
    found = load_examples(folder)
    if found is None:
        if args.prompts:
            prompts, source = data.file_prompts(llm, args.prompts), args.prompts
        else:
            print(f"the target writes {args.num_prompts} prompts of its own ...", flush=True)
            prompts, source = data.own_prompts(llm, args.num_prompts, config.seed, progress=True), "written by the target"
        print(f"answering {len(prompts)} prompts (greedy, up to {args.max_tokens} tokens) ...", flush=True)
        examples = data.answer(llm, prompts, args.max_tokens, progress=True)
        save_examples(folder, examples, source)
    else:
        examples, source = found
        print(f"{len(examples)} examples from {folder / 'data.json'}", flush=True)
    if len(examples) < 2:
        raise InvalidInputError(f"{len(examples)} examples: training needs at least 2 (one is held out)")
    trainer = Trainer(llm, examples, config, folder)
    if trainer.resume():
        print(f"resuming at step {trainer.step} ({trainer.elapsed / 60:.1f} of {config.minutes} minutes)", flush=True)
    final = trainer.run()
    trainer.write(args.model, source)
    print("held-out acceptance by training minutes:")
    for point in trainer.curve:
        print(f"  {point['minutes']:7.2f} min  step {point['step']:6d}  mean accepted length "
              f"{point['mean_accepted_length']}  by position {point['by_position']}")
    print(f"the head is in {folder}: use --drafter eagle:{folder}")
    print(json.dumps({"out": str(folder), "examples": len(examples), "steps": trainer.step,
                      "minutes": round(trainer.elapsed / 60, 2), **final}))
