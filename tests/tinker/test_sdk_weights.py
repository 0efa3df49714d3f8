"""copy_weights (zero-copy, idempotent), external-weights URLs, the legacy archive, audit and
unsupported training endpoints, through the real SDK and the wire."""

from __future__ import annotations

import io
import tarfile
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
import tinker
from sqlmodel import select

from tests.helpers import sampler_files
from weightstore import auth, db, publish
from weightstore.models import Blob, Checkpoint, CheckpointFile, TenantBlob, TrainingRun, UsageEvent
from weightstore.names import TinkerPath

pytestmark = pytest.mark.timeout(180)


def _manifest(ctx, path: str) -> dict[str, str]:
    p = TinkerPath.parse(path)
    with db.session_scope(ctx.engine) as s:
        ck = s.exec(
            select(Checkpoint).where(
                Checkpoint.run_id == p.run_id,
                Checkpoint.kind == p.kind,
                Checkpoint.name == p.name,
                Checkpoint.state == "committed",
            )
        ).one()
        return {f.path: f.sha256 for f in s.exec(select(CheckpointFile).where(CheckpointFile.checkpoint_id == ck.id))}


def test_copy_weights_zero_copy_and_idempotent(ctx, server, keys, sdk, other_sdk, seeded, clock):
    with db.session_scope(ctx.engine) as s:
        blobs_before = len(s.exec(select(Blob)).all())
    new_path = sdk.copy_weights(seeded.paths["w1"], "proj-x", ttl_seconds=7200).result(timeout=30)
    new = TinkerPath.parse(new_path)
    assert new.run_id != seeded.run_id and new.checkpoint_id == "weights/step-1"
    assert _manifest(ctx, new_path) == _manifest(ctx, seeded.paths["w1"])  # same blobs
    with db.session_scope(ctx.engine) as s:
        assert len(s.exec(select(Blob)).all()) == blobs_before  # no byte moved
        run = s.get(TrainingRun, new.run_id)
        assert run is not None and run.trainable is False and run.copied_from_run_id == seeded.run_id
        ck = s.exec(select(Checkpoint).where(Checkpoint.run_id == new.run_id)).one()
        commits = s.exec(select(UsageEvent).where(UsageEvent.checkpoint_id == ck.id)).all()
        assert [e.event for e in commits] == ["commit"]
    copy = sdk.list_checkpoints(new.run_id).result(timeout=30).checkpoints[0]
    assert copy.tinker_path == new_path and copy.expires_at is not None  # its own TTL

    # the same X-Idempotency-Key (what the SDK reuses across retries) answers the same copy
    key = str(uuid.uuid4())
    body = {"source_path": seeded.paths["s1"], "destination_project_id": "p"}
    hdrs = {"X-API-Key": keys.trainer, "X-Idempotency-Key": key}
    a = httpx.post(f"{server.url}/api/v1/copy_weights", json=body, headers=hdrs).json()["tinker_path"]
    b = httpx.post(f"{server.url}/api/v1/copy_weights", json=body, headers=hdrs).json()["tinker_path"]
    assert a == b
    assert (
        sum(
            1
            for c in sdk.list_user_checkpoints(limit=100).result(timeout=30).checkpoints
            if c.checkpoint_id == "sampler_weights/step-1"
        )
        == 2
    )  # the source and one copy

    # cross-tenant: a private checkpoint is not found; a published one can be copied
    with server.answered_without_retries(), pytest.raises(tinker.NotFoundError):
        other_sdk.copy_weights(seeded.paths["s1"], "p").result(timeout=30)
    sdk.publish_checkpoint_from_tinker_path(seeded.paths["s1"]).result(timeout=30)
    theirs = other_sdk.copy_weights(seeded.paths["s1"], "p").result(timeout=30)
    assert _manifest(ctx, theirs) == _manifest(ctx, seeded.paths["s1"])
    with db.session_scope(ctx.engine) as s:
        held = set(s.exec(select(TenantBlob.sha256).where(TenantBlob.tenant_id == "globex")).all())
    assert set(_manifest(ctx, theirs).values()) <= held
    with pytest.raises(tinker.BadRequestError):
        sdk.copy_weights(seeded.paths["w1"], "p", ttl_seconds=5).result(timeout=30)


def _commit_external(ctx, api_key: str, run_id: str, name: str, files: dict[str, bytes]) -> str:
    """An external_weights checkpoint as an export job publishes it (local files → checkpoint)."""
    with db.session_scope(ctx.engine) as s:
        principal = auth.authenticate(s, api_key, now=ctx.clock.now())
    with tempfile.TemporaryDirectory() as tmp:
        for path, data in files.items():
            (Path(tmp) / path).write_bytes(data)
        new = publish.NewCheckpoint(run_id=run_id, kind="external", name=name)
        ckpt = publish.publish_files(ctx, principal, new, publish.local_files(Path(tmp)))
    return str(TinkerPath(ckpt.run_id, ckpt.kind, ckpt.name))


def test_external_weights_urls_unauthenticated_get(ctx, keys, sdk, other_sdk, seeded):
    files = sampler_files(7)
    path = _commit_external(ctx, keys.trainer, seeded.run_id, "final", files)
    assert path == f"tinker://{seeded.run_id}/external_weights/final"
    assert sdk.list_checkpoints(seeded.run_id).result(timeout=30).checkpoints[0].checkpoint_type == "external"
    res = sdk.get_external_weights_urls(path).result(timeout=30)
    assert sorted(res.urls) == sorted(files) and res.expires.tzinfo is not None
    for name, url in res.urls.items():
        r = httpx.get(url)  # no credentials at all
        assert r.status_code == 200 and r.content == files[name]
    with pytest.raises(tinker.NotFoundError):
        other_sdk.get_external_weights_urls(path).result(timeout=30)


def test_legacy_archive(server, keys, seeded):
    url = f"{server.url}/api/v1/training_runs/{seeded.run_id}/checkpoints/weights/step-1/archive"
    r = httpx.get(url, headers={"X-API-Key": keys.trainer, "accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expires"].endswith("Z") or "+" in body["expires"]
    tar_bytes = httpx.get(body["url"]).content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    from tests.helpers import state_files

    src = state_files(1)
    assert set(members) == {"adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"}
    assert members["adapter_model.safetensors"] == src["adapter_model.safetensors"]
    assert members["adapter_config.json"] == src["adapter_config.json"] and members["checkpoint_complete"] == b""
    again = httpx.get(url, headers={"X-API-Key": keys.trainer}).json()
    assert httpx.get(again["url"]).content == tar_bytes  # deterministic: same object
    assert httpx.get(url, headers={"X-API-Key": keys.other_trainer}).status_code == 404


def test_audit_log_admin_only(server, keys, sdk, seeded):
    sdk.set_checkpoint_ttl_from_tinker_path(seeded.paths["w1"], 7200).result(timeout=30)
    admin = tinker.AdminClient(base_url=server.url, api_key=keys.admin)
    log = admin.get_audit_log(event_type="checkpoints").result(timeout=30)
    events = [(e.event, e.tinker_path) for e in log.entries]
    assert ("checkpoint_ttl", seeded.paths["w1"]) in events
    assert ("checkpoint_commit", seeded.paths["s1"]) in events
    with pytest.raises(tinker.PermissionDeniedError):
        tinker.AdminClient(base_url=server.url, api_key=keys.trainer).get_audit_log().result(timeout=30)


@pytest.mark.parametrize("endpoint", ["forward_backward", "optim_step", "save_weights", "create_model", "asample"])
def test_training_endpoints_answer_clear_400(server, keys, endpoint, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("wire-only check: one backend is enough")
    r = httpx.post(f"{server.url}/api/v1/{endpoint}", json={}, headers={"X-API-Key": keys.trainer})
    assert r.status_code == 400 and r.json()["code"] == "unsupported"
    assert "does not train" in r.json()["message"]
