"""Shared helpers of the cluster benchmarks (cluster_failover, cluster_throughput): a started
tests/cluster harness with a trainer key and run, and per-process CPU accounting."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.cluster.harness import Cluster
from weightstore.client import Client


def trainer(cluster: Cluster, tenant: str = "bench") -> tuple[str, str]:
    """(api key, run id) of a new trainer of ``tenant``."""
    admin = httpx.Client(base_url=cluster.lb_url, headers={"X-API-Key": cluster.admin_key}, timeout=30)
    r = admin.post("/v1/keys", json={"tenant": tenant, "role": "trainer", "create_tenant": True})
    r.raise_for_status()
    key = str(r.json()["api_key"])
    with Client(cluster.lb_url, api_key=key, progress=False) as c:
        run_id = str(c.create_run("tiny-llama", lora_rank=4)["run_id"])
    return key, run_id


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
