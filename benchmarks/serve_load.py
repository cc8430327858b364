"""Serving under load: throughput and latency with 1, 4, 8 and 16 concurrent clients against a real
`verispec serve` process, speculative (each drafter, τ auto: the controllers and the batch planner)
beside plain decoding (--drafter none), and beside serving the same requests one at a time; with
--replicas, also through Ray Serve (`--replicas N`; 0 is the single server).

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--drafter ngram,none]
                                    [--requests 32] [--max-tokens 64] [--concurrency 1,4,8,16] [--rounds 2]
                                    [--replicas 0,1,2] [--stream-interval-ms MS]

Every client streams (so time to first token is measured) a greedy chat request over Spec-Bench
prompts (2 a category, in turn), or over the grounded categories only with --grounded. The
servers take turns (A B A B: one round is every server, started fresh, warmed up, through every
concurrency); figures are medians over rounds. "vs plain" is a drafter's throughput over the
plain server's (same replicas) at the same concurrency, "vs 1" over its own at concurrency 1;
"tpot" is the median time per output token after the first, and "vs single" a Ray server's tpot
over the single server's with the same drafter and clients (its overhead). Two servers never run
at once (they would share the two cores). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

from verispec import hub
from verispec.benchmark.prompts import load_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, drafter: str, max_concurrency: int, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """A server on a free port, once /health answers 200 (-> its process and URL)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "verispec.cli.main", "serve", "--model", model, "--drafter", drafter,
                             "--port", str(port), "--max-concurrency", str(max_concurrency), *flags],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; its log is {log.name}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    raise SystemExit("the server did not come up in 180 s")


def one(client: OpenAI, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": first or 0.0, "tokens": tokens,
            "tpot": (latency - (first or 0.0)) / max(tokens - 1, 1)}


def load(client: OpenAI, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one(client, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(prompts), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 2),
            "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
            "latency_p90_s": round(sorted(r["latency"] for r in results)[math.ceil(0.9 * len(results)) - 1], 3),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3),
            "tpot_p50_ms": round(1e3 * statistics.median(r["tpot"] for r in results), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--drafter", default="ngram,none", help="comma-separated drafters, one server each ('none': plain)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--grounded", action="store_true", help="summarization, rag, extraction and qa prompts only")
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    ap.add_argument("--replicas", default="0", help="comma-separated replica counts, one server each (0: no Ray)")
    ap.add_argument("--stream-interval-ms", type=float, help="a Ray server's stream batching (default: the server's)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    categories = ["summarization", "rag", "extraction", "qa"] if args.grounded else None
    pool = [p.text for p in load_prompts("spec-bench", categories, per_category=8 if args.grounded else 2)]
    prompts = [pool[(i * 7) % len(pool)] for i in range(args.requests)]  # spread over the categories
    servers = [(d, int(n)) for n in args.replicas.split(",") for d in args.drafter.split(",")]
    runs: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for drafter, replicas in servers:
            flags = ["--max-context", "2048"] + (["--threads", str(args.threads)] if args.threads else [])
            if replicas:
                flags += ["--replicas", str(replicas), "--shutdown-timeout", "5"]
                if args.stream_interval_ms is not None:
                    flags += ["--stream-interval-ms", str(args.stream_interval_ms)]
            proc, url = start(args.model, drafter, max(levels), flags)
            try:
                client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
                load(client, args.model, prompts[: max(levels)], 16, max(levels))  # warm-up
                for level in levels:
                    row = load(client, args.model, prompts, args.max_tokens, level)
                    runs.setdefault((drafter, replicas, level), []).append(row)
                    print(f"round {r} {drafter:>8} r={replicas} c={level:<3} {row['tok_s']:>7.1f} tok/s  "
                          f"p50 {row['latency_p50_s']:>6.2f}s  ttft p50 {row['ttft_p50_s']:>5.2f}s  "
                          f"tpot {row['tpot_p50_ms']:>6.2f} ms", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    rows = [{"drafter": d, "replicas": n, "concurrency": c,
             **{k: round(statistics.median(x[k] for x in runs[d, n, c]), 3)
                for k in runs[d, n, c][0] if k not in ("concurrency", "requests")}}
            for d, n in servers for c in levels]

    def find(drafter: str, replicas: int, concurrency: int) -> dict | None:
        return next((x for x in rows if (x["drafter"], x["replicas"], x["concurrency"]) == (drafter, replicas,
                                                                                             concurrency)), None)

    print()
    print(f"{'drafter':>8} {'replicas':>8} {'clients':>7} {'tok/s':>7} {'vs plain':>8} {'vs 1':>6} {'p50 s':>6} "
          f"{'p90 s':>6} {'ttft s':>6} {'tpot ms':>7} {'vs single':>9}")
    for row in rows:
        d, n, c = row["drafter"], row["replicas"], row["concurrency"]
        row["vs_one_at_a_time"] = round(row["tok_s"] / find(d, n, levels[0])["tok_s"], 3)
        if (plain := find("none", n, c)) is not None:
            row["vs_plain"] = round(row["tok_s"] / plain["tok_s"], 3)
        if n and (single := find(d, 0, c)) is not None:
            row["tpot_vs_single"] = round(row["tpot_p50_ms"] / single["tpot_p50_ms"], 3)
        print(f"{d:>8} {n:>8} {c:>7} {row['tok_s']:>7.1f} {row.get('vs_plain', 0):>7.2f}x "
              f"{row['vs_one_at_a_time']:>5.2f}x {row['latency_p50_s']:>6.2f} {row['latency_p90_s']:>6.2f} "
              f"{row['ttft_p50_s']:>6.2f} {row['tpot_p50_ms']:>7.2f} {row.get('tpot_vs_single', 0):>8.2f}x")
    print(json.dumps({"benchmark": "serve_load", "model": args.model, "max_tokens": args.max_tokens,
                      "rounds": args.rounds, "grounded": args.grounded, "rows": rows}))


if __name__ == "__main__":
    main()
