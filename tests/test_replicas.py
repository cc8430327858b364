"""`verispec serve --replicas 2` on a real local Ray cluster (verispec/server/replicas.py), spoken to
with the official openai client and raw HTTP through the ingress: both endpoints whole and streamed
as plain generation gives them, the single server's 4xx JSON, 8 concurrent requests, session
affinity by header and by `user`, each replica's metrics under its label summing to the answers'
usage, a disconnect that frees the replica's slot, and a replica killed mid-request: its requests
fail with a 503 (an error event in a stream), the service keeps answering and Ray replaces it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import MODEL, Server

from verispec.cli.main import main
from verispec.config import SamplingParams

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'verispec[ray]')")

CONTEXT = 4096
PUSH_WAIT_S = 2.5  # a replica pushes its metrics every second
EXTRA = {"return_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def service(folder):
    s = Server(folder, "--replicas", "2", "--drafter", "ngram", "--num-draft-tokens", "3", "--max-concurrency", "4",
               "--max-body-bytes", "100000", "--shutdown-timeout", "2", "--api-key", "test-key")
    # affinity holds while the set of replicas stands still: wait until the ingress routes to both
    deadline = time.time() + 60
    while len(replicas(s)) < 2 or len({replica_of(complete(s, max_tokens=1)) for _ in range(8)}) < 2:
        assert time.time() < deadline, "the ingress does not reach both replicas"
    yield s
    s.stop()


# a replica's batching of the ASGI messages it sends back (asgi), on an app that sends at a known pace
def paced(gaps_s: list[float]):
    """An ASGI app answering with a start, then a body after each gap (each body stamped with when it
    was sent), then the closing empty body."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i, gap in enumerate(gaps_s):
            await asyncio.sleep(gap)
            await send({"type": "http.response.body", "body": f"{i},".encode(), "more_body": True,
                        "sent": time.perf_counter()})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return app


def batches(gaps_s: list[float], interval_s: float) -> list[tuple[float, list[dict]]]:
    """(when it came, the batch) for every batch asgi yields over paced(gaps_s)."""
    from verispec.server.replicas import asgi

    async def collect():
        request = {"method": "POST", "path": "/v1/completions", "query": "", "headers": [], "body": b""}
        return [(time.perf_counter(), batch) async for batch in asgi(paced(gaps_s), request, interval_s)]
    return asyncio.run(collect())


def test_a_stream_crosses_once_an_interval_after_its_first_two_chunks_which_go_at_once():
    interval = 0.06
    got = batches([0.01, 0.01] + [0.004] * 50, interval)
    bodies = [(when, m) for when, batch in got for m in batch if m.get("sent")]
    assert b"".join(m["body"] for _, m in bodies) == b"".join(f"{i},".encode() for i in range(52))
    assert all(when - m["sent"] < interval / 2 for when, m in bodies[:2]), "the head waited for the interval"
    later = [when for when, batch in got if any(m.get("sent") and int(m["body"][:-1]) >= 2 for m in batch)]
    span = bodies[-1][1]["sent"] - bodies[2][1]["sent"]
    assert len(later) <= span / interval + 2, f"{len(later)} batches for {span:.3f} s of tokens"


def test_a_stream_ends_as_soon_as_the_app_does_not_an_interval_later():
    got = batches([0.0, 0.0, 0.005, 0.005, 0.005], interval_s=0.5)
    last_sent = max(m["sent"] for _, batch in got for m in batch if m.get("sent"))
    assert got[-1][0] - last_sent < 0.25


def replica_of(response: httpx.Response) -> str:
    return response.headers["x-verispec-replica"]


def complete(service, prompt: str = "the end the", max_tokens: int = 8, **fields) -> httpx.Response:
    return service.http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, **fields})


def replicas(service, wait_s: float = 30) -> dict[str, int]:
    """replica id -> pid, from the ingress's metrics, once both replicas have reported (or wait_s passed)."""
    deadline = time.time() + wait_s
    while True:
        found = {key.split("replica=")[1].rstrip("}"): int(key.split("pid=")[1].split(",")[0])
                 for key in service.metrics() if key.startswith("verispec_replica_info")}
        if len(found) == 2 or time.time() > deadline:
            return found
        time.sleep(0.5)


def test_both_endpoints_whole_and_streamed_equal_plain_generation(service, llm):
    want = llm.generate("the end the", SamplingParams(max_tokens=30, ignore_eos=True)).token_ids
    whole = service.client.completions.create(model=MODEL, prompt="the end the", max_tokens=30, temperature=0,
                                              extra_body=EXTRA)
    assert whole.choices[0].model_extra["token_ids"] == want
    assert whole.usage.model_extra["speculation"]["cycles"] >= 1
    streamed = service.client.completions.create(model=MODEL, prompt="the end the", max_tokens=30, temperature=0,
                                                 stream=True, extra_body=EXTRA)
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
    messages = [{"role": "user", "content": "the end the"}]
    chat = service.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                  extra_body=EXTRA)
    assert chat.choices[0].message.content == llm.tokenizer.decode(
        llm.generate(messages, SamplingParams(max_tokens=20, ignore_eos=True), chat=True).token_ids,
        skip_special_tokens=True)
    pieces = service.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                    stream=True, extra_body=EXTRA)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat.choices[0].message.content


def test_errors_are_the_single_servers_json(service):
    bad = complete(service, max_tokens=-3)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    unknown = service.http.post("/v1/completions", json={"model": "other", "prompt": "x", "max_tokens": 2})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert httpx.post(service.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    large = complete(service, prompt="x" * 200_000)
    assert large.status_code == 413 and large.json()["error"]["code"] == "body_too_large"
    broken = service.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_eight_concurrent_requests_each_get_their_own_answer(service, llm):
    prompts = [f"the end {'the ' * i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: complete(service, p, 12, **EXTRA), prompts))
    for prompt, answer in zip(prompts, answers):
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["token_ids"] == llm.generate(
            prompt, SamplingParams(max_tokens=12, ignore_eos=True)).token_ids


def test_a_session_stays_on_one_replica_and_requests_without_one_spread(service):
    for session in ("alpha", "beta", "gamma"):
        by_header = {replica_of(service.http.post("/v1/completions", headers={"x-session-id": session},
                                                   json={"model": MODEL, "prompt": "a", "max_tokens": 2}))
                     for _ in range(5)}
        by_user = {replica_of(complete(service, max_tokens=2, user=session)) for _ in range(5)}
        assert len(by_header) == 1 and len(by_user) == 1
    homes = {replica_of(complete(service, max_tokens=2, user=f"user-{i}")) for i in range(16)}
    assert len(homes) == 2, "sessions hash onto both replicas"
    anywhere = {replica_of(complete(service, max_tokens=2)) for _ in range(16)}
    assert len(anywhere) == 2, "requests without a session go to either replica"


def test_each_replicas_metrics_carry_its_label_and_sum_to_the_answers(service):
    time.sleep(PUSH_WAIT_S)
    before = service.metrics()
    used = [complete(service, "the end the end the", 40, user=f"m{i}", **EXTRA).json()["usage"]["speculation"]
            for i in range(6)]
    time.sleep(PUSH_WAIT_S)
    after = service.metrics()
    ids = replicas(service)
    assert len(ids) == 2

    def total(name: str, metrics: dict[str, float]) -> float:
        return sum(metrics.get(f"{name}{{replica={r}}}", 0.0) for r in ids)

    for name, field in (("verispec_spec_decode_num_draft_tokens_total", "drafted"),
                        ("verispec_spec_decode_num_accepted_tokens_total", "accepted"),
                        ("verispec_spec_decode_num_cycles_total", "cycles")):
        assert total(name, after) - total(name, before) == sum(u[field] for u in used), name
    assert sum(u["drafted"] for u in used) > 0, "the replicas drafted"
    assert after["verispec_ingress_requests_total{endpoint=/v1/completions,status=200}"] >= 6


def test_a_client_that_hangs_up_frees_its_replicas_slot(service):
    def generated() -> float:
        return sum(v for k, v in service.metrics().items() if k.startswith("verispec_generation_tokens_total"))

    time.sleep(PUSH_WAIT_S)
    before = generated()
    with httpx.stream("POST", service.url + "/v1/completions", headers={"Authorization": "Bearer test-key"},
                      json={"model": MODEL, "prompt": "a", "max_tokens": CONTEXT - 50, "stream": True,
                            "ignore_eos": True}, timeout=30) as r:
        next(r.iter_lines())
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(PUSH_WAIT_S)
        running = [v for k, v in service.metrics().items() if k.startswith("verispec_running_requests")]
        if running and sum(running) == 0:
            break
    else:
        pytest.fail(f"a replica still runs the abandoned request: {running}")
    assert generated() - before < (CONTEXT - 50) / 2, "the abandoned request ran on"


def test_a_killed_replica_fails_its_requests_with_503_and_the_others_answer(service):
    ids = replicas(service)
    victim = replica_of(complete(service, max_tokens=2, user="victim"))
    long = {"model": MODEL, "prompt": "a", "max_tokens": CONTEXT - 50, "ignore_eos": True, "user": "victim"}
    got: dict[str, httpx.Response] = {}
    whole = threading.Thread(target=lambda: got.setdefault("whole", service.http.post("/v1/completions", json=long)))
    whole.start()
    with httpx.stream("POST", service.url + "/v1/completions", json={**long, "stream": True}, timeout=60,
                      headers={"Authorization": "Bearer test-key"}) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(ids[victim], signal.SIGKILL)
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "replica_unavailable"
    whole.join(60)
    assert not whole.is_alive(), "the whole request hangs"
    assert got["whole"].status_code == 503 and got["whole"].json()["error"]["code"] == "replica_unavailable"
    for i in range(6):  # the other replica answers, and the victim's sessions move to it
        answer = complete(service, max_tokens=4, **({"user": "victim"} if i % 2 else {}))
        assert answer.status_code == 200, answer.text
    deadline = time.time() + 120
    while time.time() < deadline and (len(now := replicas(service, 0)) < 2 or victim in now):
        time.sleep(2)
    assert len(now) == 2 and victim not in now, f"Ray did not replace the killed replica: {now}"


@pytest.mark.parametrize("flags, says", [
    (["--replicas", "2", "--min-replicas", "3"], "min_replicas"),
    (["--replicas", "2", "--max-replicas", "1"], "max_replicas"),
    (["--ray-address", "auto"], "need replicas >= 1"),
    (["--replicas", "-1"], "replicas=-1"),
    (["--replicas", "1", "--stream-interval-ms", "-5"], "stream_interval_ms=-5"),
])
def test_bad_replica_flags_exit_2_naming_them(flags, says, folder, capsys):
    assert main(["serve", "--model", str(folder), *flags]) == 2
    assert says in capsys.readouterr().err
