"""Prometheus metrics (prometheus-client), one registry per server. Names follow the glossary.

Per-position acceptance uses vLLM's definition: the share of drafting cycles whose draft i was
accepted, so it never increases with i (RELIABILITY.md G). All updates happen on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("verispec_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        Gauge("verispec_queue_depth", "requests waiting for a slot", registry=r).set_function(waiting)
        Gauge("verispec_running_requests", "requests in the running batch", registry=r).set_function(running)
        self.prompt_tokens = Counter("verispec_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("verispec_generation_tokens", "tokens generated and returned", registry=r)
        self.ttft = Histogram("verispec_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("verispec_time_per_output_token_seconds",
                                   "decode time per token after the first, per request", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.latency = Histogram("verispec_request_latency_seconds", "from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.cycles = Counter("verispec_spec_cycles", "cycles (a plain step is a cycle with tau 0)", registry=r)
        self.drafted = Counter("verispec_spec_drafted_tokens", "draft tokens verified", registry=r)
        self.accepted = Counter("verispec_spec_accepted_tokens", "draft tokens accepted", registry=r)
        self.drafted_at = Counter("verispec_spec_drafted_tokens_per_position", "draft tokens verified at position",
                                  ["position"], registry=r)
        self.accepted_at = Counter("verispec_spec_accepted_tokens_per_position",
                                   "draft tokens accepted at position", ["position"], registry=r)
        self.tau = Histogram("verispec_spec_tau", "tau chosen per cycle", buckets=tuple(range(16)), registry=r)
        self.acceptance_rate = Gauge("verispec_spec_acceptance_rate", "accepted / drafted", registry=r)
        self.mean_accepted_length = Gauge("verispec_spec_mean_accepted_length",
                                          "tokens committed per cycle: 1 + accepted / cycles", registry=r)
        self.position_acceptance = Gauge("verispec_spec_position_acceptance",
                                         "share of drafting cycles whose draft at this position was accepted",
                                         ["position"], registry=r)
        self._counts = {"cycles": 0, "drafted": 0, "accepted": 0}
        self._drafted_at: list[int] = []
        self._accepted_at: list[int] = []

    def cycle(self, tau: int, drafted: int, accepted: int) -> None:
        c = self._counts
        c["cycles"] += 1
        c["drafted"] += drafted
        c["accepted"] += accepted
        self.cycles.inc()
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self.tau.observe(tau)
        for counts, n, metric in ((self._drafted_at, drafted, self.drafted_at),
                                  (self._accepted_at, accepted, self.accepted_at)):
            counts.extend([0] * max(0, n - len(counts)))
            for i in range(n):
                counts[i] += 1
                metric.labels(position=str(i)).inc()
        if c["drafted"]:
            self.acceptance_rate.set(c["accepted"] / c["drafted"])
            for i, kept in enumerate(self._accepted_at):
                self.position_acceptance.labels(position=str(i)).set(kept / self._drafted_at[0])
        self.mean_accepted_length.set(1 + c["accepted"] / c["cycles"])
