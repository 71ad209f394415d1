"""The server's Prometheus metrics, in a registry of their own (one per app, so that tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests by status, queue depth, batch sizes, time to first token, time per output token, output tokens,
    dropped rows and the image tokens kept per prune stage."""

    def __init__(self, image_tokens: int, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("btp_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.queue_depth = Gauge("btp_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram("btp_batch_size", "Rows per batch", registry=r,
                                    buckets=tuple(range(1, max_batch + 1)))
        self.ttft = Histogram("btp_time_to_first_token_seconds", "From arrival in the queue to the first token",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.per_token = Histogram("btp_time_per_output_token_seconds", "Between output tokens of one answer",
                                   registry=r, buckets=LATENCY_BUCKETS)
        self.tokens = Counter("btp_output_tokens", "Output tokens answered", registry=r)
        self.dropped = Counter("btp_rows_dropped", "Rows dropped from their batch (client gone, timed out)",
                               registry=r)
        step = max(1, image_tokens // 8)
        self.kept = Histogram("btp_image_tokens_kept", "Image tokens kept per prune stage", ["stage"], registry=r,
                              buckets=tuple(range(step, image_tokens + step, step)))

    def observe_kept(self, kept: dict[str, int]) -> None:
        for stage, count in kept.items():
            self.kept.labels(stage=stage).observe(count)

    def observe_answer(self, ttft_s: float, per_token_s: float | None, tokens: int) -> None:
        self.ttft.observe(ttft_s)
        if per_token_s is not None:
            self.per_token.observe(per_token_s)
        self.tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
