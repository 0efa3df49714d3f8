"""Hypothesis stateful test: random interleavings of saves (deduplicated files), deletes, TTL
changes, clock moves, abandoned uploads and collector phases.

Invariants after every step: every visible checkpoint downloads byte-identical and ``verify()`` has
no error finding. After a full collection past grace: no unreferenced blob row or object remains.
SQLite only (the catalog backend does not change the interleavings; PostgreSQL is covered by the
deterministic race and crash tests, and this keeps the suite fast on 2 cores).
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.collector._util import declare, delete, download, new_run, principal, save
from tests.helpers import sampler_files
from weightstore import checkpoints, retention
from weightstore.db import session_scope
from weightstore.names import TinkerPath
from weightstore_gc import run, verify

HOUR = 3600


@functools.cache
def files_for(seed: int) -> dict[str, bytes]:
    return sampler_files(seed)  # every seed shares adapter_config.json: dedup across checkpoints


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_collector_state_machine(ctx, keys, clock, db_url):
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    grace = ctx.settings.gc_grace_seconds
    counter = iter(range(10**6))

    class Collector(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model: dict[str, tuple[dict[str, bytes], object]] = {}

        def _visible(self) -> dict[str, dict[str, bytes]]:
            now = clock.now()
            return {k: f for k, (f, exp) in self.model.items() if exp is None or exp > now}  # type: ignore[operator]

        @rule(seed=st.integers(0, 4), ttl=st.sampled_from([None, HOUR, 3 * HOUR]))
        def save(self, seed: int, ttl: int | None) -> None:
            files = files_for(seed)
            path = save(ctx, p, run_id, f"c{next(counter)}", files, ttl=ttl)
            self.model[path] = (files, retention.expires_at_for(clock.now(), ttl))

        @rule(data=st.data())
        def delete(self, data: st.DataObject) -> None:
            vis = sorted(self._visible())
            if vis:
                path = data.draw(st.sampled_from(vis))
                delete(ctx, p, path)
                del self.model[path]

        @rule(data=st.data(), ttl=st.sampled_from([None, HOUR]))
        def set_ttl(self, data: st.DataObject, ttl: int | None) -> None:
            vis = sorted(self._visible())
            if vis:
                path = data.draw(st.sampled_from(vis))
                with session_scope(ctx.engine) as s:
                    checkpoints.set_ttl(s, p, TinkerPath.parse(path), ttl, settings=ctx.settings, now=clock.now())
                self.model[path] = (self.model[path][0], retention.expires_at_for(clock.now(), ttl))

        @rule(seconds=st.sampled_from([60, HOUR, grace + 1]))
        def advance(self, seconds: int) -> None:
            clock.advance(seconds)

        @rule(seed=st.integers(5, 7))
        def abandon_upload(self, seed: int) -> None:
            files = files_for(seed)
            ans = declare(ctx, p, run_id, f"abandoned{next(counter)}", files)
            from weightstore import uploads

            first = next((f for f in ans.files if f.transfer == "stream"), None)
            if first is not None:  # sent one file, then the trainer died
                uploads.receive_bytes(ctx, p, ans.upload_id, first.path, files[first.path])

        @rule(phases=st.sampled_from([("expire",), ("mark",), ("sweep",), ("orphans",), ("expire", "mark", "sweep", "orphans")]))
        def collect(self, phases: tuple[str, ...]) -> None:
            assert run(ctx, phases).state == "finished"

        @rule()
        def full_collection(self) -> None:
            clock.advance(max(grace, ctx.settings.upload_expiry_seconds) + 1)
            for _ in range(3):  # expire; release after grace; sweep after grace
                assert run(ctx).state == "finished"
                clock.advance(grace + 1)
            assert run(ctx).state == "finished"
            self.model = {k: v for k, v in self.model.items() if k in self._visible()}
            rep = verify(ctx, expect_collected=True)
            assert rep.findings == [], [f.to_dict() for f in rep.findings]

        @invariant()
        def visible_checkpoints_download_identically(self) -> None:
            for path, files in self._visible().items():
                assert download(ctx, p, path) == files

        @invariant()
        def verify_has_no_errors(self) -> None:
            rep = verify(ctx)
            assert rep.errors == [], [f.to_dict() for f in rep.errors]

    run_state_machine_as_test(
        Collector,
        settings=settings(max_examples=12, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)),
    )
