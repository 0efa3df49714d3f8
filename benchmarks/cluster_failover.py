"""Cluster failover (issue 13, benchmarks): client-visible stall when an API replica is killed, and
the time a standby collector / export worker needs to take over.

Starts the tests/cluster topology (HAProxy, 2 API replicas, 2 collectors, 2 export workers, SeaweedFS
cluster, PostgreSQL) and, under a load of small saves through the load balancer:

- kills an API replica (``kill -9``) REPS times, alternating replicas; stall = seconds from the kill to
  the end of the first save that started after it and succeeded; also the number of failed ops;
- kills the collector holding the lease REPS times: seconds until the standby holds it;
- kills the export worker running a job REPS times: seconds until the job is running under the other.

The harness shortens leases (gc 4 s + interval 2 s, worker 4 s; tests/cluster/harness.LOCAL_OVERRIDES);
takeover scales with them: the figure to expect with the defaults is lease + the measured overhead.
Run: ``python -m benchmarks.cluster_failover`` (prints a Markdown section).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.cluster_common import trainer
from tests.cluster.harness import LOCAL_OVERRIDES, Cluster, wait_for
from tests.helpers import sampler_files
from weightstore.client import Client

REPS = 5
THREADS = 3


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def replica_stalls(cluster: Cluster, key: str, run_id: str) -> tuple[list[float], int, int]:
    outcomes: list[tuple[float, float, bool]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n: int) -> None:
        i = 0
        with Client(cluster.lb_url, api_key=key, progress=False, timeout=60) as c:
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    c.upload(run_id, "sampler", f"fo-{n}-{i}", sampler_files(n * 1_000_000 + i))
                    ok = True
                except Exception:  # noqa: BLE001 - counted
                    ok = False
                with lock:
                    outcomes.append((started, time.monotonic(), ok))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    for t in threads:
        t.start()
    stalls = []
    try:
        for rep in range(REPS):
            time.sleep(2)
            name = f"api-{rep % 2 + 1}"
            t0 = time.monotonic()
            cluster.procs[name].kill9()
            time.sleep(5)
            with lock:
                oks = [end for start, end, ok in outcomes if ok and start >= t0]
            stalls.append((min(oks) - t0) if oks else float("inf"))
            cluster.restart(name)
            wait_for(f"{name} back", lambda name=name: cluster.api_ready(name), timeout=90)
            time.sleep(3)  # HAProxy: rise 2 x inter 1 s
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return stalls, sum(1 for *_, ok in outcomes if not ok), len(outcomes)


def collector_takeovers(cluster: Cluster) -> list[float]:
    out = []
    for _ in range(REPS):
        pids = {cluster.procs[n].pid: n for n in ("collector-1", "collector-2")}
        holder: list[str] = []

        def held(pids: dict[int | None, str] = pids, holder: list[str] = holder) -> bool:
            rows = cluster.catalog("SELECT owner FROM lease WHERE name = 'gc' AND expires_at > now()")
            if rows:
                pid = int(str(rows[0][0]).split(":")[1])
                if pid in pids:
                    holder[:] = [pids[pid]]
                    return True
            return False

        wait_for("lease held", held, timeout=60, interval=0.05)
        killed = holder[0]
        other_pid = cluster.procs["collector-2" if killed == "collector-1" else "collector-1"].pid
        cluster.procs[killed].kill9()
        t0 = time.monotonic()

        def taken(other_pid: int | None = other_pid) -> bool:
            rows = cluster.catalog("SELECT owner FROM lease WHERE name = 'gc' AND expires_at > now()")
            return bool(rows) and int(str(rows[0][0]).split(":")[1]) == other_pid

        wait_for("standby holds the lease", taken, timeout=120, interval=0.05)
        out.append(time.monotonic() - t0)
        cluster.restart(killed)
        time.sleep(2)
    return out


def export_takeovers(cluster: Cluster, key: str, run_id: str) -> list[float]:
    import httpx

    from tests.exportjobs.builders import adapter_files, build_base
    from weightstore_cli.exports import upload_base_model

    with Client(cluster.lb_url, api_key=cluster.admin_key, progress=False, hash_cache=False) as admin:
        upload_base_model(admin, "tiny-llama", build_base(Path(tempfile.mkdtemp()) / "tiny-llama"))
    http = httpx.Client(base_url=cluster.lb_url, headers={"X-API-Key": key}, timeout=30)
    out = []
    with Client(cluster.lb_url, api_key=key, progress=False) as c:
        for rep in range(REPS):
            src = c.upload(run_id, "sampler", f"exp-src-{rep}", adapter_files(100 + rep))["tinker_path"]
            job_id = http.post("/v1/exports", json={"source": src, "target": "peft"}).json()["job_id"]
            owner: list[str] = []

            def running(job_id: str = job_id, owner: list[str] = owner) -> bool:
                rows = cluster.catalog("SELECT state, lease_owner FROM export_job WHERE id = %s", job_id)
                if rows and rows[0][0] == "running" and rows[0][1]:
                    owner[:] = [rows[0][1]]
                    return True
                return False

            wait_for("claimed", running, timeout=60, interval=0.01)
            victim = owner[0]
            cluster.procs[victim].kill9()
            t0 = time.monotonic()

            def retaken(job_id: str = job_id, victim: str = victim) -> bool:
                rows = cluster.catalog("SELECT state, lease_owner FROM export_job WHERE id = %s", job_id)
                return bool(rows) and (rows[0][0] == "succeeded" or (rows[0][0] == "running" and rows[0][1] != victim))

            wait_for("retaken", retaken, timeout=120, interval=0.05)
            out.append(time.monotonic() - t0)
            cluster.restart(victim)
            wait_for("done", lambda job_id=job_id: http.get(f"/v1/exports/{job_id}").json()["state"] == "succeeded", 120, 0.5)
    return out


def main() -> None:
    with Cluster() as cluster:
        key, run_id = trainer(cluster)
        stalls, failed, total = replica_stalls(cluster, key, run_id)
        collectors = collector_takeovers(cluster)
        exports = export_takeovers(cluster, key, run_id)
    gc_lease = int(LOCAL_OVERRIDES["WEIGHTSTORE_GC_LEASE_SECONDS"])
    gc_interval = int(LOCAL_OVERRIDES["WEIGHTSTORE_GC_INTERVAL_SECONDS"])
    worker_lease = int(LOCAL_OVERRIDES["WEIGHTSTORE_WORKER_LEASE_SECONDS"])
    print("## Cluster failover (tests/cluster topology, processes on one 2-core machine)\n")
    print(f"{REPS} repetitions each, under {THREADS} client threads saving small checkpoints through HAProxy.\n")
    print("| event | p50 | p99 (max of runs) | n |")
    print("|---|---|---|---|")
    p50, p99 = statistics.median(stalls), pct(stalls, 99)
    print(f"| save stall after `kill -9` of an API replica | {p50:.2f} s | {p99:.2f} s | {len(stalls)} |")
    print(
        f"| standby collector holds the lease (lease {gc_lease} s, interval {gc_interval} s) | "
        f"{statistics.median(collectors):.2f} s | {pct(collectors, 99):.2f} s | {len(collectors)} |"
    )
    print(
        f"| export job retaken by the other worker (lease {worker_lease} s) | "
        f"{statistics.median(exports):.2f} s | {pct(exports, 99):.2f} s | {len(exports)} |"
    )
    print(f"\n{failed} of {total} saves failed during the replica kills (each failure a typed error the client may retry).")
    print(
        "Takeover is bounded by the lease: with the defaults (WEIGHTSTORE_GC_LEASE_SECONDS=120, "
        "WEIGHTSTORE_WORKER_LEASE_SECONDS=120) expect about the lease plus the overhead measured above "
        f"beyond {gc_lease} s / {worker_lease} s."
    )


if __name__ == "__main__":
    main()
