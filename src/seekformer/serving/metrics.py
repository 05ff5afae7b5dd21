"""Server metrics in the Prometheus text exposition format (version 0.0.4), for GET /metrics.

Three kinds, enough for a request server, thread-safe (the decode worker and the event loop both write):
counters (monotonic totals), gauges (current values, optionally read from a callback at scrape time)
and histograms (cumulative buckets, `_sum`, `_count`). Labels are a fixed tuple of names per metric.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _fmt(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [n + '="' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str] | None) -> tuple[str, ...]:
        labels = labels or {}
        return tuple(str(labels.get(n, "")) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing total per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0.0)] if not self.label_names else [])
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    """A current value; `fn` (if given) is called at scrape time instead of a stored value."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help)
        self.fn = fn
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def render(self) -> list[str]:
        v = self.fn() if self.fn is not None else self._value
        return self.header() + [f"{self.name} {_fmt(v)}"]


class Histogram(_Metric):
    """Observations counted in cumulative buckets (`le`), with their sum and count, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._data: dict[tuple[str, ...], list[float]] = {}  # key -> bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            d = self._data.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels: str) -> float:
        d = self._data.get(self._key(labels))
        return d[-1] if d else 0.0

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for key, d in items:
            for i, b in enumerate(self.buckets):
                le = 'le="' + _fmt(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_fmt(d[i])}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_fmt(d[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_fmt(d[-1])}")
        return out


class ServerMetrics:
    """The metrics `seekformer serve` exports (names prefixed `seekformer_`)."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        p = "seekformer_"
        self.requests = Counter(p + "requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated.")
        self.rejected = Counter(p + "rejected_requests_total", "Requests refused because the queue was full.")
        self.queue_depth = Gauge(p + "queue_depth", "Sequences waiting for a batch slot.", queue_depth)
        self.running = Gauge(p + "running_sequences", "Sequences being decoded in the batch.", running)
        self.latency = Histogram(p + "request_latency_seconds", "Time from request arrival to its last byte.",
                                 ("endpoint",))
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from admission to the first generated token.")
        self._all = [self.requests, self.prompt_tokens, self.generation_tokens, self.rejected, self.queue_depth,
                     self.running, self.latency, self.ttft]

    def render(self) -> str:
        return "\n".join(line for m in self._all for line in m.render()) + "\n"
