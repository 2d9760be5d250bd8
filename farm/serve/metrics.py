"""Serving metrics through ray.util.metrics (exported on Ray's Prometheus endpoint, prefixed ray_).

Created lazily, once per process; outside a Ray worker they are no-ops so the engine can be unit
tested without Ray. Tags are customer/adapter (not the version) to keep cardinality bounded."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_m: dict | None = None

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]
TPS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]


class _Noop:
    def inc(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass

    def set(self, *a, **k):
        pass


def _build() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "requests": Counter("farm_serve_requests", "Requests by adapter and route.", tag_keys=("adapter", "route")),
        "errors": Counter("farm_serve_errors", "Error responses by adapter and HTTP status.", tag_keys=("adapter", "status")),
        "ttft": Histogram("farm_serve_time_to_first_token_s", "Submit to first generated token.", LATENCY_S, tag_keys=("adapter",)),
        "tokens_per_s": Histogram("farm_serve_tokens_per_s", "Generated tokens/s of each request.", TPS, tag_keys=("adapter",)),
        "tokens": Counter("farm_serve_generated_tokens", "Generated tokens.", tag_keys=("adapter",)),
        "load": Histogram("farm_serve_adapter_load_s", "Fetch (verified) + attach of an adapter.", LATENCY_S, tag_keys=("adapter",)),
        "cache_hits": Counter("farm_serve_adapter_cache_hits", "Requests whose adapter was resident.", tag_keys=("adapter",)),
        "cache_misses": Counter("farm_serve_adapter_cache_misses", "Requests that had to load their adapter.", tag_keys=("adapter",)),
        "cache_evictions": Counter("farm_serve_adapter_cache_evictions", "Adapters dropped by the LRU.", tag_keys=("adapter",)),
        "batch_size": Histogram("farm_serve_batch_size", "Rows per forward batch.", BATCH),
        "batch_adapters": Histogram("farm_serve_batch_adapters", "Distinct adapters per batch.", BATCH),
        "waiting": Gauge("farm_serve_waiting_requests", "Requests queued on a replica."),
    }


def get(name: str):
    """The named instrument (or a no-op outside Ray)."""
    global _m
    if _m is None:
        with _lock:
            if _m is None:
                try:
                    import ray

                    _m = _build() if ray.is_initialized() else {}
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    _m = {}
    return _m.get(name) or _Noop()
