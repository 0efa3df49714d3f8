"""Scenario A: one in-process server on a ``FakeClock``: concurrent clients, clock jumps, collector
runs beside the clients, export jobs on the in-process worker; every invariant after every step.

Runs on SQLite and PostgreSQL (the ``db_url`` fixture). See ``tests/reliability/__init__.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import LiveServer
from tests.reliability.harness import BASE, UNUSED_BASE, Harness, Schedule
from weightstore import auth, db, worker
from weightstore.client import Client
from weightstore.context import Context
from weightstore_cli.exports import upload_base_model
from weightstore_gc import verify

ROUNDS = 30
GRACE = 2 * 3600
EVERY_PHASE = ["expire", "mark", "sweep", "orphans"]
JUMPS = (61, 1801, 3607, GRACE + 11)
"""Seconds a clock jump moves; odd amounts, so a jump never lands exactly on an expiry."""


def _collect(h: Harness) -> None:
    r = h.admin.post("/v1/admin/gc/runs", json={"phases": EVERY_PHASE})
    if r.status_code == 423:  # another collector holds the lease: legitimate, nothing done
        return
    assert r.status_code == 201, f"collector run: {r.status_code} {r.text[:300]}"
    row = r.json()
    if row["state"] != "finished":
        h.violate("collector_finishes", f"collector run {row['id']} ended {row['state']}: {row['findings']}")


def _verify(h: Harness, ctx: Context, *, collected: bool = False) -> None:
    rep = verify(ctx, hash_sample=3, seed=h.seed + h.step, expect_collected=collected)
    bad = rep.findings if collected else rep.errors
    if bad:
        h.violate("gc_verify_clean", str([f.to_dict() for f in bad]))


def test_inprocess_clients_collector_exports_clock(ctx, clock, reliability_seed, reliability_base: Path, db_url):
    ctx.settings = ctx.settings.model_copy(update={"gc_grace_seconds": GRACE, "worker_lease_seconds": 30})
    srv = LiveServer(ctx, background=[lambda c: worker.start_in_process(c, poll_seconds=0.2)]).start()
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    with db.session_scope(ctx.engine) as s:
        admin_key = auth.create_key(s, tenant="ops", role="admin", now=clock.now())[1]
    h = Harness(seed=reliability_seed, base_url=srv.url, admin_key=admin_key, now=clock.now, label=f"inprocess-{backend}")
    t0 = time.monotonic()
    try:
        with Client(srv.url, admin_key, hash_cache=False) as admin:
            upload_base_model(admin, BASE, reliability_base)
            upload_base_model(admin, UNUSED_BASE, reliability_base)
        h.setup_tenants()
        schedule = Schedule.draw(h.rng, ROUNDS, {"jump": 7, "collect": 8})
        bursts = {s for s in range(1, ROUNDS + 1) if h.rng.random() < 0.1}
        print(f"schedule: {schedule.steps}; bursts at {sorted(bursts)}", flush=True)
        for step in range(1, ROUNDS + 1):
            g = schedule.steps.get(step)
            if g == "jump":  # alone, between rounds: a request never straddles a jump
                clock.advance(h.rng.choice(JUMPS))
            h.run_round((lambda: _collect(h)) if g == "collect" else None, burst=step in bursts)
            _verify(h, ctx)
            h.end_step()
        # Let the export jobs end (the worker polls in real time; backoff waits in fake time).
        deadline = time.monotonic() + 90
        while any(j.state not in ("succeeded", "failed", "cancelled") for j in h.jobs) and time.monotonic() < deadline:
            time.sleep(0.5)
            clock.advance(7)
            h.poll_jobs()
        h.step += 1
        for j in h.jobs:
            if j.state not in ("succeeded", "failed", "cancelled"):
                h.violate("export_terminates", f"job {j.job_id} of {j.source} still {j.state} after 90 s")
        h.check_all("final read-back")
        # Full collection past grace and upload expiry: only garbage may go; every readable commit stays.
        clock.advance(max(GRACE, ctx.settings.upload_expiry_seconds) + 13)
        for _ in range(3):
            _collect(h)
            clock.advance(GRACE + 13)
        _collect(h)
        h.check_all("read-back after a full collection")
        _verify(h, ctx, collected=True)
        print(h.describe() + f" in {time.monotonic() - t0:.0f} s", flush=True)
        h.finish()
    finally:
        h.close()
        srv.stop()
