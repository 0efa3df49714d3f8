"""weightstore's garbage collector: expire → invoices → mark → sweep → orphans → archives, plus verify.

Public surface (everything else is private to the package):
- ``run(ctx, phases, dry_run=..., hooks=...)`` → ``RunReport`` (recorded in ``gc_run``);
- ``LocalCollector``: the same, as the ``weightstore.collector.CollectorPort`` the API triggers;
- ``verify(ctx, hash_sample=..., expect_collected=...)`` → ``VerifyReport`` of typed ``Finding``s;
- ``CollectorHooks``: test-only stopping points (production passes none);
- ``scheduler.start_in_process(ctx)`` / ``scheduler.run_worker(ctx)``.

The rules it enforces are in docs/design-gc.md; the retention rules it applies (TTL, restore) are
core (``weightstore.retention``). This package imports the core and APScheduler; the core and the
API import neither (tests/test_layers.py).
"""

from weightstore.collector import PHASES

from .hooks import NO_HOOKS, CollectorHooks
from .phases import Finding, PhaseResult
from .runner import LocalCollector, RunReport, run
from .verify import VerifyReport, verify

__all__ = [
    "PHASES",
    "CollectorHooks",
    "Finding",
    "NO_HOOKS",
    "LocalCollector",
    "PhaseResult",
    "RunReport",
    "VerifyReport",
    "run",
    "verify",
]
