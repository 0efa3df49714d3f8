"""Scenario B: real processes, killed with SIGKILL while clients work.

``weightstore serve`` runs as `make serve` does (its embedded SeaweedFS child and in-process export
worker), on the SQLite or PostgreSQL catalog of the ``db_url`` fixture; ``weightstore gc run`` runs
as separate processes beside the clients. A schedule drawn from the seed kills ``serve`` (and with
it the worker, mid-job or not) and starts it again on the same data dir, kills the SeaweedFS child
under the running service, and kills collector processes after a seeded delay. Time is the wall
clock, so TTLs, grace and leases are seconds (settings below). See ``tests/reliability/__init__.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
from pydantic import SecretStr

from tests.conftest import free_port
from tests.reliability.harness import BASE, UNUSED_BASE, Harness, Schedule
from weightstore import auth, db
from weightstore.client import Client
from weightstore.clock import utcnow
from weightstore.context import Context
from weightstore.objectstore import store_from_settings
from weightstore.settings import Settings
from weightstore_cli.exports import upload_base_model
from weightstore_gc import verify

CLI = [sys.executable, "-m", "weightstore_cli"]
ROUNDS = 12
READY_TIMEOUT = 60.0
STORE_BACK_TIMEOUT = 30.0
ENV = {
    "WEIGHTSTORE_EMBEDDED_GC": "false",
    "WEIGHTSTORE_EMBEDDED_WORKER": "true",
    "WEIGHTSTORE_WORKER_LEASE_SECONDS": "4",
    "WEIGHTSTORE_GC_GRACE_SECONDS": "2",
    "WEIGHTSTORE_GC_LEASE_SECONDS": "3",
    "WEIGHTSTORE_GC_DELETE_BATCH": "3",
    "WEIGHTSTORE_TTL_MIN_SECONDS": "2",
    "WEIGHTSTORE_UPLOAD_EXPIRY_SECONDS": "120",
    "WEIGHTSTORE_LOG_JSON": "false",
    "WEIGHTSTORE_LOG_LEVEL": "WARNING",
    "WEIGHTSTORE_SESSION_SECRET": "reliability-session-secret",  # required on a PostgreSQL catalog
}


class Service:
    """``weightstore serve`` on one data dir and port, started again after each kill."""

    def __init__(self, tmp: Path, db_url: str) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "var"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSTORE_")}
        self.env.update(ENV, WEIGHTSTORE_DATA_DIR=str(self.data_dir), WEIGHTSTORE_PORT=str(self.port))
        self.env["WEIGHTSTORE_DATABASE_URL"] = db_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def log_tail(self) -> str:
        path = self.tmp / f"serve-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-25:]) if path.exists() else ""

    def start(self) -> str | None:
        """Start and wait for ``/readyz``; returns why it did not come up, or None."""
        self.starts += 1
        log = open(self.tmp / f"serve-{self.starts}.log", "wb")  # noqa: SIM115 - the child writes it; closed below
        self.proc = subprocess.Popen([*CLI, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"serve exited with {self.proc.returncode}:\n{self.log_tail()}"
            if self.ready():
                return None
            time.sleep(0.2)
        return f"serve not ready within {READY_TIMEOUT:.0f} s:\n{self.log_tail()}"

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def store_pids(self) -> list[int]:
        """The running SeaweedFS processes started for this data dir (found by command line)."""
        found = []
        marker = f"-dir={(self.data_dir / 's3' / 'data').resolve()}"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(a.endswith(b"weed") for a in argv[:1]) and marker.encode() in argv:
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """Test teardown: SIGTERM serve, then make sure no store of ours is left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.store_pids():  # left by a killed serve on code without the supervisor
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def context(self, db_url: str) -> Context:
        """A context on the same catalog and store, for ``verify`` from the test process."""
        endpoint = json.loads((self.data_dir / "s3-endpoint.json").read_text())["endpoint_url"]
        creds = json.loads((self.data_dir / "s3-credentials.json").read_text())
        settings = Settings(
            database_url=db_url,
            s3_endpoint_url=endpoint,
            s3_access_key_id=creds["access_key"],
            s3_secret_access_key=SecretStr(creds["secret_key"]),
            data_dir=self.data_dir,
        )
        return Context(settings=settings, engine=db.make_engine(db_url), store=store_from_settings(settings))


class Faults:
    """The global operations of this scenario; each runs beside the clients of one round."""

    def __init__(self, h: Harness, svc: Service, db_url: str) -> None:
        self.h, self.svc, self.db_url = h, svc, db_url
        self.serve_down = False
        self.store_killed = False

    def _delay(self) -> float:
        return 0.05 + self.h.rng.random() * 0.5  # a round's operations take about 0.3-1 s: lands mid-request

    def plan(self, name: str) -> tuple[float, float]:
        """Draw this fault's random parameters in the main thread (the seed decides them)."""
        return self._delay(), self.h.rng.random()

    def kill_serve(self, delay: float, _: float) -> None:
        time.sleep(delay)
        self.h.fault_active.set()
        self.svc.kill()
        self.serve_down = True

    def kill_store(self, delay: float, _: float) -> None:
        time.sleep(delay)
        pids = self.svc.store_pids()
        if not pids:
            self.h.violate("fault_injected", "no SeaweedFS process of this data dir to kill")
            return
        self.h.fault_active.set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.store_killed = True

    def collect(self, delay: float, kill: float) -> None:
        """``weightstore gc run``; killed after ``delay`` seconds for ``kill`` < 0.4."""
        proc = subprocess.Popen([*CLI, "gc", "run", "--direct"], env=self.svc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if kill < 0.4:
            time.sleep(delay + 1.0)  # + interpreter start: lands anywhere from start-up to the last phase
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            return
        out, err = proc.communicate(timeout=180)
        if proc.returncode == 5:
            self.h.violate("collector_finishes", f"gc run stopped fail-closed: {err.decode()[-600:]}")
        elif proc.returncode not in (0, 3):  # 3: a killed collector's lease has not expired yet
            self.h.violate("collector_finishes", f"gc run exited {proc.returncode}: {err.decode()[-600:]}")

    def recover(self) -> None:
        """After the round: start a killed serve again; wait for a killed store to be back."""
        if self.serve_down:
            self.serve_down = False
            self.store_killed = False
            why = self.svc.start()
            if why is not None:
                self.h.violate("restart_after_kill", f"`weightstore serve` did not restart after SIGKILL: {why}")
                raise AssertionError(self.h.failure_message())  # nothing more can run
        if self.store_killed:
            self.store_killed = False
            deadline = time.monotonic() + STORE_BACK_TIMEOUT
            while not self.svc.ready() and time.monotonic() < deadline:
                time.sleep(0.3)
            if not self.svc.ready():
                self.h.violate(
                    "store_restarted",
                    f"/readyz still not ready {STORE_BACK_TIMEOUT:.0f} s after the SeaweedFS child was killed",
                )
                raise AssertionError(self.h.failure_message())
        self.h.fault_active.clear()


def _verify(h: Harness, svc: Service, db_url: str) -> None:
    ctx = svc.context(db_url)
    try:
        rep = verify(ctx, hash_sample=3, seed=h.seed + h.step)
    finally:
        ctx.engine.dispose()
    if rep.errors:
        h.violate("gc_verify_clean", str([f.to_dict() for f in rep.errors]))


def test_processes_killed_under_load(tmp_path, db_url, reliability_seed, reliability_base: Path):
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    engine = db.make_engine(db_url)
    with db.session_scope(engine) as s:
        admin_key = auth.create_key(s, tenant="ops", role="admin", now=utcnow())[1]
    engine.dispose()
    svc = Service(tmp_path, db_url)
    why = svc.start()
    assert why is None, why

    def now() -> datetime:
        return utcnow()

    h = Harness(seed=reliability_seed, base_url=svc.url, admin_key=admin_key, now=now, margin=2.5, label=f"processes-{backend}")
    h.ttl_choices = [None, None, 4, 9, 3600]
    faults = Faults(h, svc, db_url)
    t0 = time.monotonic()
    try:
        with Client(svc.url, admin_key, hash_cache=False) as admin:
            upload_base_model(admin, BASE, reliability_base)
            upload_base_model(admin, UNUSED_BASE, reliability_base)
        h.setup_tenants()
        schedule = Schedule.draw(h.rng, ROUNDS, {"kill_serve": 1, "kill_store": 1, "collect": 4})
        bursts = {s for s in range(1, ROUNDS + 1) if h.rng.random() < 0.1}
        print(f"schedule: {schedule.steps}; bursts at {sorted(bursts)}", flush=True)
        for step in range(1, ROUNDS + 1):
            name = schedule.steps.get(step)
            op = partial(getattr(faults, name), *faults.plan(name)) if name else None
            h.run_round(op, burst=step in bursts, sample=4, settle=faults.recover)
            if name in ("kill_serve", "kill_store"):
                h.step += 1
                h.check_round(set(), sample=8)  # what was acknowledged before the kill is still there
            _verify(h, svc, db_url)
            h.end_step()
        deadline = time.monotonic() + 90
        while any(j.state not in ("succeeded", "failed", "cancelled") for j in h.jobs) and time.monotonic() < deadline:
            time.sleep(1.0)
            h.poll_jobs()
        h.step += 1
        for j in h.jobs:
            if j.state not in ("succeeded", "failed", "cancelled"):
                h.violate("export_terminates", f"job {j.job_id} of {j.source} still {j.state} after 90 s")
        h.check_all("final read-back")
        for _ in range(2):  # past grace: the collector may now delete every unreferenced blob
            time.sleep(3)
            faults.collect(0, 1.0)
        h.check_all("read-back after a full collection")
        r = subprocess.run([*CLI, "gc", "verify", "--direct"], env=svc.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            h.violate("gc_verify_clean", f"`weightstore gc verify` exited {r.returncode}: {r.stdout[-800:]} {r.stderr[-400:]}")
        print(h.describe() + f", serve started {svc.starts}x, in {time.monotonic() - t0:.0f} s", flush=True)
        h.finish()
    finally:
        h.close()
        svc.stop()
