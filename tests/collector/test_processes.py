"""Collector processes: SIGKILL at the worst moments, and two collectors started at once.

The collector runs as a real ``weightstore gc`` subprocess (``_paused_collector.py``: the CLI's
``run_phases`` with injected hooks) parked at a named point (after the tombstone transaction,
between delete batches, after taking the lease) so the test can kill it exactly there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.collector._util import assert_verified, delete, download, new_run, object_exists, principal, save
from tests.helpers import sampler_files
from weightstore.db import session_scope
from weightstore.models import Blob
from weightstore_gc import run

CLI = [sys.executable, "-c", "from weightstore_cli import main; main()"]
PAUSED = [sys.executable, str(Path(__file__).with_name("_paused_collector.py"))]


def _env(ctx, tmp_path: Path, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    s = ctx.settings
    secret = s.s3_secret_access_key.get_secret_value()
    env = {
        **os.environ,
        "WEIGHTSTORE_DATABASE_URL": s.resolved_database_url,
        "WEIGHTSTORE_S3_ENDPOINT_URL": s.s3_endpoint_url,
        "WEIGHTSTORE_S3_ACCESS_KEY_ID": s.s3_access_key_id,
        "WEIGHTSTORE_S3_SECRET_ACCESS_KEY": secret,
        "WEIGHTSTORE_S3_BUCKET": s.s3_bucket,
        "WEIGHTSTORE_DATA_DIR": str(tmp_path / "var"),
        "WEIGHTSTORE_GC_GRACE_SECONDS": "0",
        "WEIGHTSTORE_GC_LEASE_SECONDS": "3",
        "WEIGHTSTORE_GC_DELETE_BATCH": "2",
    }
    env.update(extra)
    return env


def _setup(ctx, keys):  # type: ignore[no-untyped-def]
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    keep = sampler_files(70)
    pk = save(ctx, p, run_id, "keep", keep)
    doomed = [sampler_files(71 + i) for i in range(3)]  # 3 weights blobs (+ the shared config, kept)
    for i, f in enumerate(doomed):
        delete(ctx, p, save(ctx, p, run_id, f"d{i}", f))
    time.sleep(0.01)  # the subprocess uses the wall clock and grace 0: strictly after the deletes
    return p, pk, keep, doomed


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"collector exited early: {proc.returncode} {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "collector never reached the pause point"
        time.sleep(0.05)


def _states(ctx) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with session_scope(ctx.engine) as s:
        return {b.sha256: b.state for b in s.exec(sa.select(Blob)).scalars()}  # type: ignore[call-overload]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_tombstone", "between_batches"])
def test_sigkill_then_next_run_finishes(ctx, keys, clock, tmp_path, point):
    p, pk, keep, doomed = _setup(ctx, keys)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [*PAUSED, "sweep", "--pause-at", point, "--marker", str(marker)],
        env=_env(ctx, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    states = _states(ctx)
    tombstoned = [s for s, st in states.items() if st == "deleting"]
    if point == "after_tombstone":
        assert len(tombstoned) == 2  # the first batch (2 keys) is tombstoned, its objects still there
    else:
        assert len(tombstoned) == 0 and len(states) == 3  # first batch fully done, second not started
    assert download(ctx, p, pk) == keep
    assert_verified(ctx)  # a crash leaves garbage, never a broken invariant
    clock.advance(ctx.settings.gc_grace_seconds + 60)  # past the dead holder's lease, past grace
    rep = run(ctx)
    assert rep.state == "finished"
    assert not any(object_exists(ctx, f["adapter_model.safetensors"]) for f in doomed)
    assert download(ctx, p, pk) == keep
    assert_verified(ctx, collected=True)


@pytest.mark.slow
def test_two_collectors_exactly_one_works(ctx, keys, clock, tmp_path):
    p, pk, keep, doomed = _setup(ctx, keys)
    env = _env(ctx, tmp_path, WEIGHTSTORE_GC_LEASE_SECONDS="60")
    every_phase = ["expire", "mark", "sweep", "orphans"]  # what `weightstore gc run` runs
    command = [*PAUSED, *every_phase, "--pause-at", "after_lease", "--pause-seconds", "4", "--format", "json"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [pr.communicate(timeout=120) for pr in procs]
    codes = sorted(pr.returncode for pr in procs)
    assert codes == [0, 3], outs
    loser = outs[[pr.returncode for pr in procs].index(3)]
    assert b"lease held elsewhere" in loser[1]
    assert not any(object_exists(ctx, f["adapter_model.safetensors"]) for f in doomed)
    assert download(ctx, p, pk) == keep
    assert_verified(ctx, collected=True)
    r = subprocess.run([*CLI, "gc", "verify", "--direct"], env=_env(ctx, tmp_path), capture_output=True)
    assert r.returncode == 0, r.stderr
