"""Export and base-model commands: ``base-models``, ``export``, ``exports``, ``worker``, ``convert``."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from weightstore.errors import ExportFailed, UploadIncomplete, WeightstoreError
from weightstore_cli.common import FORMAT_OPTION, KEY_OPTION, URL_OPTION, client, confirm, emit, err, handle_errors

base_app = typer.Typer(help="Registered base models (Hugging Face layouts in the blob store).", no_args_is_help=True)
exports_app = typer.Typer(help="Export jobs: list, show, cancel.", no_args_is_help=True)

JOB_COLUMNS = ["job_id", "state", "source", "target", "output_path", "progress_bytes", "total_bytes", "attempts"]
BASE_COLUMNS = ["name", "architecture", "size_bytes", "created_at"]
CHUNK = 8 * 1024 * 1024
TERMINAL = {"succeeded", "failed", "cancelled"}


# --- base models ------------------------------------------------------------------------------
def upload_base_model(c: Any, name: str, directory: Path, *, progress: bool = False) -> dict[str, Any]:
    """Register ``directory`` as base model ``name`` through the API: negotiate with the manifest,
    send only the files the store lacks, then register. Returns the registered model."""
    from tqdm import tqdm

    from weightstore.basemodels import scan_dir
    from weightstore.client import _raise_for

    files = scan_dir(directory)
    body = {"name": name, "files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in files]}
    try:
        return dict(c._call("POST", "/v1/base-models", json=body))
    except UploadIncomplete as exc:
        missing = set(exc.details.get("missing") or [])
    todo = {f.sha256: f for f in files if f.sha256 in missing}
    bar = tqdm(
        total=sum(f.size_bytes for f in todo.values()),
        unit="B",
        unit_scale=True,
        desc="upload",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        for f in todo.values():

            def body_iter(path: Path = f.local) -> Any:
                with open(path, "rb") as fh:
                    while data := fh.read(CHUNK):
                        bar.update(len(data))
                        yield data

            # through the client's failover (a PUT of content-addressed bytes is safe to repeat on
            # the next replica; each attempt reads the file afresh)
            r = c._request(
                "PUT",
                f"/v1/base-model-blobs/{f.sha256}",
                params={"size": f.size_bytes},
                content=body_iter,
                headers={"content-type": "application/octet-stream"},
            )
            _raise_for(r)
    finally:
        bar.close()
    return dict(c._call("POST", "/v1/base-models", json=body))


@base_app.command("add")
def base_add(
    name: str,
    directory: Path = typer.Argument(..., exists=True, file_okay=False),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Upload a Hugging Face model directory (config.json, safetensors shards + index, tokenizer and
    generation files) as base model NAME (admin). Files already stored are not sent again."""
    with handle_errors(), client(url, api_key) as c:
        row = upload_base_model(c, name, directory, progress=sys.stderr.isatty())
    emit(row, fmt, BASE_COLUMNS)
    err(f"registered base model {name}")


@base_app.command("ls")
def base_ls(url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    with handle_errors(), client(url, api_key) as c:
        rows = c._call("GET", "/v1/base-models")["base_models"]
    emit(rows, fmt, BASE_COLUMNS)


@base_app.command("show")
def base_show(name: str, url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    with handle_errors(), client(url, api_key) as c:
        row = c._call("GET", f"/v1/base-models/{name}")
    if fmt == "json":
        emit(row, fmt)
        return
    emit(row, fmt, BASE_COLUMNS + ["usage"])
    typer.echo("")
    emit(row["files"], fmt, ["path", "size_bytes", "sha256"])


@base_app.command("rm")
def base_rm(name: str, yes: bool = typer.Option(False, "-y", "--yes"), url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
    """Unregister a base model (refused while checkpoints of runs on it or unfinished jobs use it)."""
    confirm(f"remove base model {name}", yes)
    with handle_errors(), client(url, api_key) as c:
        c._call("DELETE", f"/v1/base-models/{name}")
    err(f"removed base model {name}")


# --- export -----------------------------------------------------------------------------------
def wait_for(
    c: Any, job_ids: list[str], *, progress: bool | None = None, poll: float = 1.0, timeout: float | None = None
) -> list[dict[str, Any]]:
    """Poll jobs until all are finished, with one tqdm bar (bytes) on stderr when it is a terminal
    (``progress=None``). The total only grows (jobs report theirs once a worker sized them), a job
    that failed or was cancelled counts the bytes it really did, and the bar ends as one line whose
    postfix says how the jobs ended ("failed", never "100% ... failed")."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=0, unit="B", unit_scale=True, desc="export", disable=not show, file=sys.stderr, leave=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            jobs = [c._call("GET", f"/v1/exports/{j}") for j in job_ids]
            done = sum(j["total_bytes"] if j["state"] == "succeeded" else j["progress_bytes"] for j in jobs)
            bar.total = max(bar.total or 0, sum(j["total_bytes"] for j in jobs), done)
            bar.n = done
            finished = all(j["state"] in TERMINAL for j in jobs)
            states = sorted({j["state"] for j in jobs})
            bar.set_postfix_str(",".join(states), refresh=False)
            if finished:
                if states != ["succeeded"]:
                    bar.desc = "export " + "/".join(s for s in states if s != "succeeded")
                bar.refresh()
                return jobs
            bar.refresh()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"export jobs still running after {timeout} s")
            time.sleep(poll)
    finally:
        bar.close()


def export(
    paths: list[str] = typer.Argument(None, help="tinker:// paths to export"),
    to: str = typer.Option(..., "--to", help="peft or merged"),
    base: str = typer.Option(None, "--base", help="registered base model (default: the run's)"),
    name: str = typer.Option(None, "--name", help="output checkpoint name (single export only)"),
    run: str = typer.Option(None, "--run", help="batch: every sampler/full-state checkpoint of RUN"),
    kind: str = typer.Option(None, "--kind", help="batch filter: sampler or training"),
    pattern: str = typer.Option(None, "--pattern", help="batch filter: glob on names, e.g. 'step-*'"),
    ttl: int = typer.Option(None, "--ttl", help="TTL of the output checkpoint(s) in seconds"),
    wait: bool = typer.Option(False, "--wait", help="wait for the job(s), with a progress bar"),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    """Export checkpoints to a PEFT adapter (tinker://RUN/external_weights/NAME) or a merged Hugging
    Face model (tinker://RUN/merged_weights/NAME). The same request twice returns the same job."""
    options = {"ttl_seconds": ttl} if ttl is not None else None
    if bool(paths) == bool(run):
        err("give TINKER_PATH... or --run RUN (not both)")
        raise typer.Exit(2)
    if name and (run or len(paths) != 1):
        err("--name only applies to a single export")
        raise typer.Exit(2)
    with handle_errors(), client(url, api_key) as c:
        if run or len(paths) > 1:
            body: dict[str, Any] = {"target": to, "base_model": base, "options": options}
            body.update({"run_id": run, "kind": kind, "name_pattern": pattern} if run else {"sources": paths})
            res = c._call("POST", "/v1/exports/batch", json={k: v for k, v in body.items() if v is not None})
            jobs = res["jobs"]
            err(f"batch {res['batch_id']}: {len(jobs)} job(s)")
        else:
            body = {"source": paths[0], "target": to, "base_model": base, "output_name": name, "options": options}
            jobs = [c._call("POST", "/v1/exports", json={k: v for k, v in body.items() if v is not None})]
        if wait:
            jobs = wait_for(c, [j["job_id"] for j in jobs])
    emit(jobs, fmt, JOB_COLUMNS if not wait else ["job_id", "state", "source", "result"])
    failed = [j for j in jobs if j["state"] in ("failed", "cancelled")]
    for j in failed:
        e = j.get("error") or {}
        err(f"{j['job_id']} {j['state']}: [{e.get('code')}] {e.get('message')}")
    if wait and failed:
        raise typer.Exit(1)


@exports_app.command("ls")
def exports_ls(
    state: str = typer.Option(None, "--state"),
    batch: str = typer.Option(None, "--batch"),
    limit: int = typer.Option(100, "--limit"),
    url: str = URL_OPTION,
    api_key: str = KEY_OPTION,
    fmt: str = FORMAT_OPTION,
) -> None:
    params = {k: v for k, v in {"state": state, "batch_id": batch, "limit": limit}.items() if v is not None}
    with handle_errors(), client(url, api_key) as c:
        rows = c._call("GET", "/v1/exports", params=params)["jobs"]
    emit(rows, fmt, JOB_COLUMNS)


@exports_app.command("show")
def exports_show(job_id: str, url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    """One job with its verification results and error."""
    with handle_errors(), client(url, api_key) as c:
        row = c._call("GET", f"/v1/exports/{job_id}")
    if fmt == "json":
        emit(row, fmt)
        return
    for k in (
        "job_id",
        "state",
        "source",
        "target",
        "base_model",
        "output_path",
        "result",
        "progress_bytes",
        "total_bytes",
        "attempts",
        "created_at",
        "finished_at",
    ):
        typer.echo(f"{k:16} {row.get(k) if row.get(k) is not None else '-'}")
    if row.get("error"):
        typer.echo(f"{'error':16} [{row['error'].get('code')}] {row['error'].get('message')}")
    ver = (row.get("verification") or {}).get("verification")
    if ver:
        for check in ("noop", "recompute", "forward"):
            c = ver.get(check) or {}
            status = "passed" if c.get("passed") else ("skipped" if c.get("ran") is False else "FAILED")
            typer.echo(f"{'check ' + check:16} {status} {c.get('reason') or c.get('detail') or ''}".rstrip())
        for w in ver.get("warnings") or []:
            typer.echo(f"{'warning':16} {w}")


@exports_app.command("cancel")
def exports_cancel(job_id: str, url: str = URL_OPTION, api_key: str = KEY_OPTION, fmt: str = FORMAT_OPTION) -> None:
    with handle_errors(), client(url, api_key) as c:
        row = c._call("POST", f"/v1/exports/{job_id}/cancel")
    err(f"{job_id}: {row['state']}")


# --- worker & local conversion ----------------------------------------------------------------
def worker(
    poll: float = typer.Option(2.0, "--poll", help="seconds between polls when idle"),
    owner: str = typer.Option(None, "--owner", help="lease owner name (default host:random)"),
) -> None:
    """Run a standalone export worker against the configured catalog and S3 store
    (WEIGHTSTORE_DATABASE_URL, WEIGHTSTORE_S3_*); any number may run on any number of machines."""
    import signal

    from weightstore import bootstrap
    from weightstore.settings import Settings
    from weightstore.worker import run_worker

    settings = Settings()
    if settings.s3_endpoint_url is None or settings.database_url is None:
        err(
            "a standalone worker needs WEIGHTSTORE_DATABASE_URL and WEIGHTSTORE_S3_ENDPOINT_URL "
            "(the embedded `weightstore serve` runs its own worker)"
        )
        raise typer.Exit(2)
    running = bootstrap.start(settings, migrate=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    err("weightstore worker: waiting for export jobs")
    try:
        run_worker(running.ctx, stop, poll, owner=owner, health_port=settings.health_port)
    finally:
        running.close()


def convert(
    out: Path = typer.Argument(..., help="output directory (must not exist or be empty)"),
    adapter: Path = typer.Option(..., "--adapter", exists=True, file_okay=False),
    base: Path = typer.Option(..., "--base", exists=True, file_okay=False),
    to: str = typer.Option(..., "--to", help="peft or merged"),
    shard_bytes: int = typer.Option(None, "--shard-bytes"),
    fmt: str = FORMAT_OPTION,
) -> None:
    """Convert a local Tinker adapter directory with a local base model directory, no server needed."""
    from weightstore.exportjobs import convert as run_convert

    if to not in ("peft", "merged"):
        err("--to must be peft or merged")
        raise typer.Exit(2)
    with handle_errors():
        try:
            result = run_convert(to, adapter, base, out, shard_bytes=shard_bytes)
        except ExportFailed as exc:
            err(f"error [{exc.code}]: {exc.message}")
            raise typer.Exit(1) from None
    if fmt == "json":
        emit(result, fmt)
    else:
        ver = result.get("verification") or {}
        for check in ("noop", "recompute", "forward"):
            c = ver.get(check) or {}
            err(f"{check}: {'passed' if c.get('passed') else ('skipped' if c.get('ran') is False else 'FAILED')}")
        typer.echo(str(out))


def register(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base-models")
    app.add_typer(exports_app, name="exports")
    app.command("export")(export)
    app.command("worker")(worker)
    app.command("convert")(convert)


__all__ = ["register", "upload_base_model", "wait_for", "WeightstoreError"]
