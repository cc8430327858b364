"""`verispec serve`: the OpenAI-compatible server (FastAPI + uvicorn) over a batched engine thread.

SIGTERM (or Ctrl-C) stops accepting connections and lets in-flight requests finish, for at most
--shutdown-timeout seconds: then open streams end with an error event and `data: [DONE]`, whole
answers with a 503. It stops the engine thread, then exits the way uvicorn does: by the same signal,
re-raised.

With --replicas N the model is served by N engine replicas on Ray Serve behind one endpoint
(verispec/server/replicas.py, docs/replicas.md).
"""

from __future__ import annotations

import argparse
import logging
from types import FrameType

from verispec import hub
from verispec.cli.flags import add_flags, from_flags
from verispec.cli.generate import add_drafter_flags
from verispec.config import ReplicaConfig, RuntimeConfig, ServeConfig
from verispec.drafters.select import parse_drafter
from verispec.errors import InvalidInputError

HELP = {
    "max_concurrency": "requests run at once, batched in one forward per step (default 8)",
    "max_queue": "requests waiting beyond those; more are answered 429 (default 64)",
    "api_key": "demand 'Authorization: Bearer KEY' on /v1 (default: open)",
    "max_body_bytes": "larger request bodies are answered 413 (default 1 MiB)",
    "served_model_name": "the model id clients send (default: --model as given)",
    "shutdown_timeout": "seconds a shutdown waits for open requests before it ends them with an error (default 30)",
    "audit_rate": "share of greedy speculative requests decoded again plainly, when nothing waits, to check that "
                  "they are exact (default 0.01)",
    "replicas": "engine replicas on Ray Serve behind one endpoint (default 0: one engine, no Ray; docs/replicas.md)",
    "min_replicas": "with --max-replicas: Ray Serve scales the replicas between these on queue depth",
    "max_replicas": "the most replicas autoscaling may start (default: --replicas, a fixed count)",
    "ray_address": "join this Ray cluster (ray start --head elsewhere) instead of starting a local Ray",
    "stream_interval_ms": "through Ray, a replica sends a stream's chunks in batches at most this often after the "
                          "first token, as each crossing costs CPU (default 50; 0: each chunk as it comes)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=hub.DEFAULT_MODEL, help="a built-in name, a .gguf file or a Hugging Face folder")
    add_drafter_flags(p)
    add_flags(p, ServeConfig, HELP)
    add_flags(p, ReplicaConfig, HELP)
    add_flags(p, RuntimeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from verispec.llm import LLM
    from verispec.server.app import create_app

    config, scale, runtime = from_flags(ServeConfig, args), from_flags(ReplicaConfig, args), from_flags(RuntimeConfig, args)
    engine = {"drafter": args.drafter, "num_draft_tokens": args.num_draft_tokens, "suffix_global": args.suffix_global,
              "suffix_budget": args.suffix_budget}
    name = config.served_model_name or args.model
    if scale.replicas:
        try:
            from verispec.server import replicas
        except ImportError as e:
            raise InvalidInputError(f"--replicas {scale.replicas} needs Ray Serve ({e}): pip install "
                                    "'verispec[ray]'", param="replicas") from None
        hub.resolve(args.model)  # a bad model or drafter fails here, before Ray starts
        parse_drafter(args.drafter)
        return replicas.run(args.model, runtime, engine, config, scale, name)
    llm = LLM(args.model, runtime, **engine)
    scheduler = llm.scheduler(config.max_concurrency, config.max_queue, config.audit_rate)
    app = create_app(llm, scheduler, config, name)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:  # the first signal starts the clock
                scheduler.drain(config.shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own bound is a backstop: drain has ended every request by then
    Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                          timeout_graceful_shutdown=int(config.shutdown_timeout) + 5)).run()
