"""Prometheus metrics of the collector, on their own registry.

The API adds these to its ``/metrics`` when it is given a collector (``LocalCollector.metrics``,
wired by ``weightstore serve``); a standalone worker serves them itself (``weightstore gc worker
--metrics-port``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

GC_REGISTRY = CollectorRegistry(auto_describe=True)
RUNS = Counter("weightstore_gc_runs_total", "Collector runs by outcome", ["outcome"], registry=GC_REGISTRY)
DURATION = Histogram(
    "weightstore_gc_run_seconds", "Collector run duration", registry=GC_REGISTRY, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
)
EXPIRED = Counter("weightstore_gc_checkpoints_expired_total", "Checkpoints expired by the collector", registry=GC_REGISTRY)
DELETED_BLOBS = Counter("weightstore_gc_blobs_deleted_total", "Blobs deleted by sweep", registry=GC_REGISTRY)
DELETED_BYTES = Counter("weightstore_gc_bytes_deleted_total", "Bytes reclaimed by sweep", registry=GC_REGISTRY)
DELETE_FAILURES = Counter("weightstore_gc_delete_failures_total", "Object deletes left for the next run", registry=GC_REGISTRY)
FINDINGS = Gauge("weightstore_gc_findings", "Error findings of the last run", registry=GC_REGISTRY)
LAST_SUCCESS = Gauge("weightstore_gc_last_success_timestamp_seconds", "End of the last successful run", registry=GC_REGISTRY)

ALL = (RUNS, DURATION, EXPIRED, DELETED_BLOBS, DELETED_BYTES, DELETE_FAILURES, FINDINGS, LAST_SUCCESS)
