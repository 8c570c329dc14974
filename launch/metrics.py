"""Prometheus metrics of the HTTP server (`specexec_` prefix), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters fed by the model's hooks (`on_round`, `on_result`) and by the request handlers."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specexec_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("specexec_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("specexec_generated_tokens", "Tokens generated", registry=r)
        self.target_passes = Counter("specexec_target_passes", "Target forward passes (rounds)", registry=r)
        self.gen_rate = Gauge("specexec_gen_rate", "Tokens per target pass of the last generation", registry=r)
        self.round_latency = Histogram("specexec_round_latency_seconds", "Draft + verify time of one round",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.draft_seconds = Counter("specexec_draft_seconds", "Seconds spent drafting", registry=r)
        self.verify_seconds = Counter("specexec_verify_seconds", "Seconds waiting for the verifier", registry=r)
        self.active = Gauge("specexec_active_sessions", "Generations running now", registry=r)
        self.queued = Gauge("specexec_queued_requests", "Requests waiting for the model", registry=r)

    def watch(self, scheduler) -> None:
        """Read the running and waiting counts from the scheduler at each scrape."""
        self.active.set_function(lambda: scheduler.active)
        self.queued.set_function(lambda: scheduler.queued)

    def on_round(self, seconds: float, tokens: int) -> None:
        self.round_latency.observe(seconds)

    def on_result(self, completion) -> None:
        s = completion.stats
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.generated_tokens.inc(len(completion.token_ids))
        self.target_passes.inc(s.get("target_forwards", 0))
        if s.get("target_forwards"):
            self.gen_rate.set(s.get("gen_rate", 0.0))
        self.draft_seconds.inc(s.get("draft_s", 0.0))
        self.verify_seconds.inc(s.get("verify_s", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
