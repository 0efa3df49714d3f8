"""Test-only pause points, so a test can SIGKILL a collector at an exact step.

``WEIGHTSTORE_GC_PAUSE_AT`` names one or more points (comma-separated); on reaching one the
collector touches ``WEIGHTSTORE_GC_PAUSE_FILE`` (if set) and sleeps ``WEIGHTSTORE_GC_PAUSE_SECONDS``
(default one hour). Unset in production: the check is one dict lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POINTS = ("after_lease", "after_tombstone", "between_batches")


def pause(point: str) -> None:
    wanted = os.environ.get("WEIGHTSTORE_GC_PAUSE_AT")
    if not wanted or point not in wanted.split(","):
        return
    marker = os.environ.get("WEIGHTSTORE_GC_PAUSE_FILE")
    if marker:
        Path(marker).write_text(point)
    time.sleep(float(os.environ.get("WEIGHTSTORE_GC_PAUSE_SECONDS", "3600")))


def armed(point: str) -> bool:
    """Whether a test asked to pause at ``point`` (lets the caller reach a well-defined state first)."""
    wanted = os.environ.get("WEIGHTSTORE_GC_PAUSE_AT")
    return bool(wanted) and point in (wanted or "").split(",")
