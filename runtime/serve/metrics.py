"""The server's metrics, one list (`METRICS`), recorded into prometheus-client (the single-process server's
`GET /metrics`) or into Ray's own metrics (`ray.util.metrics`: each replica exports its own through Ray's
metrics agent, tagged with the replica).

Gauges are read from the engine: at scrape time in-process, every `RAY_SAMPLE_S` seconds on a replica
(Ray has no scrape-time callback).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

PREFIX = "dualbrain_"
RAY_SAMPLE_S = 1.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str           # gauge | counter | histogram
    help: str


METRICS = (
    MetricSpec("requests_running", "gauge", "Requests decoding in a batch row."),
    MetricSpec("requests_waiting", "gauge", "Requests waiting for a row or prefilling."),
    MetricSpec("batch_occupancy", "gauge", "Running rows over the engine's --max-batch rows."),
    MetricSpec("prompt_tokens", "counter", "Prompt tokens of finished requests."),
    MetricSpec("generation_tokens", "counter", "Tokens generated for finished requests."),
    MetricSpec("requests_cancelled", "counter", "Requests cancelled before they finished (client gone)."),
    MetricSpec("time_to_first_token_seconds", "histogram", "Submit to first token."),
    MetricSpec("time_per_output_token_seconds", "histogram", "Mean time between a request's tokens."),
)


class Metrics:
    """Records the server's events into metric objects made by one of the two libraries."""

    def __init__(self, make: dict):
        self.m = {s.name: make[s.kind](PREFIX + s.name, s.help) for s in METRICS}
        self.engine = None

    def watch(self, engine) -> None:
        self.engine = engine

    def sample(self) -> None:
        """Gauges from the engine's rows and queue now."""
        e = self.engine
        if e is None:
            return
        running = sum(r is not None for r in e.rows)
        self.m["requests_running"].set(running)
        self.m["requests_waiting"].set(len(e.waiting) + (e.prefilling is not None))
        self.m["batch_occupancy"].set(running / e.max_batch)

    def finished(self, req, t_submit: float) -> None:
        g = req.generation
        self.m["prompt_tokens"].inc(len(g.prompt_ids))
        if g.new_ids:
            self.m["generation_tokens"].inc(len(g.new_ids))
        if req.t_first is not None:
            self.m["time_to_first_token_seconds"].observe(req.t_first - t_submit)
        if len(g.new_ids) > 1 and req.t_done is not None:
            self.m["time_per_output_token_seconds"].observe((req.t_done - req.t_first) / (len(g.new_ids) - 1))

    def cancelled(self) -> None:
        self.m["requests_cancelled"].inc()

    def text(self) -> bytes | None:
        """Prometheus text for `GET /metrics`; None where the metrics go elsewhere (Ray)."""
        return None


class PrometheusMetrics(Metrics):
    def __init__(self):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()   # one per server: several servers in one process (tests)
        r = self.registry
        super().__init__({
            "gauge": lambda n, h: pc.Gauge(n, h, registry=r),
            "counter": lambda n, h: pc.Counter(n, h, registry=r),
            "histogram": lambda n, h: pc.Histogram(n, h, buckets=LATENCY_BUCKETS, registry=r),
        })

    def text(self) -> bytes:
        import prometheus_client as pc

        self.sample()
        return pc.generate_latest(self.registry)


class RayMetrics(Metrics):
    def __init__(self):
        from ray.util import metrics as rm

        super().__init__({
            "gauge": lambda n, h: rm.Gauge(n, h),
            "counter": lambda n, h: rm.Counter(n + "_total", h),
            "histogram": lambda n, h: rm.Histogram(n, h, boundaries=list(LATENCY_BUCKETS)),
        })

    def watch(self, engine) -> None:
        super().watch(engine)
        threading.Thread(target=self._sampling, name="dualbrain-metrics", daemon=True).start()

    def _sampling(self) -> None:
        while True:
            self.sample()
            time.sleep(RAY_SAMPLE_S)
