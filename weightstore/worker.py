"""The export worker loop: claim a job under a lease, run it, repeat.

Runs in-process in ``weightstore serve`` (``start_in_process``) and as standalone
``weightstore worker`` processes; any number of them, on any number of machines, may share one
catalog and one object store — the claim/lease/fence rules in ``exportjobs`` keep a job from running
twice and let a crashed worker's job be taken over once its lease expires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from weightstore import exportjobs
from weightstore.context import Context

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0
ERROR_PAUSE_SECONDS = 5.0


def run_worker(
    ctx: Context,
    stop_event: threading.Event,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    *,
    owner: str | None = None,
    max_jobs: int | None = None,
) -> int:
    """Run jobs until ``stop_event`` is set (or ``max_jobs`` have run). Returns jobs run.

    An idle worker polls every ``poll_seconds``; a worker that just finished a job asks again at
    once, so a batch drains without waiting. A catalog outage pauses the loop instead of ending it.
    """
    owner = owner or exportjobs.default_owner()
    ran = 0
    log.info("export worker %s started", owner)
    while not stop_event.is_set():
        try:
            job = exportjobs.claim(ctx, owner)
        except Exception:  # noqa: BLE001 - the catalog may be briefly unreachable; keep the worker alive
            log.warning("export worker %s: claim failed", owner, exc_info=True)
            stop_event.wait(ERROR_PAUSE_SECONDS)
            continue
        if job is None:
            stop_event.wait(poll_seconds)
            continue
        log.info("export worker %s: running job %s (attempt %d)", owner, job.id, job.attempts)
        try:
            exportjobs.run_job(ctx, job, owner)
        except Exception:  # noqa: BLE001 - run_job records failures itself; this is a last resort
            log.exception("export worker %s: job %s crashed; its lease will expire and it is retried", owner, job.id)
        ran += 1
        if max_jobs is not None and ran >= max_jobs:
            break
    log.info("export worker %s stopped after %d job(s)", owner, ran)
    return ran


def start_in_process(ctx: Context, *, poll_seconds: float = DEFAULT_POLL_SECONDS, owner: str | None = None) -> Callable[[], None]:
    """Start a worker thread (for ``weightstore serve`` and tests); returns its stop function.
    Stopping waits for the current job's step to end (a job cut short is retried after its lease)."""
    stop_event = threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(ctx, stop_event, poll_seconds), kwargs={"owner": owner}, name="export-worker", daemon=True
    )
    thread.start()

    def stop() -> None:
        stop_event.set()
        thread.join(timeout=30)

    return stop


__all__ = ["run_worker", "start_in_process"]
