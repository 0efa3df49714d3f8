"""Upload leases (issue 13, found 4): an open upload is a short lease renewed by its client; one whose
client died is closed by the collector one lease later and its blobs are unpinned, not after 24 h."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

import pytest

from tests.collector._util import assert_verified, declare, new_run, object_exists, principal, send
from tests.conftest import LiveServer
from tests.helpers import sampler_files
from weightstore import uploads
from weightstore.client import Client, _LeaseKeeper
from weightstore.db import session_scope
from weightstore.errors import UploadExpired
from weightstore.models import Upload, UploadState
from weightstore_gc import run


def _state(ctx, upload_id: str) -> tuple[str, object]:  # type: ignore[no-untyped-def]
    with session_scope(ctx.engine) as s:
        u = s.get(Upload, upload_id)
        assert u is not None
        return u.state, u.expires_at


def test_an_upload_whose_client_stopped_renewing_is_closed_one_lease_later(ctx, keys, clock):
    """issue 13, found 4: declared, bytes sent, then the client (or its replica) died. One lease on
    the collector closes it and its blobs lose their pin; a grace period later they are collected and
    ``verify`` is clean. On HEAD the upload stayed open for ``upload_expiry_seconds`` (24 h)."""
    lease = ctx.settings.upload_lease_seconds
    assert lease < ctx.settings.upload_expiry_seconds
    p = principal(ctx, keys.trainer)
    files = sampler_files(61)
    ans = declare(ctx, p, new_run(ctx, p), "abandoned", files)
    send(ctx, p, ans, files)
    assert ans.expires_at == clock.now() + timedelta(seconds=lease)
    clock.advance(lease + 1)
    with pytest.raises(UploadExpired):  # a lapsed lease is never revived
        uploads.renew(ctx, p, ans.upload_id)
    rep = run(ctx)
    assert rep.stats["orphans"]["closed_uploads"] == 1
    assert _state(ctx, ans.upload_id)[0] == UploadState.expired
    assert all(object_exists(ctx, b) for b in files.values())  # the grace period counts from the close
    clock.advance(ctx.settings.gc_grace_seconds + 1)
    run(ctx)
    assert not any(object_exists(ctx, b) for b in files.values())
    assert_verified(ctx, collected=True)


def test_a_renewing_client_keeps_its_upload_open_past_the_lease(ctx, keys, clock):
    """issue 13, found 4: renewed every 0.6 lease, an upload outlives three leases, the collector
    leaves it alone, and it commits."""
    lease = ctx.settings.upload_lease_seconds
    p = principal(ctx, keys.trainer)
    files = sampler_files(62)
    ans = declare(ctx, p, new_run(ctx, p), "kept", files)
    send(ctx, p, ans, files)
    for _ in range(6):
        clock.advance(lease * 0.6)
        assert uploads.renew(ctx, p, ans.upload_id) == clock.now() + timedelta(seconds=lease)
    assert clock.now() - ans.expires_at > timedelta(seconds=2 * lease)
    assert run(ctx).stats["orphans"]["closed_uploads"] == 0
    assert _state(ctx, ans.upload_id)[0] == UploadState.open
    res = uploads.commit(ctx, p, ans.upload_id)
    assert res.bytes_received == sum(len(b) for b in files.values())
    assert_verified(ctx)


def test_renewals_never_outlive_the_upload_expiry(ctx, keys, clock):
    """issue 13, found 4: ``upload_expiry_seconds`` stays the longest an upload may live."""
    ctx.settings = ctx.settings.model_copy(update={"upload_lease_seconds": 600, "upload_expiry_seconds": 1000})
    p = principal(ctx, keys.trainer)
    ans = declare(ctx, p, new_run(ctx, p), "capped", sampler_files(63))
    created = clock.now()
    clock.advance(500)
    assert uploads.renew(ctx, p, ans.upload_id) == created + timedelta(seconds=1000)
    clock.advance(501)
    with pytest.raises(UploadExpired):
        uploads.renew(ctx, p, ans.upload_id)


def test_transfer_pages_and_commit_renew_the_lease(ctx, keys, clock):
    """issue 13, found 4: a client busy sending (asking for part URLs) or committing is alive."""
    lease = ctx.settings.upload_lease_seconds
    p = principal(ctx, keys.trainer)
    files = sampler_files(64)
    ans = declare(ctx, p, new_run(ctx, p), "busy", files)
    send(ctx, p, ans, files)
    clock.advance(lease * 0.9)
    uploads.transfer(ctx, p, ans.upload_id, "adapter_config.json")
    assert _state(ctx, ans.upload_id)[1] == clock.now() + timedelta(seconds=lease)
    clock.advance(lease * 0.9)
    uploads.commit(ctx, p, ans.upload_id)
    assert _state(ctx, ans.upload_id)[0] == UploadState.committed


def test_an_upload_past_its_lease_can_still_be_aborted(ctx, keys, clock):
    """issue 13, found 4: a client that comes back after its lease lapsed may still close its upload
    (the collector would; no need to wait for it)."""
    p = principal(ctx, keys.trainer)
    ans = declare(ctx, p, new_run(ctx, p), "late", sampler_files(65))
    clock.advance(ctx.settings.upload_lease_seconds + 1)
    uploads.abort(ctx, p, ans.upload_id)
    assert _state(ctx, ans.upload_id)[0] == UploadState.aborted


def test_the_client_renews_its_open_upload_in_the_background(ctx, keys):
    """issue 13, found 4: the Python client's lease keeper renews every third of ``lease_seconds``
    through the API, and stops when told."""
    ctx.settings = ctx.settings.model_copy(update={"upload_lease_seconds": 2})
    server = LiveServer(ctx).start()
    try:
        c = Client(server.url, keys.trainer, hash_cache=False, progress=False, retry_deadline=5)
        run_id = c.create_run("tiny")["run_id"]
        body = {"run_id": run_id, "kind": "sampler", "name": "bg", "files": []}
        files = sampler_files(66)
        body["files"] = [{"path": k, "size_bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in files.items()]
        ans = c._call("POST", "/v1/uploads", json=body)
        assert ans["lease_seconds"] == 2
        keeper = _LeaseKeeper(c, ans["upload_id"], ans["lease_seconds"])
        keeper.start()
        time.sleep(2.2)
        keeper.stop()
        done = keeper.renewals
        assert done >= 2
        time.sleep(1.0)
        assert keeper.renewals == done
    finally:
        server.stop()
