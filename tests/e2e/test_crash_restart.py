"""Issue 11, item 2: the embedded SeaweedFS neither outlives nor silently dies under its owner.

Real processes, real SeaweedFS: ``weightstore serve`` is killed with SIGKILL and started again on
the same data dir; the SeaweedFS child is killed under a running service; a stale store left by a
dead owner is reclaimed from its pid file; and a process that is not provably ours is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.helpers import state_files
from weightstore.client import Client
from weightstore.embedded import PID_FILE, SeaweedFS, StoreOwnedElsewhere, pid_alive
from weightstore.errors import StoreUnavailable

CLI = [sys.executable, "-m", "weightstore_cli"]
HELPER = Path(__file__).with_name("crash_owner.py")


class Serve:
    """``weightstore serve`` as a subprocess on ``data_dir``; its log is kept for failure messages."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir, self.log_path = data_dir, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSTORE_")}
        env.update(
            {
                "WEIGHTSTORE_DATA_DIR": str(data_dir),
                "WEIGHTSTORE_PORT": str(self.port),
                "WEIGHTSTORE_EMBEDDED_GC": "false",
                "WEIGHTSTORE_EMBEDDED_WORKER": "false",
            }
        )
        self._log = log.open("a")
        self.proc = subprocess.Popen([*CLI, "serve"], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited:\n{self.log_path.read_text()}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve not ready in {timeout} s:\n{self.log_path.read_text()}")

    def admin_key(self) -> str | None:
        lines = [line for line in self.log_path.read_text().splitlines() if "bootstrap admin key" in line]
        return lines[-1].rsplit(" ", 1)[-1] if lines else None

    def weed_pid(self) -> int:
        return int(json.loads((self.data_dir / "s3" / PID_FILE).read_text())["child_pid"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def serves(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in reversed(started):
        serve.stop()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def _wait_record(store_dir: Path, ok: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((store_dir / PID_FILE).read_text())
            if ok(record):
                return record
        time.sleep(0.2)
    raise AssertionError(f"pid file never reached the expected state: {record}")


def _save(url: str, key: str, tmp: Path, name: str) -> tuple[str, dict[str, bytes]]:
    files = state_files(seed=len(name))
    src = tmp / f"src-{name}"
    src.mkdir()
    for fname, data in files.items():
        (src / fname).write_bytes(data)
    with Client(url, key, timeout=60) as c:
        run = c.create_run("tiny", lora_rank=4)["run_id"]
        path = c.upload_dir(src, run_id=run, kind="training", name=name)["tinker_path"]
    return str(path), files


def _load(url: str, key: str, tmp: Path, path: str, name: str) -> dict[str, bytes]:
    dest = tmp / f"dl-{name}"
    with Client(url, key, timeout=60) as c:
        c.download(path, dest)
    return {f.name: f.read_bytes() for f in dest.iterdir()}


def test_serve_restarts_on_the_same_data_dir_after_kill_9(tmp_path: Path, serves: list[Serve]) -> None:
    """Issue 11, item 2: after ``kill -9`` of serve, the next serve comes up, the saved bytes are
    still there byte-identical, and the old SeaweedFS child is gone."""
    data_dir = tmp_path / "var"
    first = Serve(data_dir, tmp_path / "serve1.log")
    serves.append(first)
    first.wait_ready()
    admin = first.admin_key()
    assert admin
    path, files = _save(first.url, admin, tmp_path, "before-crash")
    orphan = first.weed_pid()

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)

    second = Serve(data_dir, tmp_path / "serve2.log")
    serves.append(second)
    second.wait_ready()
    assert _wait_gone(orphan, 5), f"SeaweedFS {orphan} of the killed serve still runs"
    assert second.weed_pid() != orphan and pid_alive(second.weed_pid())
    assert _load(second.url, admin, tmp_path, path, "after-crash") == files
    path2, files2 = _save(second.url, admin, tmp_path, "after-crash")
    assert _load(second.url, admin, tmp_path, path2, "after-crash-2") == files2


def test_weed_child_dies_with_a_killed_serve(tmp_path: Path, serves: list[Serve]) -> None:
    """Issue 11, item 2: the store does not outlive its owner even when nothing starts again
    (Linux: PR_SET_PDEATHSIG), so no orphan holds the data dir's locks."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only; the pid file covers other systems")
    serve = Serve(tmp_path / "var", tmp_path / "serve.log")
    serves.append(serve)
    serve.wait_ready()
    weed = serve.weed_pid()
    serve.proc.send_signal(signal.SIGKILL)
    serve.proc.wait(timeout=10)
    assert _wait_gone(weed, 30), f"SeaweedFS {weed} outlived its killed owner"


def test_killed_weed_is_restarted_under_a_running_serve(tmp_path: Path, serves: list[Serve]) -> None:
    """Issue 11, item 2: SIGKILL of the SeaweedFS child under a running serve: the watchdog
    restarts it on the same ports and data, /readyz is 200 again, and a save + load works."""
    serve = Serve(tmp_path / "var", tmp_path / "serve.log")
    serves.append(serve)
    serve.wait_ready()
    admin = serve.admin_key()
    assert admin
    path, files = _save(serve.url, admin, tmp_path, "before")
    weed = serve.weed_pid()
    endpoint = json.loads((tmp_path / "var" / "s3-endpoint.json").read_text())["endpoint_url"]

    os.kill(weed, signal.SIGKILL)
    assert _wait_gone(weed, 10)
    # In the window, a load is answered or refused as retryable (503 store_unavailable), never
    # with a permanent error.
    try:
        assert _load(serve.url, admin, tmp_path, path, "window") == files
    except StoreUnavailable:
        pass
    record = _wait_record(tmp_path / "var" / "s3", lambda r: r.get("ready") is True and r.get("child_pid") != weed, 60)
    assert pid_alive(record["child_pid"])
    serve.wait_ready(timeout=10)
    # same endpoint: clients holding it (and `weightstore gc`/`worker`) keep working
    assert json.loads((tmp_path / "var" / "s3-endpoint.json").read_text())["endpoint_url"] == endpoint
    assert _load(serve.url, admin, tmp_path, path, "before") == files
    path2, files2 = _save(serve.url, admin, tmp_path, "after")
    assert _load(serve.url, admin, tmp_path, path2, "after") == files2


def _owner_script(data_dir: Path, access: str, secret: str) -> subprocess.Popen[str]:
    """A process that owns a SeaweedFS on ``data_dir`` WITHOUT the parent-death signal (as a
    crashed owner on a system without one would leave it); prints the child's pid."""
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), str(data_dir), access, secret],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), proc.stderr.read() if proc.stderr else line
    return proc


def test_stale_store_of_a_dead_owner_is_reclaimed(tmp_path: Path) -> None:
    """Issue 11, item 2: the lock is free but the dead owner's SeaweedFS still runs on the data
    dir: the next owner terminates it (named by the pid file, confirmed by its command line) and
    starts a fresh one on the same data."""
    access, secret = "WSTEST" + secrets.token_hex(7).upper(), secrets.token_urlsafe(30)
    data_dir = tmp_path / "s3"
    owner = _owner_script(data_dir, access, secret)
    orphan = int(json.loads((data_dir / PID_FILE).read_text())["child_pid"])
    owner.kill()
    owner.wait(timeout=10)
    assert pid_alive(orphan), "the helper's SeaweedFS should survive its owner (no death signal)"

    weed = SeaweedFS(data_dir, access_key=access, secret_key=secret)
    try:
        weed.start()
        assert _wait_gone(orphan, 1)
        assert weed.running and weed.pid != orphan
        record = json.loads((data_dir / PID_FILE).read_text())
        assert record["child_pid"] == weed.pid and record["owner_pid"] == os.getpid()
    finally:
        weed.stop(grace=5)
    assert not (data_dir / PID_FILE).exists()


def test_live_owner_is_not_displaced(tmp_path: Path) -> None:
    """Issue 11, item 2: a second start on a data dir whose owner lives is refused with the
    owner's endpoint (so `weightstore gc`/`worker` can share it) and kills nothing."""
    access, secret = "WSTEST" + secrets.token_hex(7).upper(), secrets.token_urlsafe(30)
    data_dir = tmp_path / "s3"
    first = SeaweedFS(data_dir, access_key=access, secret_key=secret)
    first.start()
    try:
        second = SeaweedFS(data_dir, access_key=access, secret_key=secret)
        with pytest.raises(StoreOwnedElsewhere) as caught:
            second.start()
        assert caught.value.endpoint_url == first.endpoint_url
        assert first.running
        assert httpx.get(first.endpoint_url + "/healthz", timeout=5).status_code == 200
    finally:
        first.stop(grace=5)


def test_a_process_that_is_not_ours_is_never_killed(tmp_path: Path) -> None:
    """Issue 11, item 2: the pid file names processes that are not a `weed` for this data dir
    (a pid reused by a sleep; a process called weed for another data dir; a process that is not
    weed but names this data dir): none of them is touched, and the store still starts."""
    access, secret = "WSTEST" + secrets.token_hex(7).upper(), secrets.token_urlsafe(30)
    data_dir = tmp_path / "s3"
    data_dir.mkdir()
    ours = f"-dir={data_dir.resolve() / 'data'}"
    # `exec -a NAME bash -c CMD ARGS...` makes a process whose command line is NAME -c CMD ARGS.
    loop = "sleep 300; :"  # the trailing `:` keeps bash alive as the process we name
    victims = [
        subprocess.Popen(["sleep", "300"], start_new_session=True),
        subprocess.Popen(
            ["bash", "-c", f'exec -a weed bash -c "{loop}" mini -dir={tmp_path / "other" / "data"}'], start_new_session=True
        ),
        subprocess.Popen(["bash", "-c", f'exec -a notweed bash -c "{loop}" mini {ours}'], start_new_session=True),
    ]
    try:
        time.sleep(0.5)  # let the execs happen
        for victim in victims:
            (data_dir / PID_FILE).write_text(
                json.dumps({"owner_pid": 999999, "child_pid": victim.pid, "ports": {}, "data_dir": str(data_dir)})
            )
            weed = SeaweedFS(data_dir, access_key=access, secret_key=secret)
            weed.start()
            weed.stop(grace=5)
            assert victim.poll() is None, f"{victim.args!r} was killed"
    finally:
        for victim in victims:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()


def test_a_sharing_process_takes_the_store_over_when_its_owner_goes(tmp_path: Path) -> None:
    """Issue 11, item 2: a process that shares the store (`serve` started while `weightstore gc`
    owned it) takes it over on the same endpoint when the owner exits, instead of being left
    without a store; the data stays readable byte-identical."""
    from tests.fixtures_services import S3Config

    access, secret = "WSTEST" + secrets.token_hex(7).upper(), secrets.token_urlsafe(30)
    data_dir = tmp_path / "s3"
    marker = tmp_path / "s3-endpoint.json"
    owner = SeaweedFS(data_dir, access_key=access, secret_key=secret, endpoint_file=marker)
    owner.start()
    sharer = SeaweedFS(data_dir, access_key=access, secret_key=secret, endpoint_file=marker)
    try:
        sharer.start(share=True)
        assert not sharer.owner and sharer.endpoint_url == owner.endpoint_url
        client = S3Config(owner.endpoint_url, access, secret).client()
        client.create_bucket(Bucket="takeover")
        payload = secrets.token_bytes(100_000)
        client.put_object(Bucket="takeover", Key="k", Body=payload)
        endpoint = owner.endpoint_url

        owner.stop(grace=5)
        record = _wait_record(data_dir, lambda r: r.get("owner_pid") == os.getpid() and r.get("ready") is True, 60)
        assert sharer.owner and sharer.running and record["child_pid"] == sharer.pid
        assert sharer.endpoint_url == endpoint
        assert json.loads(marker.read_text())["endpoint_url"] == endpoint
        assert client.get_object(Bucket="takeover", Key="k")["Body"].read() == payload
    finally:
        sharer.stop(grace=5)
        owner.stop(grace=5)
    assert not marker.exists() and not (data_dir / PID_FILE).exists()
