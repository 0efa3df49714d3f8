"""Run delete against a commit declared before it (issue 12, part 5): every path that adds a checkpoint
to a run takes the run's row lock (``runs.lock_for_write``) and ``runs rm`` takes the same lock first,
so a deleted run never holds a committed checkpoint. Interleaved deterministically: one side holds
its transaction open (a ``fence`` inside the publish transaction, or an open ``session_scope``
around the delete) while the other runs. On SQLite and PostgreSQL (the ``db_url`` params)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from tests.collector._util import assert_verified, declare, new_run, principal, save, send
from tests.helpers import sampler_files
from weightstore import publish, runs, tenants, uploads
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import RunDeleted
from weightstore.models import Checkpoint, CheckpointState, TrainingRun, Upload
from weightstore_api.errors import status_for

HOLD_SECONDS = 0.5
"""How long one side keeps its transaction open while the other runs into the lock. Not a timing
assert: the outcome is the same whichever side gets there first; the pause only makes the
unlocked interleaving (the bug) happen when the lock is missing."""


def _deleted_at(ctx: Context, run_id: str) -> str:
    with session_scope(ctx.engine) as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None and run.deleted_at is not None
        return run.deleted_at.isoformat()


def _states(ctx: Context, run_id: str) -> list[str]:
    with session_scope(ctx.engine) as s:
        return sorted(s.exec(select(Checkpoint.state).where(Checkpoint.run_id == run_id)).all())


def _expected(run_id: str, deleted_at: str) -> str:
    return (
        f"training run {run_id!r} was deleted (runs rm) at {deleted_at}: nothing can be published into it any more; "
        "create a new run and save there"
    )


def test_commit_of_an_upload_declared_before_the_delete_is_refused(ctx, keys):  # type: ignore[no-untyped-def]
    """issue 12, part 5: declare, ``runs rm``, then commit → permanent 400 ``run_deleted`` (not a
    bare 404, not a checkpoint in a deleted run); the delete aborted the open upload, so its bytes
    no longer count against the quota."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(1)
    ans = declare(ctx, p, run_id, "late", files)
    send(ctx, p, ans, files)
    with session_scope(ctx.engine) as s:
        assert tenants.usage(s, "acme", now=ctx.clock.now()).reserved_bytes == sum(len(b) for b in files.values())
        runs.delete_run(s, p, run_id, now=ctx.clock.now())
    with session_scope(ctx.engine) as s:
        assert tenants.usage(s, "acme", now=ctx.clock.now()).reserved_bytes == 0
        upload = s.get(Upload, ans.upload_id)
        assert upload is not None and upload.state == "aborted"
    with pytest.raises(RunDeleted) as refused:
        uploads.commit(ctx, p, ans.upload_id)
    assert refused.value.message == _expected(run_id, _deleted_at(ctx, run_id))
    assert refused.value.code == "run_deleted" and status_for(refused.value) == 400
    assert _states(ctx, run_id) == []
    assert_verified(ctx)


def test_commit_waiting_behind_a_delete_in_flight_is_refused(ctx, keys):  # type: ignore[no-untyped-def]
    """issue 12, part 5 (delete first): the delete's transaction is open when the commit's last step
    runs; the commit waits on the run's lock, then sees ``deleted_at`` and is refused. Without the
    lock (PostgreSQL) the commit read the run as it was before the delete and committed a checkpoint
    into the deleted run."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    files = sampler_files(2)
    ans = declare(ctx, p, run_id, "racing", files)
    send(ctx, p, ans, files)
    result: list[BaseException | str] = []

    def commit() -> None:
        try:
            result.append(uploads.commit(ctx, p, ans.upload_id).tinker_path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    committer = threading.Thread(target=commit)
    with session_scope(ctx.engine) as s:
        assert runs.delete_run(s, p, run_id, now=ctx.clock.now()) == 0
        committer.start()
        time.sleep(HOLD_SECONDS)
    committer.join(60)
    [outcome] = result
    assert isinstance(outcome, RunDeleted), outcome
    assert outcome.message == _expected(run_id, _deleted_at(ctx, run_id))
    assert _states(ctx, run_id) == []


def test_delete_waiting_behind_a_publish_in_flight_deletes_its_checkpoint(ctx, keys, tmp_path: Path):  # type: ignore[no-untyped-def]
    """issue 12, part 5 (publish first): the publish holds the run's lock inside its manifest
    transaction (paused in its fence); ``runs rm`` waits for it, then deletes the new checkpoint too.
    A guard for the other order (it passed before the fix too: the publish's ``runs.touch`` already
    updated the run row, which ``delete_run``'s ``FOR UPDATE`` waits on; ``lock_for_write`` now makes
    that wait the rule instead of a side effect)."""
    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    save(ctx, p, run_id, "before", sampler_files(3))
    out = tmp_path / "out"
    out.mkdir()
    for name, data in sampler_files(4).items():
        (out / name).write_bytes(data)
    inside, release = threading.Event(), threading.Event()

    def fence(session: Session, ckpt: Checkpoint) -> None:
        inside.set()
        assert release.wait(60)

    published: list[BaseException | str] = []
    deleted: list[BaseException | int] = []

    def run_publish() -> None:
        try:
            new = publish.NewCheckpoint(run_id=run_id, kind="sampler", name="during")
            published.append(publish.publish_files(ctx, p, new, publish.local_files(out), fence=fence).id)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            published.append(exc)

    def run_delete() -> None:
        try:
            with session_scope(ctx.engine) as s:
                deleted.append(runs.delete_run(s, p, run_id, now=ctx.clock.now()))
        except BaseException as exc:  # noqa: BLE001
            deleted.append(exc)

    publisher = threading.Thread(target=run_publish)
    publisher.start()
    assert inside.wait(60)
    deleter = threading.Thread(target=run_delete)
    deleter.start()
    time.sleep(HOLD_SECONDS)
    assert deleter.is_alive(), "runs rm did not wait for the publish holding the run's lock"
    release.set()
    publisher.join(60)
    deleter.join(60)
    [new_id] = published
    assert isinstance(new_id, str), new_id
    assert deleted == [2]  # "before" and the one published meanwhile
    with session_scope(ctx.engine) as s:
        states = dict(s.exec(select(Checkpoint.name, Checkpoint.state).where(col(Checkpoint.run_id) == run_id)).all())
    assert states == {"before": CheckpointState.deleted.value, "during": CheckpointState.deleted.value}
    assert_verified(ctx)
