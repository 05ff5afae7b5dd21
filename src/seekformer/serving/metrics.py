"""Server metrics for GET /metrics, through `prometheus-client` (one registry per app, so several servers
can live in one process).

    metrics = ServerMetrics(lambda: backend.waiting, lambda: backend.running)
    metrics.requests.labels(endpoint="/v1/completions", status="200").inc()
    body, content_type = metrics.render(), metrics.content_type

Names (prefixed `seekformer_`): requests_total{endpoint,status}, prompt_tokens_total,
generation_tokens_total, rejected_requests_total, queue_depth, running_sequences,
request_latency_seconds{endpoint} (histogram), time_to_first_token_seconds (histogram). Counters also
export the client library's `_created` timestamps.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """The metrics `seekformer serve` exports (see the module docstring)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        p = "seekformer_"
        self.registry = r = CollectorRegistry()
        self.requests = Counter(p + "requests", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
        self.rejected = Counter(p + "rejected_requests", "Requests refused because the queue was full.", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Sequences waiting for a batch slot.", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.running = Gauge(p + "running_sequences", "Sequences being decoded in the batch.", registry=r)
        self.running.set_function(running)
        self.latency = Histogram(p + "request_latency_seconds", "Time from request arrival to its last byte.",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from admission to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
