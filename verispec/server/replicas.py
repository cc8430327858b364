"""`verispec serve --replicas N`: N engine replicas as Ray Serve deployments behind one
OpenAI-compatible ingress (plain Ray Serve: `ray.serve.llm` needs vLLM).

A replica is the single server itself: create_app over its own LLM and scheduler, called through
ASGI inside a Serve deployment. The ingress forwards each HTTP request whole (method, path,
headers, body) with a streaming DeploymentHandle call and relays the ASGI messages that come back,
so both endpoints, streams, errors, usage.speculation and cancellation on disconnect are the single
server's own code. What the ingress adds:
- routing: a session (the `x-session-id` header, else the OpenAI `user` field) goes to one replica
  on Ray Serve's consistent-hash ring, so its conversation keeps meeting the caches and suffix tree
  that know it; a request without one goes to the less loaded of two replicas drawn at random
  (power of two choices);
- metrics: /metrics holds the ingress's own counters (verispec_ingress_*) and every replica's
  samples, labelled replica="ID"; a replica pushes its exposition every PUSH_S seconds, so a
  replica's gauges are up to that old;
- faults: a replica that dies fails the requests it held with a 503 JSON error (an error event, then
  [DONE], in a stream that had begun) and Ray Serve starts another; the others keep answering.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from verispec.config import ReplicaConfig, RuntimeConfig, ServeConfig
from verispec.server.protocol import endpoint, error, too_large

APP = "verispec"
NAMESPACE = "verispec"
REGISTRY = "verispec-metrics"  # the named actor that holds each replica's last exposition
PUSH_S = 1.0
STALE_S = 10.0  # a replica silent this long has left: its samples are dropped
SESSION_HEADER = "x-session-id"
REPLICA_HEADER = "x-verispec-replica"  # on every answer: the replica that gave it
OBJECT_STORE_BYTES = 256 << 20  # requests and answers are small; Ray's default takes 30 % of memory
# A local Ray shares the machine with its engines, so it is set to take less of their CPU (each unless
# the environment sets it): workers at normal priority (Ray's default niceness 15 puts the engine below
# every Ray daemon), no usage reports, no Ray metrics (ours go through the Registry), and Serve's
# controller looping every 0.5 s, not 0.1 s (it reacts to a dead replica in seconds either way).
QUIET_RAY = {"RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0",
             "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


async def asgi(app: Callable, request: dict[str, Any], interval_s: float = 0.0
               ) -> AsyncIterator[list[dict[str, Any]]]:
    """request {method, path, query, headers [(name, value)], body} -> the ASGI messages the app
    sends in answer (http.response.start, then http.response.body ...), in batches. A batch holds
    what the app sent while the last one was on its way, so that a slow consumer costs fewer
    crossings, not more. After the first two bodies (chat's role chunk and the first token, or a
    completion's first two tokens, which go as they come) a batch also gathers until interval_s
    has passed since the one before, and the app's last message ends it at once. Closing this
    generator early cancels the app's handler, which frees the request's slots as a disconnect does."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
             "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query"].encode(), "root_path": "", "client": ("127.0.0.1", 0),
             "server": ("verispec", 80),
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]]}
    unread = [{"type": "http.request", "body": request["body"], "more_body": False}]
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        if unread:
            return unread.pop()
        await asyncio.Future()  # the client stays until this generator is closed
        raise AssertionError("unreachable")

    async def gather(batch: list[dict[str, Any] | None], wait_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while batch[-1] is not None:
                    batch.append(await sent.get())

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(app(scope, receive, sent.put))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        done, bodies, last = False, 0, loop.time()
        while not done:
            batch = [await sent.get()]
            if bodies >= 2 and (wait_s := last + interval_s - loop.time()) > 0:
                await gather(batch, wait_s)
            while batch[-1] is not None and not sent.empty():
                batch.append(sent.get_nowait())
            done = batch[-1] is None
            if messages := [m for m in batch if m is not None]:
                bodies += sum(m["type"] == "http.response.body" for m in messages)
                last = loop.time()
                yield messages
    finally:
        task.cancel()


class Replica:
    """One engine replica: the single server's app over its own LLM and scheduler."""

    def __init__(self, model: str, runtime: RuntimeConfig, engine: dict[str, Any], config: ServeConfig,
                 name: str, interval_s: float) -> None:
        # imported here: the ingress, which loads this module too, never holds a model
        from verispec.llm import LLM
        from verispec.server.app import create_app

        self.id = serve.get_replica_context().replica_id.unique_id
        llm = LLM(model, runtime, **engine)
        self.scheduler = llm.scheduler(config.max_concurrency, config.max_queue, config.audit_rate)
        self.app = create_app(llm, self.scheduler, config, name)
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        threading.Thread(target=self._push, name="verispec-metrics-push", daemon=True).start()

    async def call(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """The ASGI messages of the app's answer to request, in batches (asgi), naming this replica."""
        async for batch in asgi(self.app, request, self.interval_s):
            yield [{**m, "headers": [*m.get("headers", []), (REPLICA_HEADER.encode(), self.id.encode())]}
                   if m["type"] == "http.response.start" else m for m in batch]

    def check_health(self) -> None:
        """Ray Serve's probe: a replica whose engine thread has died is replaced."""
        if not self.scheduler.alive:
            raise RuntimeError(f"the engine thread is not running: {self.scheduler.error!r}")

    def _push(self) -> None:
        while not self.stopped.wait(PUSH_S):
            self.registry.put.remote(self.id, os.getpid(), self.app.state.exposition().decode())

    def __del__(self) -> None:  # Ray Serve's shutdown hook; a constructor that failed has nothing to stop
        if hasattr(self, "stopped"):
            self.stopped.set()
            self.scheduler.stop()


class Registry:
    """Each replica's last exposition: replica id -> (pid, text, when)."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, str, float]] = {}

    def put(self, replica: str, pid: int, text: str) -> None:
        self.latest[replica] = (pid, text, time.time())

    def read(self) -> dict[str, tuple[int, str]]:
        now = time.time()
        self.latest = {r: entry for r, entry in self.latest.items() if now - entry[2] < STALE_S}
        return {r: (pid, text) for r, (pid, text, _) in self.latest.items()}


class ReplicaMetrics:
    """A prometheus collector: every replica's samples with a replica label, one family per name,
    and verispec_replica_info{replica, pid} = 1 for each replica heard from."""

    def __init__(self, read: Callable[[], dict[str, tuple[int, str]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        info = Metric("verispec_replica", "the engine replicas that reported, with their process ids", "info")
        for replica, (pid, text) in sorted(self.read().items()):
            info.add_sample("verispec_replica_info", {"replica": replica, "pid": str(pid)}, 1.0)
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
        return [info, *families.values()]


class SessionRouter(ConsistentHashRouter):
    """Ray Serve's consistent-hash ring for a request with a session; for one without, the less
    loaded of two replicas drawn at random (Serve probes the queue of each candidate)."""

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        if pending_request is not None and not pending_request.metadata.session_id and candidate_replicas:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        return await super().choose_replicas(candidate_replicas, pending_request)


def session(headers: Any, body: bytes) -> str | None:
    """The request's session: its x-session-id header, else the OpenAI `user` field, else none."""
    if key := headers.get(SESSION_HEADER):
        return key
    try:
        user = json.loads(body).get("user")
    except (ValueError, AttributeError):  # not JSON, or not an object: the replica answers the 400
        return None
    return user if isinstance(user, str) and user else None


async def relay(first: list[dict[str, Any]], answer: Any, events: bool) -> AsyncIterator[bytes]:
    """The body of a replica's answer: each batch of its messages (the first already read) as one
    chunk. A replica that fails midway ends a stream of events with an error event and [DONE], as the
    single server ends one."""
    try:
        batch = first
        while True:
            if chunk := b"".join(m.get("body", b"") for m in batch if m["type"] == "http.response.body"):
                yield chunk
            batch = await answer.__anext__()
    except StopAsyncIteration:
        pass
    except RayError as e:
        if events:
            yield f"data: {json.dumps(failure(e)[0])}\n\n".encode()
            yield b"data: [DONE]\n\n"
    finally:
        answer.cancel()


def failure(e: RayError) -> tuple[dict[str, Any], int]:
    """(OpenAI error body, status) for a replica call that failed: 500 for an error inside the
    replica's code, 503 for a replica that died or cannot be reached."""
    if isinstance(e, RayTaskError):
        return error(f"the replica failed: {e.cause!r}", "server_error"), 500
    return error(f"the replica serving this request is unavailable ({type(e).__name__}); retry",
                 "server_error", code="replica_unavailable"), 503


ingress = FastAPI(title="verispec", description="Lossless speculative decoding, OpenAI-style, on Ray Serve")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress)
class Ingress:
    """One OpenAI endpoint over the replicas: forwards every request, relays every answer."""

    def __init__(self, replicas: Any, max_body_bytes: int) -> None:
        self.replicas, self.limit = replicas, max_body_bytes
        self.metrics = CollectorRegistry()
        self.requests = Counter("verispec_ingress_requests", "HTTP requests at the ingress by endpoint and status",
                                ["endpoint", "status"], registry=self.metrics)
        registry = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        self.metrics.register(ReplicaMetrics(lambda: ray.get(registry.read.remote())))

    @ingress.get("/metrics")
    def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

    @ingress.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(self, path: str, request: Request) -> Response:
        answer = await self._answer(request)
        self.requests.labels(endpoint=endpoint("/" + path), status=str(answer.status_code)).inc()
        return answer

    async def _answer(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limit:
                return JSONResponse(error(too_large(self.limit), "invalid_request_error", code="body_too_large"), 413)
        body = bytes(body)
        key = session(request.headers, body)
        handle = self.replicas.options(stream=True, **({"session_id": key} if key else {}))
        answer = handle.call.remote({"method": request.method, "path": request.url.path, "query": request.url.query,
                                     "headers": list(request.headers.items()), "body": body})
        try:
            first = await answer.__anext__()
        except StopAsyncIteration:
            return JSONResponse(error("the replica gave no answer", "server_error"), 502)
        except RayError as e:
            answer.cancel()
            return JSONResponse(*failure(e))
        except BaseException:  # the client left (Serve cancels this handler): the replica's handler ends too
            answer.cancel()
            raise
        start = first[0]  # http.response.start: an ASGI app sends it before any body
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])
                   if k.lower() != b"content-length"}
        events = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(relay(first[1:], answer, events), status_code=start["status"], headers=headers)


def start(model: str, runtime: RuntimeConfig, engine: dict[str, Any], config: ServeConfig, scale: ReplicaConfig,
          name: str) -> str:
    """Serve the model on scale.replicas engine replicas (Ray Serve) at config.host:config.port, on a
    local Ray started here or on the cluster at scale.ray_address; returns the URL. Each replica runs
    runtime.threads threads (default: this machine's cores shared among the replicas) and asks Ray for
    as many CPUs."""
    low, high = scale.bounds
    threads = runtime.threads or max(1, (os.cpu_count() or 1) // scale.replicas)
    if scale.ray_address is None:
        for variable, value in QUIET_RAY.items():
            os.environ.setdefault(variable, value)
        ray.init(num_cpus=max(os.cpu_count() or 1, high * threads), include_dashboard=False, namespace=NAMESPACE,
                 object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
    else:
        ray.init(address=scale.ray_address, namespace=NAMESPACE, log_to_driver=False)
    ray.remote(num_cpus=0)(Registry).options(name=REGISTRY, namespace=NAMESPACE, lifetime="detached",
                                             get_if_exists=True).remote()
    serve.start(http_options={"host": config.host, "port": config.port})
    # a replica batches max_concurrency requests and queues max_queue: it, not Serve, answers 429 beyond
    holds = config.max_concurrency + config.max_queue
    sizing: dict[str, Any] = ({"num_replicas": scale.replicas} if low == high else {"autoscaling_config": {
        "min_replicas": low, "max_replicas": high, "initial_replicas": scale.replicas,
        "target_ongoing_requests": config.max_concurrency}})
    replicas = serve.deployment(Replica).options(
        ray_actor_options={"num_cpus": threads}, **sizing,
        max_ongoing_requests=holds,
        graceful_shutdown_timeout_s=config.shutdown_timeout,
        request_router_config=RequestRouterConfig(request_router_class=f"{__name__}.SessionRouter"),
    ).bind(model, dataclasses.replace(runtime, threads=threads), engine, config, name, scale.stream_interval_ms / 1e3)
    serve.run(Ingress.options(max_ongoing_requests=high * holds)
              .bind(replicas, config.max_body_bytes), name=APP, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def run(model: str, runtime: RuntimeConfig, engine: dict[str, Any], config: ServeConfig, scale: ReplicaConfig,
        name: str) -> None:
    """start, then serve until SIGTERM or SIGINT; then Serve lets open requests finish (for at most
    config.shutdown_timeout seconds) and Ray stops."""
    url = start(model, runtime, engine, config, scale, name)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, whose own handler would end the process at once
        signal.signal(sig, lambda *_: stop.set())
    print(f"verispec: serving {name!r} on {scale.replicas} replicas at {url}", flush=True)
    stop.wait()
    serve.shutdown()
    ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE))
    ray.shutdown()
