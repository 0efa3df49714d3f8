"""Export jobs at the service level: idempotent submit, cancel, claim races, lease takeover,
corrupt base shards, transient store errors. Real SQLite/PostgreSQL, real S3, real conversion."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlmodel import select

from weightstore import basemodels, exportjobs
from weightstore.db import session_scope
from weightstore.errors import InUse, InvalidRequest, LeaseLost, NotFound, StoreUnavailable
from weightstore.models import Checkpoint, ExportJob
from weightstore.objectstore import blob_key

from .conftest import BASE


def job_row(ctx, job_id: str) -> ExportJob:
    with session_scope(ctx.engine) as s:
        job = s.get(ExportJob, job_id)
        assert job is not None
        return job


def outputs(ctx, kind: str) -> list[Checkpoint]:
    with session_scope(ctx.engine) as s:
        return list(s.exec(select(Checkpoint).where(Checkpoint.kind == kind)).all())


def test_same_request_returns_same_job_and_cancel(ctx, setup):
    a = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    b = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    assert a.id == b.id and a.state == "queued"
    other = exportjobs.submit(ctx, setup.trainer, setup.source, target="merged")
    assert other.id != a.id
    with session_scope(ctx.engine) as s:
        assert exportjobs.cancel(s, setup.trainer, a.id, now=ctx.clock.now()).state == "cancelled"
    # a cancelled job is never claimed; the merged one is
    claimed = exportjobs.claim(ctx, "w1")
    assert claimed is not None and claimed.id == other.id
    assert exportjobs.claim(ctx, "w2") is None
    # cancelling the running job: the worker's heartbeat loses the lease, and it publishes nothing
    with session_scope(ctx.engine) as s:
        exportjobs.cancel(s, setup.trainer, other.id, now=ctx.clock.now())
    with pytest.raises(LeaseLost):
        exportjobs.heartbeat(ctx, other.id, "w1")
    assert exportjobs.run_job(ctx, claimed, "w1") == "lost"
    assert outputs(ctx, "merged") == [] and job_row(ctx, other.id).state == "cancelled"
    # asking again for a cancelled export queues the same job once more
    again = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    assert again.id == a.id and again.state == "queued"
    # unknown base model / target are refused up front
    with pytest.raises(NotFound, match="registered: tiny-llama"):
        exportjobs.submit(ctx, setup.trainer, setup.source, target="peft", base_model="nope")
    with pytest.raises(InvalidRequest):
        exportjobs.submit(ctx, setup.trainer, setup.source, target="gguf")


def test_two_workers_race_for_one_job(ctx, setup):
    job = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    barrier = threading.Barrier(4)
    got: list[ExportJob | None] = []

    def grab(i: int) -> None:
        barrier.wait()
        got.append(exportjobs.claim(ctx, f"worker-{i}"))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [j for j in got if j is not None]
    assert len(winners) == 1 and winners[0].id == job.id and winners[0].attempts == 1
    owner = winners[0].lease_owner
    assert exportjobs.run_job(ctx, winners[0], owner) == "succeeded"
    row = job_row(ctx, job.id)
    assert row.state == "succeeded" and row.attempts == 1 and row.verification
    [out] = outputs(ctx, "external")
    assert out.id == row.result_checkpoint_id and out.exported_from_id == job.source_checkpoint_id
    assert out.name == "step-1"


def test_crashed_worker_is_taken_over(ctx, setup):
    job = exportjobs.submit(ctx, setup.trainer, setup.source, target="merged", output_name="merged-1")
    crashed = exportjobs.claim(ctx, "crashed")
    assert crashed is not None
    assert exportjobs.claim(ctx, "other") is None  # lease still valid
    ctx.clock.advance(ctx.settings.worker_lease_seconds + 1)
    taken = exportjobs.claim(ctx, "other")
    assert taken is not None and taken.id == job.id and taken.attempts == 2 and taken.lease_owner == "other"
    with pytest.raises(LeaseLost):
        exportjobs.heartbeat(ctx, job.id, "crashed")
    assert exportjobs.run_job(ctx, taken, "other") == "succeeded"
    # the "crashed" worker wakes up and runs its stale copy: fenced, no second output
    assert exportjobs.run_job(ctx, crashed, "crashed") == "lost"
    [out] = outputs(ctx, "merged")
    assert out.name == "merged-1" and job_row(ctx, job.id).result_checkpoint_id == out.id


def test_corrupted_base_shard_fails_job_without_output(ctx, setup):
    with session_scope(ctx.engine) as s:
        shard = next(f for f in basemodels.files_of(s, BASE) if f.path.endswith(".safetensors"))
    data = bytearray(ctx.store.read_bytes(blob_key(shard.sha256)))
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 tells
    ctx.store.client.put_object(Bucket=ctx.store.bucket, Key=blob_key(shard.sha256), Body=bytes(data))
    job = exportjobs.submit(ctx, setup.trainer, setup.source, target="merged")
    assert exportjobs.run_one(ctx, "w") == "failed"
    row = job_row(ctx, job.id)
    assert row.state == "failed" and row.error["code"] == "data_loss"
    assert shard.path in row.error["message"] and "corrupt" in row.error["message"]
    assert outputs(ctx, "merged") == []


def test_transient_store_error_is_retried_with_backoff(ctx, setup, monkeypatch):
    job = exportjobs.submit(ctx, setup.trainer, setup.source, target="peft")
    real = ctx.store.iter_chunks
    calls = {"n": 0}

    def flaky(key, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailable(f"get {key}: object store error 503")
        return real(key, **kw)

    monkeypatch.setattr(ctx.store, "iter_chunks", flaky)
    assert exportjobs.run_one(ctx, "w") == "queued"
    row = job_row(ctx, job.id)
    assert row.state == "queued" and row.attempts == 1 and row.error["code"] == "store_unavailable"
    assert row.not_before is not None and row.lease_owner is None
    assert exportjobs.claim(ctx, "w") is None  # backing off
    ctx.clock.advance(exportjobs.backoff_seconds(1) + 1)
    assert exportjobs.run_one(ctx, "w") == "succeeded"
    row = job_row(ctx, job.id)
    assert row.state == "succeeded" and row.attempts == 2 and row.error is None
    assert len(outputs(ctx, "external")) == 1


def test_batch_by_filter_and_base_model_removal(ctx, setup):
    setup.save("step-2", seed=2)
    setup.save("other", seed=3)
    batch_id, jobs = exportjobs.submit_batch(ctx, setup.trainer, target="peft", run_id=setup.run_id, name_pattern="step-*")
    assert sorted(j.output_name for j in jobs) == ["step-1", "step-2"] and {j.batch_id for j in jobs} == {batch_id}
    # the same batch again: the same jobs
    _, again = exportjobs.submit_batch(ctx, setup.trainer, target="peft", run_id=setup.run_id, name_pattern="step-*")
    assert sorted(j.id for j in again) == sorted(j.id for j in jobs)
    with session_scope(ctx.engine) as s, pytest.raises(InUse):
        basemodels.remove(s, setup.admin, BASE, now=ctx.clock.now())
    while exportjobs.run_one(ctx, "w"):
        pass
    with session_scope(ctx.engine) as s:
        assert {j.state for j in exportjobs.list_jobs(s, setup.trainer, batch_id=batch_id)[0]} == {"succeeded"}
        # still refused: the run's checkpoints reference the base model by name
        with pytest.raises(InUse):
            basemodels.remove(s, setup.admin, BASE, now=ctx.clock.now())
        s.execute(sa.update(Checkpoint).values(state="deleted"))
    with session_scope(ctx.engine) as s:
        basemodels.remove(s, setup.admin, BASE, now=ctx.clock.now())
    with session_scope(ctx.engine) as s:
        assert basemodels.list_base_models(s) == []
