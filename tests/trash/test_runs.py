"""Run delete and detail (issue 12, part 5): ``runs rm``/``DELETE /v1/runs/{run}``, ``runs show``,
and no empty run left behind by ``tinker checkpoint download``."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import col, select
from typer.testing import CliRunner

from tests.collector._util import assert_verified, new_run, principal, save
from tests.helpers import sampler_files, state_files
from tests.tinker.test_cli import export_worker, run_cli  # noqa: F401  (export_worker is a fixture)
from weightstore import runs
from weightstore.db import session_scope
from weightstore.models import Checkpoint, ExportJob, UsageEvent


def _queue_export(ctx, tenant_id: str, source_id: str, state: str) -> str:  # type: ignore[no-untyped-def]
    job_id = str(uuid.uuid4())
    with session_scope(ctx.engine) as s:
        s.add(
            ExportJob(
                id=job_id,
                tenant_id=tenant_id,
                source_checkpoint_id=source_id,
                target="peft",
                request_key=job_id,
                state=state,
                created_at=ctx.clock.now(),
            )
        )
    return job_id


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_runs_show_and_rm(server, keys, ctx, clock, db_url):
    """issue 12, part 5: ``GET /v1/runs/{run}`` counts visible checkpoints per kind with their bytes;
    delete is refused (400, naming the jobs) while an export of the run is queued or running; then it
    deletes every checkpoint through the normal delete path (ledger ``end``: now, or ``expires_at``
    for one already past its TTL) and the run answers 404 everywhere; the collector later reclaims it."""
    p = principal(ctx, keys.trainer)
    with session_scope(ctx.engine) as s:
        run_id = runs.create_run(s, p, base_model="tiny", now=clock.now(), run_id="acme:doomed").id
    s1, s2, w1 = sampler_files(1), sampler_files(2), state_files(3)
    save(ctx, p, run_id, "s1", s1)
    save(ctx, p, run_id, "s2", s2, ttl=3600)
    save(ctx, p, run_id, "w1", w1, kind="training")
    keep = new_run(ctx, p)
    save(ctx, p, keep, "other", sampler_files(4))
    clock.advance(3601)  # s2 is in the trash, not yet seen by the collector
    with (
        httpx.Client(base_url=server.url, headers={"X-API-Key": keys.trainer}, timeout=60) as api,
        httpx.Client(base_url=server.url, headers={"X-API-Key": keys.other_trainer}, timeout=60) as other,
    ):
        d = api.get(f"/v1/runs/{run_id}").json()
        assert d["kinds"] == [
            {"kind": "sampler", "count": 1, "size_bytes": sum(map(len, s1.values()))},
            {"kind": "training", "count": 1, "size_bytes": sum(map(len, w1.values()))},
        ]
        assert (d["checkpoint_count"], d["size_bytes"], d["active_exports"]) == (
            2,
            sum(map(len, s1.values())) + sum(map(len, w1.values())),
            [],
        )
        with session_scope(ctx.engine) as s:
            w1_id = s.exec(select(Checkpoint.id).where(Checkpoint.run_id == run_id, Checkpoint.name == "w1")).one()
        queued = _queue_export(ctx, p.tenant_id, w1_id, "queued")
        running = _queue_export(ctx, p.tenant_id, w1_id, "running")
        assert set(api.get(f"/v1/runs/{run_id}").json()["active_exports"]) == {queued, running}
        r = api.delete(f"/v1/runs/{run_id}")
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
        assert queued in r.json()["message"] and running in r.json()["message"]
        assert other.delete(f"/v1/runs/{run_id}").status_code == 404  # foreign = missing
        with session_scope(ctx.engine) as s:
            for job in s.exec(select(ExportJob).where(col(ExportJob.id).in_([queued, running]))):
                job.state = "failed"
                s.add(job)
        deleted_at = clock.now()
        r = api.delete(f"/v1/runs/{run_id}")
        assert r.status_code == 200 and r.json() == {"run_id": run_id, "checkpoints_deleted": 3}
        assert api.get(f"/v1/runs/{run_id}").status_code == 404
        assert [x["run_id"] for x in api.get("/v1/runs").json()["runs"]] == [keep]
        assert {c["run_id"] for c in api.get("/v1/checkpoints").json()["checkpoints"]} == {keep}
        assert api.get("/v1/trash").json() == {"checkpoints": []}  # a deleted run's expired checkpoints are gone too
        r = api.post("/v1/runs", json={"base_model": "tiny", "run_id": run_id})
        assert (r.status_code, r.json()["code"]) == (400, "already_exists")  # run ids are never reused
    with session_scope(ctx.engine) as s:
        ends = {
            c.name: [e.at for e in s.exec(select(UsageEvent).where(UsageEvent.checkpoint_id == c.id, UsageEvent.event == "end"))]
            for c in s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id))
        }
        states = {c.name: c.state for c in s.exec(select(Checkpoint).where(Checkpoint.run_id == run_id))}
    assert ends == {"s1": [deleted_at], "s2": [deleted_at - timedelta(seconds=1)], "w1": [deleted_at]}
    assert states == {"s1": "deleted", "s2": "deleted", "w1": "deleted"}
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": keys.admin}, timeout=60) as admin:
        assert admin.post("/v1/admin/gc/runs", json={}).json()["state"] == "finished"
    assert_verified(ctx, collected=True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_runs_cli_show_and_rm(server, keys, ctx, clock, db_url):
    """issue 12, part 5: ``weightstore runs show RUN`` and ``weightstore runs rm RUN -y``."""
    from weightstore_cli import app

    p = principal(ctx, keys.trainer)
    run_id = new_run(ctx, p)
    save(ctx, p, run_id, "s1", sampler_files(1))
    auth = ["--url", server.url, "--api-key", keys.trainer]
    runner = CliRunner()
    res = runner.invoke(app, ["runs", "show", run_id, "-f", "json", *auth])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kinds"] == [
        {"kind": "sampler", "count": 1, "size_bytes": sum(map(len, sampler_files(1).values()))}
    ]
    res = runner.invoke(app, ["runs", "rm", run_id, "-y", *auth])
    assert res.exit_code == 0 and f"deleted run {run_id} (1 checkpoint(s))" in res.output
    res = runner.invoke(app, ["runs", "show", run_id, *auth])
    assert res.exit_code == 1 and "not found" in res.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_tinker_download_leaves_no_empty_run(ctx, server, keys, tmp_path, export_worker, db_url):  # noqa: F811
    """issue 12, part 5 (Found: each ``tinker checkpoint download`` of a ``weights/`` checkpoint left an
    empty run behind): after the real tinker CLI download, the tenant's runs are exactly its own."""
    from tests.exportjobs.builders import adapter_files, build_base
    from tests.exportjobs.conftest import principal_for
    from weightstore import basemodels
    from weightstore.client import Client

    base_dir = build_base(tmp_path / "base" / "tiny-llama")
    basemodels.register(ctx, principal_for(ctx, keys.admin), "tiny-llama", base_dir)
    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-llama", lora_rank=4)
    files = {**adapter_files(1), "optimizer.safetensors": state_files()["optimizer.safetensors"]}
    path = c.upload(run["run_id"], "training", "final", files)["tinker_path"]
    for i in range(2):  # twice: each download used to add a run
        out = str(tmp_path / f"dl{i}")
        res = run_cli(server, keys.trainer, "-f", "json", "checkpoint", "download", path, "-o", out, tmp_path=tmp_path)
        assert Path(json.loads(res.stdout)["destination"]).is_dir()
    assert [r["run_id"] for r in c.list_runs()["runs"]] == [run["run_id"]]
    listed = json.loads(run_cli(server, keys.trainer, "-f", "json", "run", "list", tmp_path=tmp_path).stdout)
    assert [r["training_run_id"] for r in listed["runs"]] == [run["run_id"]]
