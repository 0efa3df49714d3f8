"""Run the real ``weightstore gc`` command in this process, parked at one collector step.

    python tests/collector/_paused_collector.py PHASE... --pause-at POINT [--marker FILE] [--pause-seconds S]

It calls the CLI's ``run_phases`` (same settings, output and exit codes as ``weightstore gc run``)
with ``CollectorHooks`` whose hook at POINT writes FILE and sleeps, so a test can SIGKILL the
process exactly there. The product never arms a hook: only this test-side entry point does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer

from weightstore_cli.gc import run_phases
from weightstore_gc import CollectorHooks

POINTS = ("after_lease", "after_tombstone", "between_batches")


def paused_hooks(point: str, marker: Path | None, seconds: float) -> CollectorHooks:
    def park() -> None:
        if marker is not None:
            marker.write_text(point)
        time.sleep(seconds)

    def settle_then_park(settle: Callable[[], None]) -> None:
        settle()  # the previous batches finish first: the kill lands between two whole batches
        park()

    if point == "after_lease":
        return CollectorHooks(after_lease=park)
    if point == "after_tombstone":
        return CollectorHooks(after_tombstone=park)
    return CollectorHooks(between_batches=settle_then_park)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("phases", nargs="+")
    parser.add_argument("--pause-at", required=True, choices=POINTS)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--pause-seconds", type=float, default=3600)
    parser.add_argument("--format", default="table")
    args = parser.parse_args(argv)
    try:
        run_phases(
            args.phases, dry_run=False, fmt=args.format, hooks=paused_hooks(args.pause_at, args.marker, args.pause_seconds)
        )
    except typer.Exit as exc:
        return int(exc.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
