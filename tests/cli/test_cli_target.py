"""The CLI never guesses its target (issue 12, part 6): one-line errors with the fix, ``doctor``,
``serve`` on a busy port, collector commands through the API or an explicitly named store,
human sizes, plain decimals, progress that ends as it should."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.helpers import sampler_files
from weightstore.client import Client
from weightstore_cli import app
from weightstore_cli.common import emit

CLI = [sys.executable, "-m", "weightstore_cli"]
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the CLI, not the catalog, is under test
KEY_FIX = "set WEIGHTSTORE_API_KEY or pass --api-key"


def invoke(*args: str, url: str | None = None, key: str | None = None) -> Any:
    env = {"WEIGHTSTORE_URL": url, "WEIGHTSTORE_API_KEY": key}
    return CliRunner().invoke(app, list(args), env=env)


# --- connection and configuration errors: one line with the fix -------------------------------------
def test_no_server_is_one_line():
    """issue 12, part 6: `ls` with no server printed a 247-line traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["ls"], ["runs", "ls"], ["exports", "ls"], ["gc", "status"]):
        res = invoke(*args, url=url, key="tml-x")
        prefix = "gc status: " if args[0] == "gc" else ""
        assert (res.exit_code, res.stdout) == (1, ""), args
        fix = "start `weightstore serve` or set WEIGHTSTORE_URL"
        assert res.stderr == f"{prefix}error: no weightstore server at {url} (connection refused); {fix}\n"


def test_url_without_scheme_is_one_line():
    """issue 12, part 6: a URL without a scheme printed a traceback."""
    res = invoke("ls", url="localhost:8000", key="tml-x")
    assert res.exit_code == 2
    assert res.stderr == "error: WEIGHTSTORE_URL/--url 'localhost:8000' needs a scheme and a host, e.g. http://localhost:8000\n"


def test_missing_key_names_the_variable_and_the_flag():
    """issue 12, part 6: "missing or malformed API key" did not say how to give one."""
    res = invoke("ls", url="http://127.0.0.1:1")
    assert (res.exit_code, res.stderr) == (2, f"error: no API key: {KEY_FIX}\n")


@SQLITE_ONLY
def test_unknown_key_and_wrong_role(server, keys):
    """issue 12, part 6: a refused key and a too-weak role say which key to use and how to give it."""
    res = invoke("ls", url=server.url, key="tml-not-a-key")
    assert (res.exit_code, res.stderr) == (1, f"error [unauthenticated]: unknown API key; {KEY_FIX}\n")
    res = invoke("gc", "verify", url=server.url, key=keys.trainer)
    assert res.exit_code == 1
    assert res.stderr == f"gc verify: error [forbidden]: this needs an admin key; use a key with that role ({KEY_FIX})\n"


# --- doctor -----------------------------------------------------------------------------------------
@SQLITE_ONLY
def test_doctor_against_a_live_server(server, keys):
    """issue 12, part 6: `doctor` checks URL, server version, key, role, store and catalog."""
    res = invoke("doctor", "--role", "admin", url=server.url, key=keys.admin)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["OK", "url"],
        ["OK", "server"],
        ["OK", "key"],
        ["OK", "role"],
        ["OK", "store"],
        ["OK", "catalog"],
    ]
    assert lines[1].endswith("weightstore 0.1.0") and lines[3].endswith("admin (needed: admin)")
    res = invoke("doctor", "--role", "admin", url=server.url, key=keys.trainer)
    assert res.exit_code == 1
    assert res.stdout.splitlines()[3] == f"FAIL  role     trainer, but admin is needed: use a admin key ({KEY_FIX})"
    res = invoke("doctor", url=server.url)
    assert res.exit_code == 1 and res.stdout.splitlines()[2] == f"FAIL  key      no API key: {KEY_FIX}"


def test_doctor_against_nothing():
    url = f"http://127.0.0.1:{free_port()}"
    res = invoke("doctor", url=url, key="tml-x")
    assert res.exit_code == 1
    assert res.stdout.splitlines() == [
        f"OK    url      {url}",
        f"FAIL  server   no weightstore server at {url} (ConnectError); start `weightstore serve`",
        "SKIP  key      needs the server",
        "SKIP  role     needs the server",
        "SKIP  store    needs the server",
        "SKIP  catalog  needs the server",
    ]
    res = invoke("doctor", url="127.0.0.1:8000")
    assert res.exit_code == 1 and res.stdout.splitlines()[0].startswith("FAIL  url      ")


# --- serve ------------------------------------------------------------------------------------------
def test_serve_on_a_busy_port_prints_one_line_and_no_key(tmp_path: Path):
    """issue 12, part 6: `serve` on a busy port printed a bootstrap key and only then failed."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSTORE_")}
        env.update(WEIGHTSTORE_DATA_DIR=str(tmp_path / "var"), WEIGHTSTORE_PORT=str(port), WEIGHTSTORE_HOST="127.0.0.1")
        r = subprocess.run([*CLI, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"port {port} is in use; set WEIGHTSTORE_PORT\n")
    assert not (tmp_path / "var").exists()  # no store, no catalog, no key was made


# --- the collector: through the API by default, or an explicitly named store ------------------------
@SQLITE_ONLY
def test_gc_verify_through_the_api_names_what_it_checked(server, keys, ctx):
    """issue 12, part 6: `gc verify` printed a Python dict and did not say which catalog it checked."""
    trainer = Client(server.url, keys.trainer)
    trainer.upload(trainer.create_run("m")["run_id"], "sampler", "s1", sampler_files())
    res = invoke("gc", "verify", url=server.url, key=keys.admin)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    catalog = ctx.settings.resolved_database_url
    assert lines[:4] == [
        "gc verify: clean",
        f"  server:   {server.url}",
        f"  catalog:  {catalog}",
        f"  store:    {ctx.settings.s3_endpoint_url} (bucket {ctx.settings.s3_bucket})",
    ]
    assert "{" not in res.stdout and any(line.split()[:2] == ["referenced", "blobs"] for line in lines)
    res = invoke("gc", "verify", "--format", "json", url=server.url, key=keys.admin)
    report = json.loads(res.stdout)
    assert report["clean"] is True and report["findings"] == []
    assert report["checked"] == {
        "server": server.url,
        "catalog": catalog,
        "store": ctx.settings.s3_endpoint_url,
        "bucket": ctx.settings.s3_bucket,
    }
    assert report["stats"]["referenced_blobs"] == 2
    res = invoke("gc", "run", "--dry-run", url=server.url, key=keys.admin)
    assert res.exit_code == 0, res.output
    assert "plan (dry run, nothing changed)" in res.stdout and f"  server:   {server.url}" in res.stdout


def test_direct_mode_refuses_to_create_a_store(tmp_path: Path):
    """issue 12, part 6: without WEIGHTSTORE_DATA_DIR `gc verify` created a new store and called it clean."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSTORE_")}
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["gc", "verify", "--direct", "--data-dir", str(empty)], ["gc", "run", "--direct"]):
        r = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        root = empty if "--data-dir" in args else (tmp_path / "var")
        assert r.returncode == 2, r.stderr
        verb = "gc verify" if "verify" in args else "gc"
        assert r.stderr == (
            f"{verb}: error: --direct: no weightstore store in {root.resolve()} (nothing to collect; refusing to create one): "
            "pass --data-dir of an existing `weightstore serve`, "
            "or set WEIGHTSTORE_S3_ENDPOINT_URL and WEIGHTSTORE_DATABASE_URL\n"
        )
    assert list(empty.iterdir()) == [] and not (tmp_path / "var").exists()


# --- tables, sizes, decimals -----------------------------------------------------------------------
@SQLITE_ONLY
def test_ls_human_sizes_bytes_and_width(server, keys):
    """issue 12, part 6: `ls` printed raw byte counts in 250-column tables."""
    c = Client(server.url, keys.trainer)
    run = c.create_run("m")["run_id"]
    path = c.upload(run, "sampler", "step-000001", sampler_files())["tinker_path"]
    size = c.get_checkpoint(path)["size_bytes"]
    res = invoke("ls", url=server.url, key=keys.trainer)
    assert res.exit_code == 0, res.output
    run_line, head, row = res.stdout.splitlines()
    assert run_line == f"tinker://{run}/"
    assert head.split() == ["CHECKPOINT", "SIZE", "CREATED_AT", "EXPIRES_AT"]
    assert run_line + row.split()[0] == path
    assert f"{size / 1000:.1f} kB" in row and str(size) not in row
    assert max(len(line) for line in res.stdout.splitlines()) <= 100
    res = invoke("ls", "--bytes", url=server.url, key=keys.trainer)
    assert res.stdout.splitlines()[2].split()[1] == str(size)
    res = invoke("ls", "--format", "csv", url=server.url, key=keys.trainer)
    assert res.stdout.splitlines()[1].split(",")[:3] == [path, "sampler", str(size)]
    res = invoke("ttl", path, "--ttl", "3600", "--format", "json", url=server.url, key=keys.trainer)
    assert res.exit_code == 0 and json.loads(res.stdout)["expires_at"], res.output
    res = invoke("ttl", path, "--seconds", "7200", "--format", "json", url=server.url, key=keys.trainer)
    assert res.exit_code == 0, res.output  # the old flag name still works (hidden)


def test_csv_and_json_print_plain_decimals(capsys):
    """issue 12, part 6: CSV/JSON printed `7E-9`."""
    rows = [{"gb_months": Decimal("7E-9"), "as_text": "7E-9", "name": "step-1e5", "n": 3}]
    emit(rows, "csv", ["gb_months", "as_text", "name", "n"])
    emit(rows, "json")
    out = capsys.readouterr().out
    assert out.startswith("gb_months,as_text,name,n\n0.000000007,0.000000007,step-1e5,3\n")
    plain = {"gb_months": "0.000000007", "as_text": "0.000000007", "name": "step-1e5", "n": 3}
    assert json.loads(out[out.index("[") :]) == [plain]


# --- upload directory check, export progress --------------------------------------------------------
def test_upload_says_what_the_directory_must_hold(tmp_path: Path):
    """issue 12, part 6: an empty directory answered `body.files: List should have at least 1 item`;
    the `--kind state` error spoke of "training"."""
    (tmp_path / "ckpt").mkdir()
    upload = ["upload", str(tmp_path / "ckpt"), "--run", "r", "--kind", "state", "--name", "n"]
    res = invoke(*upload, url="http://127.0.0.1:1", key="k")
    assert res.exit_code == 2
    assert res.stderr == (
        f"{tmp_path / 'ckpt'} is empty: a state checkpoint directory must hold "
        "adapter_model.safetensors, adapter_config.json, optimizer.safetensors\n"
    )
    for name, data in sampler_files().items():
        (tmp_path / "ckpt" / name).write_bytes(data)
    res = invoke(*upload, url="http://127.0.0.1:1", key="k")
    assert res.stderr == f"{tmp_path / 'ckpt'} lacks optimizer.safetensors: a state checkpoint directory must hold " + (
        "adapter_model.safetensors, adapter_config.json, optimizer.safetensors\n"
    )


class _Jobs:
    """A fake API client whose jobs go through the given states, one poll at a time."""

    def __init__(self, *polls: list[dict[str, Any]]) -> None:
        self.polls = list(polls)
        self.n = 0

    def _call(self, method: str, url: str) -> dict[str, Any]:
        job_id = url.rsplit("/", 1)[-1]
        poll = self.polls[min(self.n // 2, len(self.polls) - 1)]
        self.n += 1
        return next(j for j in poll if j["job_id"] == job_id)


def _job(job_id: str, state: str, progress: int, total: int) -> dict[str, Any]:
    return {"job_id": job_id, "state": state, "progress_bytes": progress, "total_bytes": total}


def test_export_wait_failed_job_is_not_100_percent(capsys):
    """issue 12, part 6: a failed export showed "100% ... failed"; the total jumped; the last line repeated."""
    from weightstore_cli.exports import wait_for

    fake = _Jobs(
        [_job("a", "queued", 0, 0), _job("b", "running", 10, 100)],
        [_job("a", "running", 50, 100), _job("b", "running", 40, 100)],
        [_job("a", "succeeded", 100, 100), _job("b", "failed", 40, 100)],
    )
    jobs = wait_for(fake, ["a", "b"], progress=True, poll=0)
    assert [j["state"] for j in jobs] == ["succeeded", "failed"]
    err = capsys.readouterr().err
    final = err.split("\r")[-1].strip()
    assert final.startswith("export failed: ") and "100%" not in final and "140/200" in final, final
    assert err.count("\n") == 1  # one final line


@SQLITE_ONLY
def test_client_progress_is_auto_and_load_state_reports_it(server, keys, capsys, monkeypatch):
    """issue 12, part 6: `Client` showed no progress unless asked, and `load_state` never did."""
    assert Client(server.url, keys.trainer).progress is False  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    c = Client(server.url, keys.trainer)
    assert c.progress is True
    monkeypatch.undo()
    path = c.upload(c.create_run("m")["run_id"], "sampler", "s1", sampler_files())["tinker_path"]
    capsys.readouterr()
    weights, opt = c.load_state(path)
    err = capsys.readouterr().err
    size = len(sampler_files()["adapter_model.safetensors"])
    assert opt is None and weights
    assert "load adapter_model.safetensors: 100%" in err and err.count("\n") == 1, err
    assert f"{size / 1000:.2f}k/{size / 1000:.2f}k" in err  # the total is the file's size
