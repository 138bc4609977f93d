"""Prometheus metrics in the text exposition format (version 0.0.4), written here in ~100 lines.

prometheus_client is not installed in okdpipe's environment; counters, a gauge and histograms are all the
server needs, and they are only touched from the event loop thread, so no locks either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelValues = tuple[str, ...]
# Label values come only from the server's own vocabulary: any other method a client sends counts as "other",
# so no client can create new series (the route label is the matched route template, never the raw path).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# A request the HTTP layer refuses (a malformed or oversized head, a chunked body declared too large) reaches no
# route: it is counted under this fixed route label. When the app already had it (its head was fine), the HTTP
# layer sets REFUSED_SCOPE_KEY in its ASGI scope, and the middleware leaves it to be counted once, as refused.
REFUSED_ROUTE = "(refused)"
REFUSED_SCOPE_KEY = "okdpipe.refused"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    """Name, help text and label names shared by every kind; subclasses render their samples."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        self.name, self.help_text, self.label_names = name, help_text, label_names

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}", *self.samples()]
        return "\n".join(lines)

    def samples(self) -> Iterable[str]:
        raise NotImplementedError


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()):
        super().__init__(name, help_text, label_names)
        self.values: dict[LabelValues, float] = {} if label_names else {(): 0.0}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def samples(self) -> Iterable[str]:
        for values, total in sorted(self.values.items()):
            yield f"{self.name}{_labels_text(self.label_names, values)} {_number(total)}"


class Gauge(Metric):
    """A value read when scraped (queue depth, readiness), so it can never go stale."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def samples(self) -> Iterable[str]:
        yield f"{self.name} {_number(self.read())}"


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], label_names: tuple[str, ...] = ()):
        super().__init__(name, help_text, label_names)
        self.bounds = (*buckets, math.inf)
        self.series: dict[LabelValues, list[float]] = {}  # per-bucket counts, then sum
        if not label_names:  # an unlabelled series exists from the start: scrapers see 0, not "absent"
            self.series[()] = [0.0] * (len(self.bounds) + 1)

    def observe(self, value: float, *label_values: str) -> None:
        series = self.series.setdefault(label_values, [0.0] * (len(self.bounds) + 1))
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                series[index] += 1
                break
        series[-1] += value

    def samples(self) -> Iterable[str]:
        for values, series in sorted(self.series.items()):
            cumulative = 0.0
            for bound, count in zip(self.bounds, series):
                cumulative += count
                labels = _labels_text(self.label_names, values, f'le="{_number(bound)}"')
                yield f"{self.name}_bucket{labels} {_number(cumulative)}"
            plain = _labels_text(self.label_names, values)
            yield f"{self.name}_sum{plain} {_number(series[-1])}"
            yield f"{self.name}_count{plain} {_number(cumulative)}"


class ServerMetrics:
    """Every metric `okdpipe serve` exports, under the `okdpipe_` prefix."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        ready: Callable[[], float],
        inflight_bytes: Callable[[], float] = lambda: 0.0,
    ):
        self.requests = Counter(
            "okdpipe_requests_total", "HTTP requests by route, method and status.", ("route", "method", "status")
        )
        self.errors = Counter(
            "okdpipe_request_errors_total", "Requests answered 4xx (client) or 5xx (server).", ("route", "kind")
        )
        self.latency = Histogram(
            "okdpipe_request_duration_seconds",
            "Request latency, first byte in to response sent.",
            LATENCY_BUCKETS_S,
            ("route",),
        )
        self.batch_size = Histogram(
            "okdpipe_batch_size", "Images per onnxruntime call (micro-batch size).", BATCH_SIZE_BUCKETS
        )
        self.inference = Histogram(
            "okdpipe_inference_duration_seconds", "Seconds per onnxruntime call.", LATENCY_BUCKETS_S
        )
        self.images = Counter("okdpipe_images_total", "Images run through the model.")
        self.queue_depth = Gauge("okdpipe_queue_depth", "Images waiting for the model.", queue_depth)
        self.ready = Gauge("okdpipe_model_ready", "1 once the model is loaded and warmed up.", ready)
        self.inflight_bytes = Gauge(
            "okdpipe_inflight_body_bytes",
            "Request-body bytes admitted and not yet answered (bounded by --max-inflight-mb).",
            inflight_bytes,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(route, method if method in KNOWN_METHODS else "other", str(status))
        self.latency.observe(seconds, route)
        if status >= 400:
            self.errors.inc(route, error_kind(status))

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(amount=size)

    def render(self) -> str:
        metrics = (
            self.requests,
            self.errors,
            self.latency,
            self.batch_size,
            self.inference,
            self.images,
            self.queue_depth,
            self.ready,
            self.inflight_bytes,
        )
        return "\n".join(metric.render() for metric in metrics) + "\n"


def error_kind(status: int) -> str:
    """ "server" for a failure of this server (500, a full queue's 503); "client" for a request it refuses, 501 (a
    Transfer-Encoding it does not implement) included: a dashboard alerting on server errors must not page for
    a client's gzip."""
    return "client" if status < 500 or status == 501 else "server"
