"""The core's side of the collector: the port outer layers trigger runs through, and run reads.

``CollectorPort`` is what ``POST /v1/admin/gc/runs`` calls; ``list_runs``/``get_run`` are catalog
reads of recorded runs (``gc_run`` rows).

The collector itself (``weightstore_gc``) is an outer layer beside the API: the API never imports
it. The outermost layer (``weightstore serve``, tests) builds an object that satisfies
``CollectorPort`` and passes it to ``create_app(..., collector=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the CLI imports PHASES on every start: keep sqlalchemy, boto3 and the models out of that
    from prometheus_client.registry import Collector as MetricsCollector
    from sqlmodel import Session

    from weightstore.context import Context
    from weightstore.models import GcRun

PHASES = ("expire", "invoices", "mark", "sweep", "orphans", "archives")
"""Every collector phase, in the order a run executes them. ``invoices`` (freeze ended months) runs
before ``mark``, so a run that stops fail-closed on a storage finding still closes the books;
``archives`` (prune the archive cache) runs last, after the sweep forgot the blobs it deleted."""


class CollectorPort(Protocol):
    """What the API needs from the collector: run it now, and expose its metrics."""

    @property
    def metrics(self) -> Sequence[MetricsCollector]:
        """Prometheus collectors the app adds to its ``/metrics``."""
        ...

    def run(self, ctx: Context, phases: Sequence[str], *, dry_run: bool) -> str:
        """Run ``phases`` (a subset of ``PHASES``) synchronously and return the ``gc_run`` id.

        Raises ``LeaseHeld`` when another collector is working (nothing recorded)."""
        ...

    def verify(self, ctx: Context, *, hash_sample: int) -> dict[str, Any]:
        """Check every storage invariant (changes nothing): ``{"clean", "stats", "findings"}``,
        each finding ``{"kind", "subject", "detail", "severity"}``."""
        ...


def list_runs(session: Session, *, limit: int = 50, offset: int = 0) -> list[GcRun]:
    """Recorded collector runs, newest first."""
    import sqlalchemy as sa
    from sqlmodel import col

    from weightstore.models import GcRun

    q = sa.select(GcRun).order_by(col(GcRun.started_at).desc(), col(GcRun.id).desc()).offset(offset).limit(limit)
    return list(session.execute(q).scalars().all())


def get_run(session: Session, run_id: str) -> GcRun | None:
    from weightstore.models import GcRun

    return session.get(GcRun, run_id)
