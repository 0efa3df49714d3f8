"""The hard quota on every path that adds logical bytes to a tenant, not only the upload declare
(issue 12, part 2): export outputs (estimated at submission, exact at publish), Tinker
``copy_weights`` and restores from the trash, all through ``tenants.check_quota`` under the tenant
row lock. Every test runs on SQLite and PostgreSQL (the ``db_url`` fixture's params)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlmodel import select

from tests.collector._util import new_run, principal, save
from tests.exportjobs.conftest import BASE, Setup, base_dir, setup  # noqa: F401  (fixtures)
from tests.helpers import sampler_files
from weightstore import exportjobs, retention, tenants
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import TenantQuotaExceeded
from weightstore.models import Checkpoint, CheckpointState, ExportJob
from weightstore.names import TinkerPath
from weightstore.tinker import checkpoints as tinker_checkpoints


def _set_quota(ctx: Context, tenant: str, quota: int | None) -> None:
    with session_scope(ctx.engine) as s:
        tenants.update(s, tenant, now=ctx.clock.now(), quota_bytes=quota)


def _used(ctx: Context, tenant: str) -> int:
    with session_scope(ctx.engine) as s:
        return tenants.usage(s, tenant, now=ctx.clock.now()).used_bytes


def _message(tenant: str, used: int, requested: int, quota: int) -> str:
    """The one message shape of a refusal (the declare's, tests/tenants/test_quotas.py)."""
    return (
        f"tenant {tenant} quota exceeded: {used} bytes used + {requested} requested > {quota} bytes limit "
        "(delete checkpoints or ask an admin to raise the quota)"
    )


def _size(ctx: Context, path: str) -> int:
    p = TinkerPath.parse(path)
    with session_scope(ctx.engine) as s:
        ckpt = s.exec(
            select(Checkpoint).where(Checkpoint.run_id == p.run_id, Checkpoint.kind == p.kind, Checkpoint.name == p.name)
        ).one()
        return ckpt.size_bytes


def _job(ctx: Context, job_id: str) -> ExportJob:
    with session_scope(ctx.engine) as s:
        job = s.get(ExportJob, job_id)
        assert job is not None
        return job


def _outputs(ctx: Context, kind: str) -> list[Checkpoint]:
    with session_scope(ctx.engine) as s:
        return list(s.exec(select(Checkpoint).where(Checkpoint.kind == kind)).all())


def test_export_output_is_checked_at_publish_and_a_refused_job_fails_for_good(ctx, setup: Setup):  # type: ignore[no-untyped-def]  # noqa: F811 - the fixture
    """issue 12, part 2 (exports): a PEFT export's size is known only once converted, so submission
    passes (lower bound 0) and the exact check at publish refuses the output under the tenant lock:
    the job ends ``failed`` with ``quota_exceeded`` (used, requested, limit), no output checkpoint, and
    it is never claimed again; raising the quota and asking again runs the same job to success."""
    used = _used(ctx, "acme")
    _set_quota(ctx, "acme", used)  # full: not one byte more
    job = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    assert job.state == "queued"
    assert exportjobs.run_one(ctx, "w") == "failed"
    row = _job(ctx, job.id)
    assert row.state == "failed" and row.error is not None and row.error["code"] == "quota_exceeded"
    requested = row.error["details"]["requested_bytes"]
    assert requested > 0
    assert row.error["details"] == {"used_bytes": used, "requested_bytes": requested, "replaced_bytes": 0, "quota_bytes": used}
    assert row.error["message"] == _message("acme", used, requested, used)
    assert _outputs(ctx, "external") == []
    assert exportjobs.claim(ctx, "w2") is None  # permanent: not requeued
    assert _used(ctx, "acme") == used

    _set_quota(ctx, "acme", used + requested)
    again = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    assert again.id == job.id and again.state == "queued"
    assert exportjobs.run_one(ctx, "w") == "succeeded"
    [out] = _outputs(ctx, "external")
    assert out.size_bytes == requested and _used(ctx, "acme") == used + requested


def test_merged_export_is_refused_at_submission_when_its_lower_bound_cannot_fit(ctx, setup: Setup):  # type: ignore[no-untyped-def]  # noqa: F811 - the fixture
    """issue 12, part 2 (exports): a merged model holds every base tensor, so its lower bound (the
    base's top-level ``*.safetensors`` bytes) is checked at submission: no job is queued when even
    that cannot fit; one byte more room and the job is queued."""
    used = _used(ctx, "acme")
    with session_scope(ctx.engine) as s:
        from weightstore import basemodels

        estimate = exportjobs.estimated_output_bytes(s, "merged", basemodels.get(s, BASE))
        shards = [f for f in basemodels.files_of(s, BASE) if f.path.endswith(".safetensors")]
    assert estimate == sum(f.size_bytes for f in shards) > 0
    _set_quota(ctx, "acme", used + estimate - 1)
    with pytest.raises(TenantQuotaExceeded) as refused:
        exportjobs.submit(ctx, setup.trainer, setup.source, target="merged")
    assert refused.value.message == _message("acme", used, estimate, used + estimate - 1)
    with session_scope(ctx.engine) as s:
        assert s.exec(select(ExportJob)).all() == []
    _set_quota(ctx, "acme", used + estimate)
    assert exportjobs.submit(ctx, setup.trainer, setup.source, target="merged").state == "queued"


def _copy(ctx: Context, who: Any, source: str) -> str:  # noqa: ANN401 - a Principal
    with session_scope(ctx.engine) as s:
        return tinker_checkpoints.copy_weights(s, who, source, settings=ctx.settings, now=ctx.clock.now())


def test_copy_weights_is_charged_to_the_copying_tenant(ctx, keys):  # type: ignore[no-untyped-def]
    """issue 12, part 2 (Tinker copy): ``copy_weights`` makes new checkpoint rows billed to the caller
    (zero-copy in the store, new logical bytes in its usage): refused with ``quota_exceeded`` when it
    does not fit, accepted when it fits exactly; another tenant's quota is not involved."""
    acme = principal(ctx, keys.trainer)
    source = save(ctx, acme, new_run(ctx, acme), "src", sampler_files(1))
    size = _size(ctx, source)
    _set_quota(ctx, "acme", 2 * size - 1)
    with pytest.raises(TenantQuotaExceeded) as refused:
        _copy(ctx, acme, source)
    assert refused.value.message == _message("acme", size, size, 2 * size - 1)
    assert refused.value.details["used_bytes"] == size
    _set_quota(ctx, "acme", 2 * size)
    copied = _copy(ctx, acme, source)
    assert copied != source and _used(ctx, "acme") == 2 * size


def _trash_one(ctx: Context, who: Any, name: str, seed: int) -> str:  # noqa: ANN401 - a Principal
    return save(ctx, who, new_run(ctx, who), name, sampler_files(seed), ttl=3600)


def _restore(ctx: Context, who: Any, path: str) -> Checkpoint:  # noqa: ANN401 - a Principal
    with session_scope(ctx.engine) as s:
        return retention.restore_by_path(s, who, TinkerPath.parse(path), settings=ctx.settings, now=ctx.clock.now())


def test_restore_from_the_trash_counts_against_the_quota(ctx, keys):  # type: ignore[no-untyped-def]
    """issue 12, part 2 (restore): a checkpoint in the trash no longer counts; restoring it adds its
    bytes back, so it is refused past the quota (by path and by the admin's checkpoint id), and the
    checkpoint stays in the trash, restorable once there is room."""
    acme = principal(ctx, keys.trainer)
    admin = principal(ctx, keys.admin)
    trashed = _trash_one(ctx, acme, "old", 1)
    size = _size(ctx, trashed)
    keep = save(ctx, acme, new_run(ctx, acme), "keep", sampler_files(2))
    kept = _size(ctx, keep)
    ctx.clock.advance(3601)
    assert _used(ctx, "acme") == kept
    _set_quota(ctx, "acme", kept + size - 1)
    with pytest.raises(TenantQuotaExceeded) as refused:
        _restore(ctx, acme, trashed)
    assert refused.value.message == _message("acme", kept, size, kept + size - 1)
    with session_scope(ctx.engine) as s:
        p = TinkerPath.parse(trashed)
        ckpt_id = s.exec(select(Checkpoint.id).where(Checkpoint.run_id == p.run_id)).one()
    with pytest.raises(TenantQuotaExceeded), session_scope(ctx.engine) as s:
        retention.restore_checkpoint(s, admin, ckpt_id, settings=ctx.settings, now=ctx.clock.now())
    with session_scope(ctx.engine) as s:
        assert [e.checkpoint_id for e in retention.trash(s, acme, settings=ctx.settings, now=ctx.clock.now())] == [ckpt_id]
    _set_quota(ctx, "acme", kept + size)
    assert _restore(ctx, acme, trashed).state == CheckpointState.committed.value
    assert _used(ctx, "acme") == kept + size


def test_concurrent_restore_and_copy_never_overshoot_together(ctx, keys):  # type: ignore[no-untyped-def]
    """issue 12, part 2 (the race across paths): two restores and a copy at once, against a quota with
    room for exactly one of them: exactly one succeeds, the others get ``quota_exceeded`` (the same
    tenant-row lock on PostgreSQL; SQLite's ``BEGIN IMMEDIATE``)."""
    acme = principal(ctx, keys.trainer)
    first, second = _trash_one(ctx, acme, "a", 1), _trash_one(ctx, acme, "b", 2)
    ctx.clock.advance(3601)
    source = save(ctx, acme, new_run(ctx, acme), "src", sampler_files(3))
    sizes = {_size(ctx, p) for p in (first, second, source)}
    assert len(sizes) == 1  # same shapes: any one of them fits, no two do
    (size,) = sizes
    _set_quota(ctx, "acme", 2 * size + size // 2)  # src stored + room for one
    barrier = threading.Barrier(3)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(fn: Callable[[], object]) -> None:
        barrier.wait()
        try:
            fn()
            result = "ok"
        except TenantQuotaExceeded:
            result = "quota_exceeded"
        with lock:
            outcomes.append(result)

    threads = [
        threading.Thread(target=attempt, args=(lambda: _restore(ctx, acme, first),)),
        threading.Thread(target=attempt, args=(lambda: _restore(ctx, acme, second),)),
        threading.Thread(target=attempt, args=(lambda: _copy(ctx, acme, source),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok", "quota_exceeded", "quota_exceeded"]
    assert _used(ctx, "acme") == 2 * size


def test_tinker_download_placement_is_held_to_the_quota_and_ends_the_future(ctx, setup: Setup):  # type: ignore[no-untyped-def]  # noqa: F811 - the fixture
    """issue 12, part 2 (Tinker placement): ``save_weights_external`` exports next to the source, then
    places the output at ``{model}/external_weights/{name}`` as a zero-copy checkpoint, new logical
    bytes of the tenant. Past the quota the placement is refused once: the future ends with the
    ``quota_exceeded`` message as a user error (not an error on every poll), and nothing is placed."""
    from weightstore.tinker import sessions

    state = setup.save("step-2", kind="training")
    now = ctx.clock.now()
    with session_scope(ctx.engine) as s:
        sid = sessions.create_session(s, setup.trainer, now=now)
        _, model_id = sessions.load_weights(s, setup.trainer, now=now, session_id=sid, model_seq_id=0, path=state)
    request_id = sessions.save_weights_external(ctx, setup.trainer, model_id=model_id, name="dl", ttl_seconds=None)
    assert exportjobs.run_one(ctx, "w") == "succeeded"
    [exported] = _outputs(ctx, "external")
    used = _used(ctx, "acme")
    _set_quota(ctx, "acme", used + exported.size_bytes - 1)
    for _ in range(2):  # the second poll reads the recorded result
        with session_scope(ctx.engine) as s:
            result = sessions.poll_future(s, setup.trainer, request_id, now=ctx.clock.now())
        assert result == {
            "error": _message("acme", used, exported.size_bytes, used + exported.size_bytes - 1),
            "category": "user",
        }
    with session_scope(ctx.engine) as s:
        assert s.exec(select(Checkpoint).where(Checkpoint.run_id == model_id)).all() == []
    assert _used(ctx, "acme") == used
