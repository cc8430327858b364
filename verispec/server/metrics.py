"""Prometheus metrics (prometheus-client), one registry per server. Names follow the glossary; the
speculation counters are shaped like vLLM's (`vllm:spec_decode_num_drafts`, ...), so dashboards
built for vLLM work with the prefix changed.

Two per-position acceptances, under two names: vLLM's `per_position_acceptance` (the share of
drafts whose token i was accepted: it never rises with i, RELIABILITY.md G) and the
`conditional_acceptance` α_i (draft i accepted given drafts 0..i-1 were). All updates happen on the
event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from verispec.types import Stats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SPEC = "verispec_spec_decode_"


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
        self.cycles = Counter(SPEC + "num_cycles", "cycles (a plain step is a cycle with tau 0)", registry=r)
        self.drafts = Counter(SPEC + "num_drafts", "cycles that drafted (vLLM's drafts)", registry=r)
        self.drafted = Counter(SPEC + "num_draft_tokens", "draft tokens verified", registry=r)
        self.accepted = Counter(SPEC + "num_accepted_tokens", "draft tokens accepted", registry=r)
        self.drafted_at = Counter(SPEC + "num_draft_tokens_per_pos", "draft tokens verified at position",
                                  ["position"], registry=r)
        self.accepted_at = Counter(SPEC + "num_accepted_tokens_per_pos", "draft tokens accepted at position",
                                   ["position"], registry=r)
        self.tau = Histogram(SPEC + "tau", "tau chosen per cycle", buckets=tuple(range(16)), registry=r)
        self.acceptance_rate = Gauge(SPEC + "acceptance_rate", "accepted / drafted", registry=r)
        self.mean_accepted_length = Gauge(SPEC + "mean_accepted_length",
                                          "vLLM's: 1 + accepted / drafts, over the cycles that drafted", registry=r)
        self.tokens_per_cycle = Gauge(SPEC + "tokens_per_cycle",
                                      "tokens committed per target forward of decoding: 1 + accepted / cycles",
                                      registry=r)
        self.per_position_acceptance = Gauge(SPEC + "per_position_acceptance",
                                             "vLLM's: the share of drafts whose token at this position was accepted",
                                             ["position"], registry=r)
        self.conditional_acceptance = Gauge(SPEC + "conditional_acceptance",
                                            "the chance a draft token at this position is accepted given the "
                                            "earlier ones were", ["position"], registry=r)
        self._totals = Stats()
        self.audited = Gauge("verispec_audited_requests", "greedy speculative requests decoded again plainly",
                             registry=r)
        self.audit_mismatches = Gauge("verispec_audit_mismatches", "of those, the ones whose tokens differed",
                                      registry=r)
        self.monitor_tokens = Gauge("verispec_monitor_tokens", "sampled tokens the losslessness monitor has seen",
                                    ["drafter"], registry=r)
        self.monitor_p_value = Gauge("verispec_monitor_p_value", "chi-square p-value of their u-values, all of "
                                     "them (uniform under a lossless verifier; below 1e-6: not lossless)",
                                     ["drafter"], registry=r)
        self.monitor_window_p_value = Gauge("verispec_monitor_window_p_value",
                                            "the same over the last 4096 tokens", ["drafter"], registry=r)

    def audit(self, audited: int, mismatches: int) -> None:
        """The greedy audit's counts (engine/scheduler.py Audit), read at a scrape."""
        self.audited.set(audited)
        self.audit_mismatches.set(mismatches)

    def monitor(self, report: dict[str, dict]) -> None:
        """The losslessness monitor's state (Monitor.report()), read at a scrape."""
        for drafter, fit in report.items():
            self.monitor_tokens.labels(drafter=drafter).set(fit["tokens"])
            for gauge, value in ((self.monitor_p_value, fit["p_value"]),
                                 (self.monitor_window_p_value, fit["window_p_value"])):
                if value is not None:
                    gauge.labels(drafter=drafter).set(value)

    def cycle(self, tau: int, drafted: int, accepted: int) -> None:
        totals = self._totals
        totals.record_cycle(drafted, accepted)
        self.cycles.inc()
        self.drafts.inc(drafted > 0)
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)
        self.tau.observe(tau)
        for i in range(drafted):
            self.drafted_at.labels(position=str(i)).inc()
        for i in range(accepted):
            self.accepted_at.labels(position=str(i)).inc()
        self.tokens_per_cycle.set(totals.tokens_per_cycle)
        if totals.drafts:
            self.acceptance_rate.set(totals.acceptance_rate)
            self.mean_accepted_length.set(totals.mean_accepted_length)
            for gauge, values in ((self.per_position_acceptance, totals.per_position_acceptance),
                                  (self.conditional_acceptance, totals.conditional_acceptance)):
                for i, value in enumerate(values):
                    gauge.labels(position=str(i)).set(value)
