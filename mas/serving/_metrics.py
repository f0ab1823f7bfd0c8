"""Prometheus metrics of the server (``GET /metrics``), with the official ``prometheus_client``.

Each server owns its registry (no process-global state), so tests and tools can build several.
Live values (queue depth, active slots, prefix-cache size) are read when scraped.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Counters, histograms and gauges of one server.

    Args:
        queue_depth (Callable[[], int]): waiting sequences, read at scrape time.
        active_slots (Callable[[], int]): KV-cache rows in use.
        cached_tokens (Callable[[], int]): tokens held by the prefix cache.
        cached_bytes (Callable[[], int]): bytes held by the prefix cache.
        prefix_hits (Callable[[], int]), prefix_misses (Callable[[], int]),
        prefix_saved_tokens (Callable[[], int]): the prefix cache's counters.
    """

    def __init__(
        self,
        *,
        queue_depth: Callable[[], int],
        active_slots: Callable[[], int],
        cached_tokens: Callable[[], int],
        cached_bytes: Callable[[], int],
        prefix_hits: Callable[[], int],
        prefix_misses: Callable[[], int],
        prefix_saved_tokens: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mas_serve_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mas_serve_prompt_tokens", "prompt tokens of admitted sequences", registry=r)
        self.completion_tokens = Counter("mas_serve_completion_tokens", "generated tokens", registry=r)
        self.time_to_first_token = Histogram(
            "mas_serve_time_to_first_token_seconds", "submission to first token, queueing included", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "mas_serve_inter_token_latency_seconds", "time between two tokens of one sequence", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "mas_serve_request_latency_seconds", "submission to last token of a request", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.failed_sequences = Counter("mas_serve_failed_sequences", "sequences that failed inside the model", registry=r)
        self.cancelled_sequences = Counter("mas_serve_cancelled_sequences", "sequences cancelled (client gone, shutdown)", registry=r)
        Gauge("mas_serve_queue_depth", "sequences waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("mas_serve_active_slots", "KV-cache rows in use", registry=r).set_function(active_slots)
        Gauge("mas_serve_prefix_cache_tokens", "tokens held by the prefix cache", registry=r).set_function(cached_tokens)
        Gauge("mas_serve_prefix_cache_bytes", "bytes held by the prefix cache", registry=r).set_function(cached_bytes)
        # Counters owned by the prefix cache, exposed as gauges of their running totals.
        Gauge("mas_serve_prefix_cache_hits_total", "prefills that reused a cached prefix", registry=r).set_function(prefix_hits)
        Gauge("mas_serve_prefix_cache_misses_total", "prefills without a reusable prefix", registry=r).set_function(prefix_misses)
        Gauge("mas_serve_prefill_tokens_saved_total", "prompt tokens copied from the cache instead of prefilled", registry=r).set_function(
            prefix_saved_tokens
        )
        Gauge("mas_serve_prefix_cache_hit_rate", "hits / (hits + misses) since start-up", registry=r).set_function(
            lambda: prefix_hits() / max(prefix_hits() + prefix_misses(), 1)
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
