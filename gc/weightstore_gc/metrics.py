"""Prometheus metrics of the collector, on their own registry.

The API adds these to its ``/metrics`` when it is given a collector (``LocalCollector.metrics``,
wired by ``weightstore serve``); a standalone worker serves them itself (``weightstore gc worker
--metrics-port``, or with health and readiness on ``WEIGHTSTORE_HEALTH_PORT``).

``TICKS`` counts every scheduled tick by outcome, including the ones that never became a run
(``lease_held``: another collector works; ``failed``: the run could not start or raised), so a
collector that has been skipping or failing for hours shows it (issue 13, found 7).
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
TICKS = Counter(
    "weightstore_gc_ticks_total",
    "Scheduled collector ticks by outcome: finished, stopped, aborted, lease_held, lease_lost, failed",
    ["outcome"],
    registry=GC_REGISTRY,
)
LAST_SUCCESS = Gauge("weightstore_gc_last_success_timestamp_seconds", "End of the last successful run", registry=GC_REGISTRY)

ALL = (RUNS, DURATION, EXPIRED, DELETED_BLOBS, DELETED_BYTES, DELETE_FAILURES, FINDINGS, TICKS, LAST_SUCCESS)
