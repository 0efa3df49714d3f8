"""Injected test-only stopping points at the collector's crash-sensitive steps.

A test stops the collector at an exact step with them, for example to SIGKILL it there
(``tests/collector/_paused_collector.py``), or runs a concurrent change there (a collection in
the middle of ``verify``).

Production never passes any: every hook defaults to doing nothing, and nothing in the product arms
one from the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _nothing() -> None:
    return None


def _skip_settle(settle: Callable[[], None]) -> None:
    return None


def _ignore_sha(sha256: str) -> None:
    return None


@dataclass(frozen=True)
class CollectorHooks:
    after_lease: Callable[[], None] = _nothing
    """Called once the lease is taken, before the run is recorded."""
    after_tombstone: Callable[[], None] = _nothing
    """Called after every committed tombstone transaction, before its objects are deleted."""
    between_batches: Callable[[Callable[[], None]], None] = _skip_settle
    """Called before every sweep page but the first, with ``settle``: a function that waits for
    the delete calls in flight and forgets their rows. A test that stops the collector here calls
    it first, so the stop lands between two fully finished batches."""
    verify_before_hash: Callable[[str], None] = _ignore_sha
    """Called by ``verify`` with each sampled blob's sha256 after its listing and catalog read,
    just before it is hashed: a test runs a concurrent collection there (issue 13, found 6)."""


NO_HOOKS = CollectorHooks()
