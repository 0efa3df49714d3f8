"""The production topology of ``deploy/compose.yaml`` started as local processes (issue 13, part 2).

There is no container runtime on the CI machine, so this module starts the same services the Compose
file names, as processes on 127.0.0.1, from the same environment file (``deploy/env.example``):

- PostgreSQL (``tests.support.localpg``), a throw-away cluster;
- SeaweedFS: 1 master (``-defaultReplication=001``), 3 volume servers in one rack, a filer and the S3
  gateway with authentication on (an identities file, as compose.yaml mounts);
- the one-shot migrate step (``weightstore admin bootstrap`` where it exists, else ``weightstore migrate``);
- 2 API replicas (``weightstore serve``) behind HAProxy (``deploy/haproxy.cfg``, the file compose uses;
  its addresses come from environment variables);
- 2 collectors (``weightstore gc worker``) and 2 export workers (``weightstore worker``).

Only what must differ between containers and processes is overridden, in :data:`LOCAL_OVERRIDES`
(timings shortened so faults play out in seconds) and in :meth:`Cluster.base_env` (addresses).

``python -m tests.cluster.harness`` (what ``make cluster`` runs) starts it in the foreground and prints
how to use it. Tests use :class:`Cluster` as a context manager (``tests/cluster/test_faults.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.localpg import LocalPostgres
from weightstore.embedded import ensure_bucket, weed_binary

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
WEIGHTSTORE = str(Path(sys.executable).parent / "weightstore")

API_REPLICAS = 2
COLLECTORS = 2
EXPORT_WORKERS = 2
VOLUME_SERVERS = 3

LOCAL_OVERRIDES: dict[str, str] = {
    # Faults must play out in seconds, not the production minutes: a standby collector or export
    # worker takes over once the holder's lease expires.
    "WEIGHTSTORE_GC_INTERVAL_SECONDS": "2",
    "WEIGHTSTORE_GC_LEASE_SECONDS": "4",
    "WEIGHTSTORE_WORKER_LEASE_SECONDS": "4",
    # Nothing the tests store expires; a long grace keeps the collector away from in-flight saves.
    "WEIGHTSTORE_GC_GRACE_SECONDS": "3600",
    "WEIGHTSTORE_LOG_JSON": "false",
    "WEIGHTSTORE_LOG_LEVEL": "WARNING",
    "WEIGHTSTORE_COOKIE_SECURE": "false",
    # A store that stops accepting writes leaves the load balancer's pool within seconds.
    "WEIGHTSTORE_READINESS_WRITE_PROBE_SECONDS": "2",
}
"""The only settings the local cluster changes from deploy/env.example besides addresses and secrets."""


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """The uncommented ``KEY=VALUE`` lines of an env file (docker compose's ``env_file`` syntax)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not KEY=VALUE: {line!r}")
        env[key.strip()] = value.strip()
    return env


def free_port_pair() -> int:
    """A free port P whose gRPC companion P+10000 (SeaweedFS convention) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2) -> float:
    """Poll ``probe`` until it returns true; returns the seconds waited, raises TimeoutError."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if probe():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    return httpx.get(url, timeout=timeout).status_code == 200


@dataclass
class Proc:
    """One service process: how to start it again, and its log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            out.close()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def kill9(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    """The whole topology on this machine. ``start()`` returns once the load balancer answers ready."""

    base_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ws-cluster-")))
    volume_size_limit_mb: int = 16
    """The master's -volumeSizeLimitMB: small, so that the out-of-space fault is a few dozen MB away."""
    volume_max: int = 6
    """Each volume server's -max volume count (3 servers x 6 slots, replication 001: 9 logical volumes)."""
    procs: dict[str, Proc] = field(default_factory=dict)
    admin_key: str = ""
    lb_url: str = ""
    s3_endpoint: str = ""
    pg: LocalPostgres | None = None
    database_url: str = ""
    bootstrap_command: str = ""
    api_ports: dict[str, int] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)

    # --- environment ---------------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        """deploy/env.example + LOCAL_OVERRIDES + this machine's addresses and fresh secrets."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTSTORE_", "AWS_", "WEED_", "PG"))}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        env.update(read_env_file())
        env.update(LOCAL_OVERRIDES)
        env.update(
            {
                "WEIGHTSTORE_DATABASE_URL": self.database_url,
                "WEIGHTSTORE_S3_ENDPOINT_URL": self.s3_endpoint,
                "WEIGHTSTORE_S3_PUBLIC_ENDPOINT": self.s3_endpoint,
                "WEIGHTSTORE_S3_ACCESS_KEY_ID": self._s3_access,
                "WEIGHTSTORE_S3_SECRET_ACCESS_KEY": self._s3_secret,
                "WEIGHTSTORE_SESSION_SECRET": self._session_secret,
                "WEIGHTSTORE_INITIAL_ADMIN_KEY": self._initial_key,
                "WEIGHTSTORE_HOST": "127.0.0.1",
                "WEIGHTSTORE_PUBLIC_URL": self.lb_url,
                "WEIGHTSTORE_DATA_DIR": str(self.base_dir / "data"),
            }
        )
        leftover = sorted(k for k, v in env.items() if "CHANGE_ME" in v)
        if leftover:
            raise RuntimeError(f"harness left placeholders from env.example: {leftover}")
        return env

    def _add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.base_dir / "logs" / f"{name}.log"
        proc = Proc(name, argv, env if env is not None else self.base_env(), log, self.base_dir)
        self.procs[name] = proc
        proc.start()
        return proc

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Cluster:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._s3_access = "WSCLUSTER" + secrets.token_hex(6).upper()
        self._s3_secret = secrets.token_urlsafe(30)
        self._session_secret = secrets.token_urlsafe(48)
        self._initial_key = "tml-" + secrets.token_urlsafe(32)
        self.lb_port = free_port()
        self.lb_url = f"http://127.0.0.1:{self.lb_port}"
        try:
            self._start_postgres()
            self._start_seaweedfs()
            self._migrate()
            self._start_api()
            self._start_lb()
            self._start_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_postgres(self) -> None:
        self.pg = LocalPostgres()
        self.pg.start()
        self.database_url = self.pg.create_database("weightstore")

    def weed_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_", "WEIGHTSTORE_"))}
        env["HOME"] = str(self.base_dir / "weed")
        return env

    def _weed(self, name: str, *args: str) -> Proc:
        logdir = self.base_dir / "weed" / "logs" / name
        logdir.mkdir(parents=True, exist_ok=True)
        return self._add(name, [str(weed_binary()), f"-logdir={logdir}", *args], self.weed_env())

    def _start_seaweedfs(self) -> None:
        weed_dir = self.base_dir / "weed"
        (weed_dir / "master").mkdir(parents=True, exist_ok=True)
        self.master_port = free_port_pair()
        self._weed(
            "weed-master",
            "master",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-port={self.master_port}",
            f"-mdir={weed_dir / 'master'}",
            "-defaultReplication=001",
            f"-volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-telemetry=false",
            "-peers=none",
        )
        wait_for("weed master", lambda: http_ok(f"http://127.0.0.1:{self.master_port}/cluster/status"))
        self.volume_ports: dict[str, int] = {}
        for i in range(1, VOLUME_SERVERS + 1):
            self.volume_ports[f"weed-volume-{i}"] = free_port_pair()
            self.start_volume(f"weed-volume-{i}")
        for name, port in self.volume_ports.items():
            wait_for(name, lambda port=port: http_ok(f"http://127.0.0.1:{port}/status"))
        wait_for("3 volume servers registered", lambda: self.volume_servers_registered() == VOLUME_SERVERS)
        self.filer_port = free_port_pair()
        (weed_dir / "filer").mkdir(parents=True, exist_ok=True)
        self._weed(
            "weed-filer",
            "filer",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-port={self.filer_port}",
            f"-master=127.0.0.1:{self.master_port}",
            f"-defaultStoreDir={weed_dir / 'filer'}",
            f"-localSocket={weed_dir / 'filer.sock'}",
        )
        wait_for("weed filer", lambda: httpx.get(f"http://127.0.0.1:{self.filer_port}/", timeout=2).status_code < 500)
        identities = weed_dir / "s3-identities.json"
        fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "weightstore",
                            "credentials": [{"accessKey": self._s3_access, "secretKey": self._s3_secret}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                },
                fh,
            )
        self.s3_port = free_port_pair()
        self._weed(
            "weed-s3",
            "s3",
            "-ip.bind=127.0.0.1",
            f"-port={self.s3_port}",
            f"-filer=127.0.0.1:{self.filer_port}",
            f"-config={identities}",
            "-port.iceberg=0",
            "-port.lance=0",
            f"-localSocket={weed_dir / 's3.sock'}",
        )
        self.s3_endpoint = f"http://127.0.0.1:{self.s3_port}"
        wait_for("weed s3", lambda: http_ok(f"{self.s3_endpoint}/healthz"))

    def start_volume(self, name: str) -> Proc:
        """(Re)start a volume server on its own port and directory (the data survives a kill)."""
        port = self.volume_ports[name]
        vdir = self.base_dir / "weed" / name
        vdir.mkdir(parents=True, exist_ok=True)
        return self._weed(
            name,
            "volume",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-port={port}",
            f"-dir={vdir}",
            f"-max={self.volume_max}",
            f"-master=127.0.0.1:{self.master_port}",
            "-dataCenter=dc1",
            "-rack=rack1",
            "-minFreeSpace=1",
        )

    def volume_servers_registered(self) -> int:
        topo = httpx.get(f"http://127.0.0.1:{self.master_port}/dir/status", timeout=2).json()["Topology"]
        return sum(len(rack.get("DataNodes") or []) for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or [])

    def weed_shell(self, commands: str, timeout: float = 60) -> str:
        """Run ``weed shell`` commands against the master (e.g. ``volume.fix.replication -apply``)."""
        out = subprocess.run(
            [str(weed_binary()), "shell", f"-master=127.0.0.1:{self.master_port}", f"-filer=127.0.0.1:{self.filer_port}"],
            input=f"lock\n{commands}\nunlock\nexit\n",
            capture_output=True,
            text=True,
            env=self.weed_env(),
            timeout=timeout,
            check=False,
        )
        return out.stdout + out.stderr

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``weightstore ARGS`` with the cluster's environment (direct catalog and store access)."""
        return subprocess.run(
            [WEIGHTSTORE, *args],
            env=env or self.base_env(),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _migrate(self) -> None:
        """compose.yaml's one-shot ``migrate`` service: ``weightstore admin bootstrap`` (helper D, issue 13
        found 1/2/9) when this tree has it; before that, ``weightstore migrate`` and the bucket here."""
        has_bootstrap = self.cli("admin", "bootstrap", "--help", timeout=60).returncode == 0
        if has_bootstrap:
            self.bootstrap_command = "weightstore admin bootstrap"
            done = self.cli("admin", "bootstrap", timeout=120)
        else:
            self.bootstrap_command = "weightstore migrate"
            ensure_bucket(self.s3_endpoint, self._s3_access, self._s3_secret, "weightstore")
            done = self.cli("migrate", timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{self.bootstrap_command} failed (rc={done.returncode}):\n{done.stdout}\n{done.stderr}")

    def api_env(self, name: str) -> dict[str, str]:
        return {**self.base_env(), "WEIGHTSTORE_PORT": str(self.api_ports[name])}

    def start_api(self, name: str) -> Proc:
        return self._add(name, [WEIGHTSTORE, "serve"], self.api_env(name))

    def api_ready(self, name: str) -> bool:
        return http_ok(f"http://127.0.0.1:{self.api_ports[name]}/readyz")

    def _start_api(self) -> None:
        for i in range(1, API_REPLICAS + 1):
            self.api_ports[f"api-{i}"] = free_port()
        # The first replica alone first: before `weightstore admin bootstrap` (helper D) two replicas
        # starting at once on a fresh catalog race on the first admin key (issue 13, found 1).
        self.start_api("api-1")
        wait_for("api-1 ready", lambda: self.api_ready("api-1"), timeout=90)
        self.admin_key = self._find_admin_key()
        for i in range(2, API_REPLICAS + 1):
            self.start_api(f"api-{i}")
        for i in range(2, API_REPLICAS + 1):
            wait_for(f"api-{i} ready", lambda i=i: self.api_ready(f"api-{i}"), timeout=90)

    def _find_admin_key(self) -> str:
        """WEIGHTSTORE_INITIAL_ADMIN_KEY when the tree honours it (helper D); else the key that the
        first replica printed on stderr (issue 13, found 2: the only way before D's fix)."""
        url = f"http://127.0.0.1:{self.api_ports['api-1']}/v1/keys"
        if httpx.get(url, headers={"X-API-Key": self._initial_key}, timeout=10).status_code == 200:
            return self._initial_key
        match = re.search(r"bootstrap admin key \(shown once\): (tml-\S+)", self.procs["api-1"].log.read_text())
        if match is None:
            raise RuntimeError("no admin key: neither WEIGHTSTORE_INITIAL_ADMIN_KEY nor one printed by api-1")
        return match.group(1)

    def _start_lb(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise RuntimeError("haproxy is not installed (make sysdeps installs it)")
        env = {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")},
            "WS_LB_BIND": f"127.0.0.1:{self.lb_port}",
            "WS_API_1": f"127.0.0.1:{self.api_ports['api-1']}",
            "WS_API_2": f"127.0.0.1:{self.api_ports['api-2']}",
        }
        self._add("haproxy", [haproxy, "-W", "-db", "-f", str(HAPROXY_CFG)], env)
        wait_for("load balancer", lambda: http_ok(f"{self.lb_url}/readyz"))

    def _start_workers(self) -> None:
        for i in range(1, COLLECTORS + 1):
            self.health_ports[f"collector-{i}"] = free_port()
            self._add(f"collector-{i}", [WEIGHTSTORE, "gc", "worker"], self.worker_env(f"collector-{i}"))
        for i in range(1, EXPORT_WORKERS + 1):
            self.health_ports[f"export-{i}"] = free_port()
            argv = [WEIGHTSTORE, "worker", "--poll", "0.5", "--owner", f"export-{i}"]
            self._add(f"export-{i}", argv, self.worker_env(f"export-{i}"))

    def worker_env(self, name: str) -> dict[str, str]:
        """A collector's or export worker's environment: /healthz, /readyz, /metrics on its own port."""
        return {**self.base_env(), "WEIGHTSTORE_HEALTH_PORT": str(self.health_ports[name])}

    def restart(self, name: str) -> Proc:
        """Start a stopped or killed service again with the same command line and environment."""
        proc = self.procs[name]
        proc.stop()
        proc.start()
        return proc

    def restart_postgres(self, down_seconds: float = 3.0) -> None:
        """Stop PostgreSQL (fast shutdown: every connection is cut), keep it down, start it on the same port."""
        pg = self.pg
        assert pg is not None and pg.port is not None
        ctl = [str(Path(pg._bin("pg_ctl"))), "-D", str(pg.data_dir)]
        stopped = pg._run([*ctl, "-m", "fast", "-w", "stop"], timeout=60)
        if stopped.returncode != 0:
            raise RuntimeError(f"pg_ctl stop: {stopped.stderr}")
        time.sleep(down_seconds)
        started = pg._run([*ctl, "-l", str(pg.log_file), "-o", f"-p {pg.port}", "-w", "start"], timeout=60)
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start: {started.stderr}")

    def catalog(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a read-only query on the catalog (fault tests find lease holders with it)."""
        assert self.pg is not None
        with self.pg.connect("weightstore") as conn:
            return list(conn.execute(query, params).fetchall())

    def stop(self) -> None:
        # SIGTERM to everything first, then wait: SeaweedFS components take seconds each to exit.
        procs = list(reversed(list(self.procs.values())))
        for proc in procs:
            if proc.popen is not None and proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in procs:
            if proc.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(max(0.1, deadline - time.monotonic()))
            proc.kill9()
        if self.pg is not None:
            self.pg.stop()
        if os.environ.get("WEIGHTSTORE_CLUSTER_KEEP") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, *names: str, lines: int = 20) -> str:
        return "\n".join(f"--- {n} ---\n{self.procs[n].tail(lines)}" for n in names or self.procs)

    def usage(self) -> str:
        lines = [
            "weightstore cluster is up (issue 13 topology: PostgreSQL, SeaweedFS 1 master + 3 volume servers",
            f"replication 001 + filer + S3 gateway, HAProxy, {API_REPLICAS} API replicas, {COLLECTORS} collectors,"
            f" {EXPORT_WORKERS} export workers).",
            "",
            f"  export WEIGHTSTORE_URL={self.lb_url}",
            f"  export WEIGHTSTORE_API_KEY={self.admin_key}",
            "  weightstore keys create --tenant demo --create-tenant --role trainer",
            "",
            f"  API replicas:  {', '.join(f'{n} http://127.0.0.1:{p}' for n, p in self.api_ports.items())}",
            f"  S3 gateway:    {self.s3_endpoint} (access key {self._s3_access})",
            f"  workers:       {', '.join(f'{n} http://127.0.0.1:{p}/healthz' for n, p in self.health_ports.items())}",
            f"  SeaweedFS:     master http://127.0.0.1:{self.master_port}, filer http://127.0.0.1:{self.filer_port}",
            f"  catalog:       {self.database_url}",
            f"  migrate step:  {self.bootstrap_command}",
            f"  logs:          {self.base_dir / 'logs'}",
            "",
            "Ctrl-C stops every process and deletes the data (WEIGHTSTORE_CLUSTER_KEEP=1 keeps it).",
        ]
        return "\n".join(lines)


@contextlib.contextmanager
def running_cluster(**kw: Any) -> Iterator[Cluster]:
    cluster = Cluster(**kw)
    with cluster:
        yield cluster


def main() -> None:
    cluster = Cluster()
    print("starting the cluster (about 20 s)...", file=sys.stderr, flush=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    with cluster:
        print(cluster.usage(), flush=True)
        try:
            while not stop:
                time.sleep(1)
                dead = [n for n, p in cluster.procs.items() if not p.alive]
                if dead:
                    print(f"exited: {', '.join(dead)} (see their logs)", file=sys.stderr, flush=True)
                    time.sleep(9)
        except KeyboardInterrupt:
            pass
        print("stopping...", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
