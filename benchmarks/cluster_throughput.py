"""Metadata throughput through 1, 2 and 3 API replicas on PostgreSQL (issue 13, benchmarks).

Starts the tests/cluster topology, adds a third replica, then for N = 1, 2, 3 replicas runs THREADS
client threads for SECONDS each, thread i talking to replica i mod N directly (what HAProxy's
leastconn does, without its hop), measuring:

- declare + commit of small checkpoints whose bytes the store already has (dedup: the declare answers
  "nothing to send", so each save is two catalog transactions and no object-store transfer);
- lists (``GET /v1/checkpoints?limit=100``).

Beside each figure: the CPU seconds per wall second spent by the API replicas, PostgreSQL and this
client process (the machine has 2 cores: where their sum reaches ~2, the machine is the limit, not
the number of replicas). Run: ``python -m benchmarks.cluster_throughput`` (prints a Markdown section).
"""

from __future__ import annotations

import os
import threading
import time

from benchmarks.cluster_common import cpu_seconds, postgres_pids, trainer
from tests.cluster.harness import Cluster, free_port, wait_for
from tests.helpers import sampler_files
from weightstore.client import Client

THREADS = 6
SECONDS = 10.0


def measure(cluster: Cluster, key: str, run_id: str, replicas: list[str], op: str) -> tuple[float, dict[str, float]]:
    files = sampler_files(42)
    count = [0] * THREADS
    errors = [0] * THREADS
    stop = threading.Event()

    def worker(n: int) -> None:
        url = f"http://127.0.0.1:{cluster.api_ports[replicas[n % len(replicas)]]}"
        with Client(url, api_key=key, progress=False, timeout=60, hash_cache=True) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if op == "save":
                        c.upload(run_id, "sampler", f"tp-{len(replicas)}-{n}-{i}-{time.monotonic_ns()}", files)
                    else:
                        c.list_checkpoints(run_id=run_id, limit=100)
                    count[n] += 1
                except Exception:  # noqa: BLE001 - counted, reported
                    errors[n] += 1

    api_pids = [p for p in (cluster.procs[r].pid for r in cluster.api_ports) if p]
    pg = postgres_pids()
    before = {
        "api": sum(cpu_seconds(p) for p in api_pids),
        "postgres": sum(cpu_seconds(p) for p in pg),
        "client": sum(os.times()[:2]),
    }
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join(60)
    wall = time.monotonic() - t0
    after = {
        "api": sum(cpu_seconds(p) for p in api_pids),
        "postgres": sum(cpu_seconds(p) for p in postgres_pids()),
        "client": sum(os.times()[:2]),
    }
    cpu = {k: (after[k] - before[k]) / wall for k in before}
    cpu["errors"] = float(sum(errors))
    return sum(count) / wall, cpu


def main() -> None:
    with Cluster() as cluster:
        cluster.api_ports["api-3"] = free_port()
        cluster.start_api("api-3")
        wait_for("api-3 ready", lambda: cluster.api_ready("api-3"), timeout=90)
        key, run_id = trainer(cluster)
        with Client(cluster.lb_url, api_key=key, progress=False) as c:  # the bytes, once
            c.upload(run_id, "sampler", "tp-seed", sampler_files(42))
        rows = []
        for op in ("save", "list"):
            base = None
            for n in (1, 2, 3):
                rate, cpu = measure(cluster, key, run_id, [f"api-{i}" for i in range(1, n + 1)], op)
                base = base or rate
                rows.append((op, n, rate, rate / base, cpu))
    print("## Metadata throughput through 1 / 2 / 3 API replicas (PostgreSQL, 2-core machine)\n")
    print(f"{THREADS} client threads, {SECONDS:.0f} s per cell; CPU = cores busy (CPU seconds per wall second).\n")
    print("| operation | replicas | ops/s | vs 1 replica | CPU api | CPU postgres | CPU client | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for op, n, rate, ratio, cpu in rows:
        label = "declare+commit (dedup, no transfer)" if op == "save" else "list 100 checkpoints"
        print(
            f"| {label} | {n} | {rate:.1f} | {ratio:.2f}x | {cpu['api']:.2f} | {cpu['postgres']:.2f} | "
            f"{cpu['client']:.2f} | {cpu['errors']:.0f} |"
        )


if __name__ == "__main__":
    main()
