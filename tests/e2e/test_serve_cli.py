"""`weightstore serve` on the embedded default (SQLite + its own SeaweedFS), driven by the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.helpers import state_files

CLI = [sys.executable, "-m", "weightstore_cli"]


@pytest.fixture
def served(tmp_path: Path):
    port = free_port()
    env = {
        **os.environ,
        "WEIGHTSTORE_DATA_DIR": str(tmp_path / "var"),
        "WEIGHTSTORE_PORT": str(port),
        "WEIGHTSTORE_EMBEDDED_GC": "false",
        "WEIGHTSTORE_EMBEDDED_WORKER": "false",
    }
    for k in [k for k in env if k.startswith("WEIGHTSTORE_") and ("S3" in k or "DATABASE" in k)]:
        env.pop(k)
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - closed in the fixture's finally
    proc = subprocess.Popen([*CLI, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        text = (tmp_path / "serve.log").read_text()
        admin = next(line.rsplit(" ", 1)[-1] for line in text.splitlines() if "bootstrap admin key" in line)
        yield url, admin, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=40)
        log.close()


def cli(url: str, key: str, *args: str) -> str:
    env = {**os.environ, "WEIGHTSTORE_URL": url, "WEIGHTSTORE_API_KEY": key}
    r = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_serve_and_cli_round_trip(served):
    url, admin, tmp = served
    # the embedded S3 listens on loopback only, with auth on
    ready = httpx.get(url + "/readyz").json()
    assert ready["status"] == "ok"
    key = cli(url, admin, "keys", "create", "--tenant", "acme", "--role", "trainer", "--create-tenant")
    assert key.startswith("tml-")
    run = cli(url, key, "runs", "create", "--base-model", "tiny", "--rank", "4")
    src = tmp / "ckpt"
    src.mkdir()
    for name, data in state_files().items():
        (src / name).write_bytes(data)
    sampler = tmp / "sampler"
    sampler.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (sampler / name).write_bytes((src / name).read_bytes())
    state_path = cli(url, key, "upload", str(src), "--run", run, "--kind", "state", "--name", "step-1", "--ttl", "7200")
    assert state_path == f"tinker://{run}/weights/step-1"
    sampler_path = cli(url, key, "upload", str(sampler), "--run", run, "--kind", "sampler", "--name", "step-1")
    listed = json.loads(cli(url, key, "ls", "--run", run, "--format", "json"))
    assert {c["tinker_path"] for c in listed} == {state_path, sampler_path}
    dest = tmp / "dl"
    cli(url, key, "download", state_path, str(dest))
    for f in src.iterdir():
        assert hashlib.sha256((dest / f.name).read_bytes()).hexdigest() == hashlib.sha256(f.read_bytes()).hexdigest()
    cli(url, key, "ttl", state_path, "--seconds", "3600")
    cli(url, key, "rm", "-y", sampler_path)
    listed = json.loads(cli(url, key, "ls", "--format", "json"))
    assert [c["tinker_path"] for c in listed] == [state_path]
    # a reader key cannot write, and the CLI says so on stderr with the stable code
    reader = cli(url, admin, "keys", "create", "--tenant", "acme", "--role", "reader")
    r = subprocess.run(
        [*CLI, "rm", "-y", state_path],
        env={**os.environ, "WEIGHTSTORE_URL": url, "WEIGHTSTORE_API_KEY": reader},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "forbidden" in r.stderr and r.stdout == ""


def test_sigterm_stops_the_embedded_store(tmp_path):
    """The embedded SeaweedFS must not outlive `serve` (uvicorn re-raises SIGTERM after shutdown)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSTORE_")}
    env.update(
        {
            "WEIGHTSTORE_DATA_DIR": str(tmp_path / "var"),
            "WEIGHTSTORE_PORT": str(port),
            "WEIGHTSTORE_EMBEDDED_GC": "false",
            "WEIGHTSTORE_EMBEDDED_WORKER": "false",
        }
    )
    proc = subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "var" / "s3-endpoint.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    endpoint = json.loads(marker.read_text())["endpoint_url"]
    assert httpx.get(endpoint + "/healthz").status_code == 200
    proc.terminate()
    proc.wait(timeout=40)
    with pytest.raises(httpx.HTTPError):
        httpx.get(endpoint + "/healthz", timeout=2)
    assert not marker.exists()
