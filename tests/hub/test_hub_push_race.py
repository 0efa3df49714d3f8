"""Two Hub pushes of one LFS carrier's bytes at once never take the tenant past its hard quota.

The race (``uploads.declare`` with a ``Handover``): the recording transaction read the carrier's
credit (``handover(..., take=False)``) *before* taking the tenant's row lock. On PostgreSQL two
commits reusing the bytes of one carrier both read its credit before either deleted the carrier row,
so both were credited for the same bytes: two checkpoints' worth of reservations under a quota that
fits one. Now the credit is read under the tenant lock: the second push reads it after the first
took the reservation over, gets no credit, and is refused with ``quota_exceeded`` (two checkpoints
of the same bytes are two checkpoints' logical bytes: the quota does not subtract dedup).

The interleaving is forced, not hoped for: push 1 pauses right after reading its credit in the
recording transaction; push 2 runs meanwhile until it finishes or waits on a lock (PostgreSQL: the
tenant's row lock, seen in ``pg_stat_activity``; SQLite: the database write lock push 1's
``BEGIN IMMEDIATE`` holds, given two seconds); then push 1 goes on.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime

import httpx
import pytest
from sqlmodel import Session, col, select

from tests.conftest import Keys
from tests.helpers import lock_waiters
from tests.hub.conftest import principal_for
from weightstore import hubwrite, tenants, uploads
from weightstore.context import Context
from weightstore.db import session_scope
from weightstore.errors import TenantQuotaExceeded
from weightstore.models import Tenant, Upload, UploadFile, UploadState
from weightstore.names import TinkerPath
from weightstore.objectstore import blob_key

SIZE = 64 * 1024
DATA = bytes(range(256)) * (SIZE // 256)
SHA = hashlib.sha256(DATA).hexdigest()
QUOTA = SIZE + SIZE // 2
"""Fits the pushed bytes once (one checkpoint), not twice."""


def _commit_body(folder: str) -> bytes:
    """An NDJSON commit naming the LFS-carried file as ``FOLDER/weights.bin`` (a ``files`` checkpoint)."""
    lines = [
        {"key": "header", "value": {"summary": f"push {folder}"}},
        {"key": "lfsFile", "value": {"path": f"{folder}/weights.bin", "algo": "sha256", "oid": SHA, "size": SIZE}},
    ]
    return b"\n".join(json.dumps(line).encode() for line in lines)


class _Gate:
    """Push 1's pause: the first handover made claims it; ``paused`` once it holds its credit."""

    def __init__(self) -> None:
        self.paused, self.release = threading.Event(), threading.Event()
        self._armed, self._lock = True, threading.Lock()

    def claim(self) -> bool:
        with self._lock:
            armed, self._armed = self._armed, False
            return armed


def _pausing_handover(gate: _Gate) -> type[hubwrite._CarrierHandover]:
    class PausingHandover(hubwrite._CarrierHandover):
        """The real handover; the first one made pauses right after its second credit read (a
        declare reads it first for the early, unlocked check, then in the recording transaction)."""

        def __init__(self, tenant_id: str, sizes: dict[str, int], now: datetime) -> None:
            super().__init__(tenant_id, sizes, now)
            self.pauses, self.reads = gate.claim(), 0

        def __call__(self, session: Session, shas: list[str], take: bool) -> int:
            credit = super().__call__(session, shas, take)
            if not take:
                self.reads += 1
                if self.pauses and self.reads == 2:
                    gate.paused.set()
                    gate.release.wait(120)
            return credit

    return PausingHandover


def _wait_until_blocked_or_done(ctx: Context, push: threading.Thread) -> None:
    """Until ``push`` ended or, on PostgreSQL, waits on a row lock (held by the paused push 1, so it
    stays blocked until that goes on). SQLite shows no lock waits: there it gets two seconds."""
    if ctx.engine.dialect.name != "postgresql":
        push.join(2)
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and push.is_alive():
        if lock_waiters(ctx.engine):
            return
        time.sleep(0.05)
    assert not push.is_alive(), "push 2 neither finished nor waited on a lock"


def test_two_pushes_of_one_carriers_bytes_never_overshoot_the_quota(
    ctx: Context, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = principal_for(ctx, keys.trainer)
    with session_scope(ctx.engine) as s:
        repo_id = hubwrite.create_repo(s, acme, namespace=None, name="race", now=ctx.clock.now())
        tenant = s.get(Tenant, acme.tenant_id)
        assert tenant is not None and tenants.usage(s, acme.tenant_id, now=ctx.clock.now()).used_bytes == 0
        tenant.quota_bytes = QUOTA
        s.add(tenant)
    run_id = f"{acme.tenant_id}:race"

    # The bytes go up once, through one LFS batch: its carrier reserves them (SIZE of QUOTA).
    [obj] = hubwrite.lfs_batch(ctx, acme, repo_id, [{"oid": SHA, "size": SIZE}], base_url="http://hub.invalid")
    href = obj["actions"]["upload"]["href"]  # type: ignore[index]
    assert httpx.put(href, content=DATA).status_code == 200

    # What the tenant uses right after every declare recorded its reservation (the only step that grows it).
    used_after_declare: list[int] = []
    real_declare = uploads.declare

    def declare_and_measure(*args: object, **kwargs: object) -> uploads.UploadAnswer:
        answer = real_declare(*args, **kwargs)  # type: ignore[arg-type]
        with session_scope(ctx.engine) as s:
            used_after_declare.append(tenants.usage(s, acme.tenant_id, now=ctx.clock.now()).used_bytes)
        return answer

    monkeypatch.setattr(uploads, "declare", declare_and_measure)
    gate = _Gate()
    monkeypatch.setattr(hubwrite, "_CarrierHandover", _pausing_handover(gate))

    outcomes: dict[str, object] = {}

    def push(folder: str) -> None:
        try:
            outcomes[folder] = hubwrite.commit(ctx, acme, repo_id, "main", _commit_body(folder))
        except Exception as exc:  # noqa: BLE001 - the outcome is asserted below
            outcomes[folder] = exc

    first = threading.Thread(target=push, args=("a",))
    second = threading.Thread(target=push, args=("b",))
    first.start()
    try:
        assert gate.paused.wait(120), "push 1 never reached its credit read in the recording transaction"
        second.start()
        _wait_until_blocked_or_done(ctx, second)
    finally:
        gate.release.set()
        first.join(120)
        if second.ident is not None:
            second.join(120)
    assert not first.is_alive() and not second.is_alive()

    assert max(used_after_declare) <= QUOTA, used_after_declare  # before the fix: [SIZE, 2 * SIZE]
    assert used_after_declare == [SIZE]  # push 1's reservation (the carrier's, taken over); push 2 recorded none
    a, b = outcomes["a"], outcomes["b"]
    assert isinstance(a, hubwrite.CommitAnswer), a
    assert a.checkpoints == [str(TinkerPath(run_id, "files", "a"))] and a.bytes_received == SIZE
    assert isinstance(b, TenantQuotaExceeded), b
    assert b.code == "quota_exceeded"
    with session_scope(ctx.engine) as s:
        assert tenants.usage(s, acme.tenant_id, now=ctx.clock.now()).used_bytes == SIZE
        open_carrier_rows = s.exec(
            select(UploadFile.path)
            .join(Upload, col(Upload.id) == col(UploadFile.upload_id))
            .where(Upload.kind == hubwrite.CARRIER_KIND, Upload.state == UploadState.open)
        ).all()
    assert open_carrier_rows == []  # handed over to push 1's checkpoint, then closed
    assert ctx.store.read_range(blob_key(SHA), 0, SIZE) == DATA
