"""What a collector or export worker leaves behind when it dies or races, reclaimed (issue 13, found 6).

- ``verify`` beside a live collector: a blob collected between verify's listing and its hashing is
  re-checked against the catalog (collected: not an error), a blob still referenced but gone is a
  ``missing_object`` finding; never a traceback. The concurrent collection runs in a hook.
- A collector killed with SIGKILL leaves its run row ``running``; the next lease holder marks it
  ``abandoned``.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess

import sqlalchemy as sa

from tests.collector._util import assert_verified, delete, new_run, principal, save
from tests.collector.test_processes import PAUSED, _env, _setup, _wait_for
from tests.helpers import sampler_files
from weightstore.db import session_scope
from weightstore.models import GcRun
from weightstore.objectstore import blob_key
from weightstore_gc import CollectorHooks, run, verify


def test_verify_tolerates_a_collection_between_listing_and_hashing(ctx, keys, clock):  # type: ignore[no-untyped-def]
    """issue 13, found 6: a blob deleted by a collector after verify listed it is re-checked, not a crash."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    doomed, kept = sampler_files(1), sampler_files(2)
    doomed_path = save(ctx, p, run_id, "doomed", doomed)
    save(ctx, p, run_id, "kept", kept)
    doomed_sha = hashlib.sha256(doomed["adapter_model.safetensors"]).hexdigest()
    collected: list[str] = []

    def collect_meanwhile(sha: str) -> None:
        if collected:
            return
        delete(ctx, p, doomed_path)
        run(ctx)  # expire releases, mark records; past grace the next sweep deletes
        clock.advance(ctx.settings.gc_grace_seconds + 1)
        rep = run(ctx)
        assert rep.stats["sweep"]["deleted_objects"] == 1
        collected.append(sha)

    rep = verify(ctx, hash_sample=10, seed=0, hooks=CollectorHooks(verify_before_hash=collect_meanwhile))
    assert collected, "the hook never ran"
    assert ctx.store.head(blob_key(doomed_sha)) is None
    assert rep.findings == [], [f.to_dict() for f in rep.findings]
    assert rep.stats["vanished"] == 1
    assert rep.stats["hashed"] == rep.stats["referenced_blobs"] - 1
    assert_verified(ctx)


def test_verify_reports_a_referenced_blob_lost_during_verify(ctx, keys, clock):  # type: ignore[no-untyped-def]
    """issue 13, found 6: a blob still referenced that disappears mid-verify is a finding, not a crash."""
    p = principal(ctx, keys.trainer)
    files = sampler_files(3)
    save(ctx, p, new_run(ctx, p), "lost", files)
    lost_sha = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()

    def lose_it(sha: str) -> None:
        if sha == lost_sha:
            ctx.store.delete(blob_key(sha))

    rep = verify(ctx, hash_sample=10, seed=0, hooks=CollectorHooks(verify_before_hash=lose_it))
    assert [(f.kind, f.subject) for f in rep.findings] == [("missing_object", lost_sha)]
    assert "vanished" not in rep.stats


def test_killed_collectors_run_row_is_abandoned_by_the_next_holder(ctx, keys, clock, tmp_path):  # type: ignore[no-untyped-def]
    """issue 13, found 6: after kill -9 the run row no longer stays ``running`` forever."""
    _setup(ctx, keys)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [*PAUSED, "sweep", "--pause-at", "after_tombstone", "--marker", str(marker)],
        env=_env(ctx, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with session_scope(ctx.engine) as s:
        killed = s.execute(sa.select(GcRun.id, GcRun.state)).all()  # type: ignore[call-overload]
    assert [state for _, state in killed] == ["running"]
    clock.advance(ctx.settings.gc_lease_seconds + 60)  # past the dead holder's lease
    rep = run(ctx)
    assert rep.state == "finished"
    with session_scope(ctx.engine) as s:
        states = dict(s.execute(sa.select(GcRun.id, GcRun.state)).all())  # type: ignore[call-overload]
        finished_at = s.get(GcRun, killed[0][0]).finished_at  # type: ignore[union-attr]
    assert states == {killed[0][0]: "abandoned", rep.run_id: "finished"}
    assert finished_at is not None
    assert_verified(ctx)
