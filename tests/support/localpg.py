"""Throw-away PostgreSQL clusters for tests and benchmarks.

This is *not* a production launcher: the cluster runs with ``fsync=off``,
``synchronous_commit=off`` and ``full_page_writes=off`` and trusts every
connection, which is only acceptable because it listens on 127.0.0.1 plus a
private Unix socket directory and is deleted on :meth:`LocalPostgres.stop`.

Why the ceremony around users and directories:

* ``initdb`` and ``postgres`` refuse to run as root, and CI/dev machines run as
  root, so when we are root every server-side command is run through
  ``runuser -u postgres --``.
* The checkout may live under a mode-700 home directory that the ``postgres``
  user cannot traverse, so the cluster lives in its own ``mkdtemp`` directory
  (mode 755, owned by ``postgres``) and commands run with that as cwd.

Typical use::

    with LocalPostgres() as pg:
        url = pg.create_database("weightstore_test")
        engine = sqlalchemy.create_engine(url)
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

__all__ = ["LocalPostgres", "postgres_bindir"]

_PG_USER = "postgres"
# Settings that trade durability for speed; acceptable for disposable clusters only.
_FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
# A Unix socket path is limited to 107 bytes on Linux; ".s.PGSQL.NNNNN" adds 15.
_MAX_SOCKET_DIR_LEN = 90
_DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _is_root() -> bool:
    return os.geteuid() == 0


def _binary_works(path: Path) -> bool:
    """True when ``path --version`` runs (a dangling /usr/local/bin symlink would not)."""
    try:
        result = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return False
    return result.returncode == 0


def postgres_bindir() -> Path:
    """Locate a directory holding working ``initdb``, ``pg_ctl`` and ``postgres`` binaries.

    Order: ``$WEIGHTSTORE_PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin`` (Debian layout), then whatever ``pg_ctl`` is on PATH.
    Each candidate is checked by running the binaries, because a stray
    ``/usr/local/bin/pg_ctl`` may point at a removed or mismatched install.
    """
    candidates: list[Path] = []
    env_dir = os.environ.get("WEIGHTSTORE_PG_BINDIR")
    if env_dir:
        candidates.append(Path(env_dir))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            if out:
                candidates.append(Path(out))

    def _version_key(p: str) -> tuple[int, ...]:
        version = Path(p).parent.name
        return tuple(int(x) for x in version.split(".") if x.isdigit())

    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    for bindir in candidates:
        if all(_binary_works(bindir / name) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; tried "
        f"{[str(c) for c in candidates] or 'nothing'}. Install them with "
        "`apt-get install -y postgresql` (or `make sysdeps`), or set WEIGHTSTORE_PG_BINDIR."
    )


def _free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port. Racy by nature; start() retries on bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """A disposable PostgreSQL cluster on 127.0.0.1 with a random port.

    Attributes set by :meth:`start`: ``port`` and ``host`` (always ``127.0.0.1``);
    ``socket_dir`` holds the Unix socket.
    """

    host = "127.0.0.1"

    def __init__(self, base_dir: Path | None = None) -> None:
        # We delete base_dir on stop() only when we created it; for a caller-supplied
        # directory we delete just the subdirectories we made inside it.
        self._owns_base_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="weightstore-pg-")) if base_dir is None else base_dir
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.port: int | None = None
        self._bindir: Path | None = None
        self._running = False
        self._stopped = False

    # -- helpers ------------------------------------------------------------------

    def _as_server_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", _PG_USER, "--", *argv] if _is_root() else argv

    def _env(self) -> dict[str, str]:
        # Drop PG* variables from the caller so a developer's PGDATA/PGPORT cannot
        # redirect our commands to a real cluster; force a predictable locale.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env

    def _run(self, argv: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._as_server_user(argv),
            cwd=self.base_dir,  # the server user may not be able to enter the caller's cwd
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _prepare_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        if _is_root():
            shutil.chown(path, user=_PG_USER, group=_PG_USER)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _bin(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """initdb a fresh cluster and start it; returns once it accepts connections."""
        if self._running:
            return
        if self._stopped:
            raise RuntimeError("LocalPostgres cannot be restarted after stop(); create a new one")
        if len(str(self.socket_dir)) > _MAX_SOCKET_DIR_LEN:
            raise RuntimeError(f"socket directory path too long for a Unix socket: {self.socket_dir}")
        self._bindir = postgres_bindir()

        self._prepare_dir(self.base_dir)
        self._prepare_dir(self.socket_dir)
        if _is_root():
            # The postgres user must be able to reach base_dir through every parent.
            probe = self._run(["test", "-w", str(self.base_dir)])
            if probe.returncode != 0:
                raise RuntimeError(
                    f"user {_PG_USER!r} cannot write {self.base_dir}; a parent directory is probably "
                    "mode 700 (e.g. under /root). Use a base_dir under /tmp (the default)."
                )

        init = self._run(
            [
                self._bin("initdb"),
                "-D", str(self.data_dir),
                "-U", _PG_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # disposable cluster: skip the fsync of the fresh data dir
                "--no-instructions",
            ]
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed (rc={init.returncode}):\n{init.stdout}\n{init.stderr}")

        # Static settings go into postgresql.conf; the port is passed on the command
        # line so a bind race can be retried with another port without rewriting files.
        settings = {
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            **_FAST_SETTINGS,
        }
        # Appending keeps the file's owner (postgres) even though we may be root.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by tests.support.localpg (disposable test cluster)\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

        last_error = ""
        for _attempt in range(5):
            port = _free_port(self.host)
            result = self._run(
                [
                    self._bin("pg_ctl"),
                    "-D", str(self.data_dir),
                    "-l", str(self.log_file),
                    "-o", f"-p {port}",
                    "-w", "-t", "60",
                    "start",
                ],
                timeout=90,
            )  # fmt: skip
            if result.returncode == 0:
                self.port = port
                self._running = True
                # Do not leak a server if the test process forgets to stop us.
                atexit.register(self.stop)
                return
            last_error = f"{result.stdout}\n{result.stderr}\n--- server log ---\n{self._log_tail()}"
            if "could not bind" not in last_error and "in use" not in last_error:
                break
        raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")

    def stop(self) -> None:
        """Fast shutdown, then delete the cluster directory. Safe to call repeatedly."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._running and self.data_dir.exists():
            result = self._run(
                [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop"],
                timeout=45,
            )
            if result.returncode != 0:
                self._kill_postmaster()
        self._running = False
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            for path in (self.data_dir, self.socket_dir):
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                self.log_file.unlink()

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl stop fails: SIGKILL the postmaster from postmaster.pid."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------

    def url(self, name: str) -> str:
        """SQLAlchemy URL for database ``name`` on this cluster (psycopg 3 driver)."""
        self._require_running()
        return f"postgresql+psycopg://{_PG_USER}@{self.host}:{self.port}/{name}"

    def _require_running(self) -> None:
        if not self._running or self.port is None:
            raise RuntimeError("LocalPostgres is not running; call start() first")

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[TupleRow]:
        """An autocommit psycopg connection to ``dbname`` as the superuser (caller closes it).

        Autocommit because CREATE/DROP DATABASE cannot run inside a transaction block.
        """
        self._require_running()
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=_PG_USER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
        )

    # Kept for callers written against the first draft of this module.
    _admin_connect = connect

    @staticmethod
    def _check_name(name: str) -> None:
        # Names end up in URLs too, so keep them to plain identifiers.
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r}: use [A-Za-z_][A-Za-z0-9_]*, max 63 chars")

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database ``name`` and return its SQLAlchemy URL.

        ``template`` clones an existing database (e.g. one already migrated), which
        is much faster than running migrations again; the template must have no
        open connections at that moment.
        """
        self._check_name(name)
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            self._check_name(template)
            statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
        with self.connect() as conn:
            conn.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting any remaining sessions."""
        self._check_name(name)
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
