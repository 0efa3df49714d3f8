"""weightstore's garbage collector: expire → mark → sweep → orphans, plus verify.

Public surface (everything else is private to the package):
- ``run(ctx, phases, dry_run=...)`` → ``RunReport`` (recorded in ``gc_run``);
- ``verify(ctx, hash_sample=..., expect_collected=...)`` → ``VerifyReport`` of typed ``Finding``s;
- ``restore_checkpoint(session, principal, checkpoint_id, ...)`` (admin undo of an expiry);
- ``scheduler.start_in_process(ctx)`` / ``scheduler.run_worker(ctx)``.

The rules it enforces are in docs/design-gc.md. This package imports the core and APScheduler;
the core imports neither.
"""

from .phases import Finding, PhaseResult
from .restore import restore_checkpoint
from .runner import PHASES, RunReport, get_run, list_runs, run
from .verify import VerifyReport, verify

__all__ = [
    "PHASES",
    "Finding",
    "PhaseResult",
    "RunReport",
    "VerifyReport",
    "get_run",
    "list_runs",
    "restore_checkpoint",
    "run",
    "verify",
]
