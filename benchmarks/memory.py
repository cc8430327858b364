"""Resident memory a model costs: what loading adds to the process (weights and backend, then the
whole LLM with its tokenizer and engine, the KV cache's bytes counted apart), beside the file's size.
Each model loads in a fresh process, after the imports, so nothing else is counted. Prints a table;
the last line is one JSON object.

    python benchmarks/memory.py [--model smollm2-135m-instruct --model gemma-3-270m] [--context 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from verispec import hub

CHILD = """
import gc, json, os, sys
import torch
from verispec import hub
from verispec.config import RuntimeConfig
from verispec.llm import LLM
from verispec.model.load import load_model

def rss():
    gc.collect()
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

model, context = sys.argv[1], int(sys.argv[2])
source = hub.resolve(model)
path = source.folder / source.gguf_file
base = rss()
target = load_model(source, context, torch.device("cpu"))
loaded = rss() - base
del target
base = rss()
llm = LLM(model, RuntimeConfig(max_context=context))
cache = llm.engine.cache.nbytes
print(json.dumps({"file": os.path.getsize(path), "load_model": loaded, "llm": rss() - base - cache, "kv_cache": cache}))
"""


def measure(model: str, context: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(context)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="a built-in name, a .gguf file (default: the built-in models)")
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    models = args.model or list(hub.BUILTINS)
    results = {}
    print(f"{'model':28} {'file MB':>8} {'load_model MB':>14} {'x file':>7} {'LLM MB':>8} {'x file':>7} {'KV cache MB':>12}")
    for model in models:
        r = measure(model, args.context)
        results[model] = {**r, "load_model_x_file": r["load_model"] / r["file"], "llm_x_file": r["llm"] / r["file"]}
        mb = 2**20
        print(f"{model:28} {r['file'] / mb:8.1f} {r['load_model'] / mb:14.1f} {r['load_model'] / r['file']:7.2f} "
              f"{r['llm'] / mb:8.1f} {r['llm'] / r['file']:7.2f} {r['kv_cache'] / mb:12.1f}")
    print(json.dumps({"context": args.context, "models": results}))


if __name__ == "__main__":
    main()
