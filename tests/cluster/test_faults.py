"""Faults on the production topology, one at a time, under load (issue 13, part 2).

One cluster (tests/cluster/harness.py: PostgreSQL, SeaweedFS 1 master + 3 volume servers with
replication 001 + filer + S3 gateway, HAProxy, 2 API replicas, 2 collectors, 2 export workers) is
started per module. Each test runs a few client threads saving small checkpoints through the load
balancer and reading acknowledged ones back, injects one fault, and asserts:

- what clients saw: only typed transient errors (``weightstore.errors.TransientError``), never a 5xx
  for a permanent error, never a raw transport error; a bounded stall (time from the fault to the
  first save that succeeds after it);
- what survives: every acknowledged commit downloads byte-identical, ``weightstore gc verify`` is
  clean, an export job has exactly one output.

The out-of-space test fills the store for good, so it runs last (tests run in file order).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.cluster.harness import Cluster, wait_for
from weightstore.client import Client
from weightstore.errors import TransientError, WeightstoreError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

THREADS = 3
STALL_BOUND_S = 30.0
"""Longest acceptable time from a fault to the first save that succeeds after it (clients retry)."""


def small_files(seed: int) -> dict[str, bytes]:
    """A tiny sampler checkpoint: a few KB of LoRA weights and their config, unique per seed."""
    from tests.helpers import sampler_files

    return sampler_files(seed)


@dataclass
class Outcome:
    op: str
    started: float
    ended: float
    ok: bool
    error: str = ""
    kind: str = ""  # "", "transient", "untyped", "5xx_permanent", "permanent"


@dataclass
class Load:
    """Client threads saving and re-reading small checkpoints through the load balancer."""

    cluster: Cluster
    key: str
    run_id: str
    seed_base: int
    acked: dict[str, dict[str, bytes]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def client(self) -> Client:
        return Client(self.cluster.lb_url, api_key=self.key, progress=False, timeout=60)

    def _record(self, op: str, started: float, exc: BaseException | None) -> None:
        out = Outcome(op, started, time.monotonic(), exc is None)
        if exc is not None:
            out.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            status = getattr(exc, "status_code", None)
            if isinstance(exc, TransientError):
                out.kind = "transient"
            elif isinstance(exc, WeightstoreError) and status is not None and status >= 500:
                out.kind = "5xx_permanent"
            elif isinstance(exc, WeightstoreError):
                out.kind = "permanent"
            else:
                out.kind = "untyped"
        with self.lock:
            self.outcomes.append(out)

    def _worker(self, n: int) -> None:
        rng = random.Random(self.seed_base + n)
        i = 0
        with self.client() as c:
            while not self.stop.is_set():
                i += 1
                # A steady trickle, not a flood: every acknowledged commit is re-read after each test.
                self.stop.wait(0.2)
                seed = self.seed_base * 1_000_000 + n * 100_000 + i
                if i % 3 == 0 and self.acked:
                    with self.lock:
                        path = rng.choice(sorted(self.acked))
                        want = self.acked[path]
                    started = time.monotonic()
                    try:
                        got = {f: c.read_file(path, f) for f in want}
                        assert got == want, f"{path}: bytes differ"
                        self._record("load", started, None)
                    except AssertionError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - every failure is classified and asserted on
                        self._record("load", started, exc)
                    continue
                files = small_files(seed)
                started = time.monotonic()
                try:
                    res = c.upload(self.run_id, "sampler", f"t{seed}", files)
                except Exception as exc:  # noqa: BLE001
                    self._record("save", started, exc)
                    continue
                with self.lock:
                    self.acked[res["tinker_path"]] = files
                self._record("save", started, None)

    def __enter__(self) -> Load:
        for n in range(THREADS):
            t = threading.Thread(target=self._worker, args=(n,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    # --- what clients saw --------------------------------------------------------------------
    def bad(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and o.kind != "transient"]

    def stall_after(self, t0: float) -> float:
        """Seconds from the fault to the end of the first successful save started after it."""
        oks = [o.ended for o in self.outcomes if o.ok and o.op == "save" and o.started >= t0]
        return (min(oks) - t0) if oks else float("inf")

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for o in self.outcomes:
            kinds[o.kind or "ok"] = kinds.get(o.kind or "ok", 0) + 1
        bad = "; ".join(sorted({o.error for o in self.bad()})[:5])
        return f"{len(self.acked)} acked, outcomes {kinds}; distinct bad errors: {bad}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        yield c


@pytest.fixture(scope="module")
def trainer(cluster: Cluster) -> tuple[str, str]:
    """(api key, run id) of a trainer of tenant ``cluster-a``."""
    admin = httpx.Client(base_url=cluster.lb_url, headers={"X-API-Key": cluster.admin_key}, timeout=30)
    r = admin.post("/v1/keys", json={"tenant": "cluster-a", "role": "trainer", "create_tenant": True})
    assert r.status_code in (200, 201), r.text
    key = r.json()["api_key"]
    with Client(cluster.lb_url, api_key=key, progress=False) as c:
        run_id = c.create_run("tiny-llama", lora_rank=4)["run_id"]
    return key, run_id


ACKED: dict[str, dict[str, bytes]] = {}
"""Every commit acknowledged in this module: each fault test re-checks all of them."""


def run_load(cluster: Cluster, trainer: tuple[str, str], seed: int) -> Load:
    return Load(cluster, trainer[0], trainer[1], seed)


def assert_survives(cluster: Cluster, trainer: tuple[str, str], load: Load) -> None:
    """Every acknowledged commit (this test's and the earlier ones') byte-identical; verify clean."""
    ACKED.update(load.acked)
    with Client(cluster.lb_url, api_key=trainer[0], progress=False) as c:
        for path, files in sorted(ACKED.items()):
            got = {}
            for f in files:
                for attempt in range(20):
                    try:
                        got[f] = c.read_file(path, f)
                        break
                    except TransientError:
                        time.sleep(0.5 + attempt * 0.1)
            assert got == files, f"{path}: acknowledged commit not byte-identical"
    verify = cluster.cli("gc", "verify", "--direct", "--format", "json", timeout=180)
    assert verify.returncode == 0, f"gc verify (rc {verify.returncode}):\n{verify.stdout[-3000:]}\n{verify.stderr[-3000:]}"
    report = json.loads(verify.stdout)
    assert [f for f in report["findings"] if f.get("severity") == "error"] == []


def assert_clients_saw_only_transients(load: Load) -> None:
    """No permanent error, no 5xx with a permanent code, no raw transport error (found 3 and 8)."""
    assert load.bad() == [], load.summary()


def test_cluster_serves_through_the_load_balancer(cluster: Cluster, trainer: tuple[str, str]) -> None:
    """issue 13, part 2: the topology is up: both replicas in the pool, saves and loads work, verify clean."""
    with run_load(cluster, trainer, 1) as load:
        time.sleep(4)
    assert len(load.acked) >= 3, load.summary()
    assert load.bad() == [], load.summary()
    assert cluster.api_ready("api-1") and cluster.api_ready("api-2")
    assert_survives(cluster, trainer, load)


def test_kill_api_replica(cluster: Cluster, trainer: tuple[str, str]) -> None:
    """issue 13, part 2: kill -9 of an API replica under load. Saves continue through the other
    replica within the stall bound; nothing acknowledged is lost. In-flight requests on the dead
    replica surface as typed transient errors (found 8, helper F: multi-URL client with retries)."""
    with run_load(cluster, trainer, 2) as load:
        time.sleep(2)
        t0 = time.monotonic()
        cluster.procs["api-1"].kill9()
        time.sleep(6)
        cluster.restart("api-1")
        wait_for("api-1 back", lambda: cluster.api_ready("api-1"), timeout=90)
        time.sleep(2)
    stall = load.stall_after(t0)
    assert stall < STALL_BOUND_S, load.summary()
    assert_survives(cluster, trainer, load)
    assert_clients_saw_only_transients(load)


def test_kill_volume_server(cluster: Cluster, trainer: tuple[str, str]) -> None:
    """issue 13, part 2: kill -9 of one of 3 volume servers (replication 001) under load, restart it
    after 8 s. Reads keep working from the other replica; writes may fail transiently; nothing lost."""
    with run_load(cluster, trainer, 3) as load:
        time.sleep(2)
        t0 = time.monotonic()
        cluster.procs["weed-volume-3"].kill9()
        time.sleep(8)
        cluster.start_volume("weed-volume-3")
        wait_for("volume server back", lambda: cluster.volume_servers_registered() == 3, timeout=60)
        time.sleep(2)
    stall = load.stall_after(t0)
    assert stall < STALL_BOUND_S, load.summary()
    assert_survives(cluster, trainer, load)
    assert_clients_saw_only_transients(load)


def _lease_holder_pid(cluster: Cluster) -> int | None:
    rows = cluster.catalog("SELECT owner FROM lease WHERE name = 'gc' AND expires_at > now()")
    if not rows:
        return None
    parts = str(rows[0][0]).split(":")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def test_kill_collector_holding_the_lease(cluster: Cluster, trainer: tuple[str, str]) -> None:
    """issue 13, part 2: kill -9 of the collector that holds the lease; the standby takes the lease
    within lease + interval; the dead one's run row does not stay ``running`` (found 6)."""
    pids = {cluster.procs[n].pid: n for n in ("collector-1", "collector-2")}
    holder: list[str] = []

    def held_by_ours() -> bool:
        pid = _lease_holder_pid(cluster)
        if pid in pids:
            holder[:] = [pids[pid]]
            return True
        return False

    with run_load(cluster, trainer, 4) as load:
        wait_for("a collector holding the lease", held_by_ours, timeout=60, interval=0.05)
        killed = holder[0]
        killed_pid = cluster.procs[killed].pid
        cluster.procs[killed].kill9()
        t0 = time.monotonic()
        other = "collector-2" if killed == "collector-1" else "collector-1"
        other_pid = cluster.procs[other].pid
        takeover = wait_for("standby takes the lease", lambda: _lease_holder_pid(cluster) == other_pid, timeout=60, interval=0.1)
    lease_s = 4 + 2  # LOCAL_OVERRIDES: gc lease 4 s, interval 2 s
    assert takeover < lease_s + 10, f"standby took {takeover:.1f} s"
    assert time.monotonic() - t0 < 60
    cluster.restart(killed)
    assert_survives(cluster, trainer, load)
    assert_clients_saw_only_transients(load)
    # found 6: the killed collector's run row is reclaimed by the one that took over.
    time.sleep(4)
    stale = cluster.catalog("SELECT id FROM gc_run WHERE state = 'running' AND owner LIKE %s", f"%:{killed_pid}:%")
    assert stale == [], f"issue 13 found 6: run row(s) of the killed collector still 'running': {stale}"


def test_kill_export_worker_mid_job(cluster: Cluster, trainer: tuple[str, str], tmp_path: Path) -> None:
    """issue 13, part 2: kill -9 of the export worker running a job (while it loads the conversion
    library: its first job); the other worker takes the job over after the lease and the job ends
    with exactly one output, downloadable byte-for-byte as its manifest says."""
    from tests.exportjobs.builders import adapter_files, build_base
    from weightstore_cli.exports import upload_base_model

    key, run_id = trainer
    with Client(cluster.lb_url, api_key=cluster.admin_key, progress=False, hash_cache=False) as admin:
        upload_base_model(admin, "tiny-llama", build_base(tmp_path / "tiny-llama"))
    with Client(cluster.lb_url, api_key=key, progress=False) as c:
        src = c.upload(run_id, "sampler", "export-src", adapter_files(7))["tinker_path"]
        ACKED[src] = adapter_files(7)
    http = httpx.Client(base_url=cluster.lb_url, headers={"X-API-Key": key}, timeout=30)
    r = http.post("/v1/exports", json={"source": src, "target": "peft", "output_name": "exported-once"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"] if "job_id" in r.json() else r.json()["id"]
    owner: list[str] = []

    def running() -> bool:
        rows = cluster.catalog("SELECT state, lease_owner FROM export_job WHERE id = %s", job_id)
        if rows and rows[0][0] == "running" and rows[0][1]:
            owner[:] = [rows[0][1]]
            return True
        return bool(rows and rows[0][0] in ("succeeded", "failed"))

    wait_for("the job claimed", running, timeout=60, interval=0.02)
    assert owner, "the job finished before a worker could be killed mid-job"
    victim = owner[0]
    cluster.procs[victim].kill9()
    t0 = time.monotonic()

    def finished() -> bool:
        return http.get(f"/v1/exports/{job_id}").json()["state"] in ("succeeded", "failed", "cancelled")

    wait_for("the job finished by the other worker", finished, timeout=120, interval=0.5)
    took_over = time.monotonic() - t0
    job = http.get(f"/v1/exports/{job_id}").json()
    assert job["state"] == "succeeded", job
    rows = cluster.catalog("SELECT lease_owner, attempts FROM export_job WHERE id = %s", job_id)
    assert rows[0][1] >= 2, f"expected a second attempt after the kill: {rows}"
    result = job["result"]
    assert result and result == job["output_path"], job
    run_of_output, _, tail = result.removeprefix("tinker://").partition("/")
    name = tail.rpartition("/")[2]
    with Client(cluster.lb_url, api_key=key, progress=False) as c:
        listed = c.list_checkpoints(run_id=run_of_output, limit=1000)["checkpoints"]
        outs = [ck for ck in listed if ck["tinker_path"].rsplit("/", 1)[-1] == name]
        assert [ck["tinker_path"] for ck in outs] == [result], f"exactly one output expected: {outs}"
        manifest = c.file_urls(result)["files"]
        assert manifest
        for f in manifest:
            data = c.read_file(result, f["path"])
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
    cluster.restart(victim)
    assert took_over < 4 + 30, f"takeover took {took_over:.1f} s"
    verify = cluster.cli("gc", "verify", "--direct", "--format", "json", timeout=180)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]


def test_postgres_restart(cluster: Cluster, trainer: tuple[str, str]) -> None:
    """issue 13, part 2 (found 3): PostgreSQL stopped for 5 s under load. Clients see only typed
    transient errors (503 catalog_unavailable + Retry-After, never 500); service resumes by itself."""
    with run_load(cluster, trainer, 5) as load:
        time.sleep(2)
        t0 = time.monotonic()
        cluster.restart_postgres(down_seconds=5)
        time.sleep(6)
    stall = load.stall_after(t0)
    assert stall < STALL_BOUND_S, load.summary()
    wait_for("replicas ready again", lambda: cluster.api_ready("api-1") and cluster.api_ready("api-2"), timeout=60)
    for name in ("collector-1", "collector-2", "export-1", "export-2"):
        assert cluster.procs[name].alive, f"{name} died with the catalog:\n{cluster.logs(name)}"
    assert_survives(cluster, trainer, load)
    assert_clients_saw_only_transients(load)


def _fill_store(cluster: Cluster, budget_s: float = 90.0) -> int:
    """Write 4 MiB objects into a filler bucket until the store refuses; returns bytes written."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        aws_access_key_id=cluster._s3_access,
        aws_secret_access_key=cluster._s3_secret,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": 1},
            connect_timeout=5,
            read_timeout=15,
        ),
    )
    blob = random.Random(0).randbytes(4 * 1024 * 1024)
    written, refusals, deadline = 0, 0, time.monotonic() + budget_s
    while time.monotonic() < deadline:
        try:
            # Into the service's own bucket (its own SeaweedFS collection, whose volumes must fill up);
            # a prefix the service never writes.
            s3.put_object(Bucket="weightstore", Key=f"filler/f{written}", Body=blob)
            written += len(blob)
            refusals = 0
        except Exception:  # noqa: BLE001 - the store refusing writes is the point
            refusals += 1
            if refusals >= 3:
                return written
    raise AssertionError(f"store still accepts writes after {written} bytes")


def test_s3_out_of_space(cluster: Cluster, trainer: tuple[str, str]) -> None:
    """issue 13, part 2 (found 7): the S3 cluster runs out of writable volumes. Saves fail with a
    typed transient error within a bounded time (never 500), /readyz turns 503 on every replica so
    operators notice, and every acknowledged commit stays readable through the load balancer (which
    falls back to live replicas when none is ready: deploy/haproxy.cfg, backend api_live)."""
    key, run_id = trainer
    filled = _fill_store(cluster)
    assert filled > 0
    saw: list[tuple[str, float]] = []
    with Client(cluster.lb_url, api_key=key, progress=False, timeout=60) as c:
        for i in range(3):
            started = time.monotonic()
            try:
                c.upload(run_id, "sampler", f"full-{i}", small_files(900_000 + i))
                saw.append(("ok", time.monotonic() - started))
            except TransientError as exc:
                saw.append((f"transient {type(exc).__name__}", time.monotonic() - started))
            except Exception as exc:  # noqa: BLE001
                saw.append((f"bad {type(exc).__name__}: {str(exc)[:120]}", time.monotonic() - started))
    assert not any(s.startswith("bad") for s in (w for w, _ in saw)), saw
    assert any(w.startswith("transient") for w, _ in saw), f"the store still took saves after {filled} bytes: {saw}"
    assert all(t < 60 for _, t in saw), saw
    # Reads do not need writable volumes.
    assert_survives(cluster, trainer, Load(cluster, key, run_id, 0))
    # Operators and the load balancer see it: /readyz names the refused writes (found 7). HAProxy then
    # falls back to its liveness-checked backend, which is how the reads above got through.
    ready = [httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=30) for p in cluster.api_ports.values()]
    assert [r.status_code for r in ready] == [503, 503], [r.text for r in ready]
    assert all("object_store_write" in r.text for r in ready), [r.text for r in ready]
