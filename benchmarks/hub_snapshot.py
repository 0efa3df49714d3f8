"""Hub read benchmark (issue 15): ``snapshot_download`` of a multi-shard model from weightstore vs a raw
boto3 parallel download of the same objects from the same store, side by side in one run.

- **hub**: ``huggingface_hub.snapshot_download`` against the API (``HF_ENDPOINT`` = a local uvicorn),
  8 workers (its default), one stream per file from the presigned URL of each ``resolve`` 302; then
  the client checks the sha256 of every downloaded file against the LFS oid of the repo tree
  (huggingface_hub itself checks sizes only).
- **raw**: boto3 ``get_object`` of the same blob keys, 8 files at a time, one stream each; no hashing.

Ratio = raw seconds / hub seconds (1.00 = parity; the issue's target is ≥ 0.9). The API's successful
response bodies are counted by an ASGI wrapper: the resolve answers must total 0 bytes.
The API runs in its own process, as deployed. Catalog: SQLite; store: the embedded SeaweedFS on
loopback. Rounds alternate hub/raw; the median is reported.
Usage: ``python -m benchmarks.hub_snapshot [--shards 8 --shard-mib 32 --rounds 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "hub_snapshot.md"
REPO = "bench/sharded"
WORKERS = 8


def build_model(dest: Path, shards: int, shard_mib: int) -> int:
    """``shards`` safetensors files of random fp32 tensors, an index and a config."""
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    n = shard_mib * 2**20 // 4
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({f"layer{i}.weight": torch.randn(n, generator=g)}, str(dest / name))
        weight_map[f"layer{i}.weight"] = name
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return sum(p.stat().st_size for p in dest.iterdir())


class CountingApp:
    """Body bytes of successful responses, per method and path (ASGI wrapper)."""

    def __init__(self, app: Any) -> None:
        self.app, self.bytes, self.lock = app, {}, threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key, status = (
            f"{scope['method']} {scope['path'].split('/resolve/')[0]}{'/resolve' if '/resolve/' in scope['path'] else ''}",
            [0],
        )

        async def counting(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and status[0] < 400:
                with self.lock:
                    self.bytes[key] = self.bytes.get(key, 0) + len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)


def start_api_process(settings: Any, counts_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """The API in its own process (as deployed: the client's threads do not share its GIL), over the
    same catalog and store, wrapped in ``CountingApp``; it writes its counts on SIGINT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else ""
    env = dict(
        os.environ,
        BENCH_HUB_SETTINGS=settings.model_dump_json(),
        BENCH_HUB_S3_SECRET=secret,  # model_dump_json masks secrets
        BENCH_HUB_COUNTS=str(counts_path),
    )
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.hub_snapshot", "--serve", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return url, child
        except OSError:
            time.sleep(0.1)
    child.kill()
    raise RuntimeError("API process did not start")


def serve(port: int) -> None:
    import uvicorn

    from weightstore import bootstrap
    from weightstore.settings import Settings
    from weightstore_api.app import create_app

    raw = json.loads(os.environ["BENCH_HUB_SETTINGS"])
    raw["s3_secret_access_key"] = os.environ.get("BENCH_HUB_S3_SECRET", raw.get("s3_secret_access_key"))
    running = bootstrap.start(Settings(**raw), migrate=False, create_bucket=False)
    counter = CountingApp(create_app(running.ctx))
    try:
        uvicorn.run(counter, host="127.0.0.1", port=port, log_level="warning")
    finally:
        Path(os.environ["BENCH_HUB_COUNTS"]).write_text(json.dumps(counter.bytes))
        running.close()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mib", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: the API child process
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return

    import boto3
    from botocore.config import Config

    from weightstore import auth, basemodels, bootstrap
    from weightstore.db import session_scope
    from weightstore.objectstore import blob_key
    from weightstore.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp_s:
        tmp = Path(tmp_s)
        total = build_model(tmp / "model", args.shards, args.shard_mib)
        settings = Settings(data_dir=tmp / "var", embedded_gc=False, embedded_worker=False, log_json=False)
        running = bootstrap.start(settings)
        child: subprocess.Popen[bytes] | None = None
        try:
            ctx = running.ctx
            now = ctx.clock.now()
            with session_scope(ctx.engine) as s:
                admin_key = auth.create_key(s, tenant="ops", role="admin", now=now)[1]
                reader_key = auth.create_key(s, tenant="acme", role="reader", now=now)[1]
                admin = auth.authenticate(s, admin_key, now=now)
            basemodels.register(ctx, admin, REPO, tmp / "model")
            with session_scope(ctx.engine) as s:
                manifest = {f.path: (f.sha256, f.size_bytes) for f in basemodels.files_of(s, REPO)}

            url, child = start_api_process(ctx.settings, tmp / "api-counts.json")
            os.environ.update({"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
            import huggingface_hub.constants as c
            from huggingface_hub import HfApi, snapshot_download

            c.ENDPOINT, c.HF_HUB_OFFLINE = url, False
            c.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"

            secret = ctx.settings.s3_secret_access_key
            s3 = boto3.client(
                "s3",
                endpoint_url=ctx.settings.s3_endpoint_url,
                aws_access_key_id=ctx.settings.s3_access_key_id,
                aws_secret_access_key=secret.get_secret_value() if secret else None,
                config=Config(s3={"addressing_style": "path"}, max_pool_connections=WORKERS * 2),
            )

            def raw_round(dest: Path) -> float:
                dest.mkdir()

                def get(item: tuple[str, tuple[str, int]]) -> None:
                    path, (sha, _) = item
                    body = s3.get_object(Bucket=ctx.settings.s3_bucket, Key=blob_key(sha))["Body"]
                    with (dest / path).open("wb") as f:
                        for chunk in body.iter_chunks(10 * 2**20):
                            f.write(chunk)

                t = time.perf_counter()
                with ThreadPoolExecutor(WORKERS) as pool:
                    list(pool.map(get, manifest.items()))
                return time.perf_counter() - t

            def hub_round(cache: Path) -> tuple[float, float]:
                t = time.perf_counter()
                local = Path(snapshot_download(REPO, token=reader_key, cache_dir=cache, max_workers=WORKERS))
                fetched = time.perf_counter() - t
                tree = {
                    f.path: f.lfs.sha256
                    for f in HfApi(endpoint=url, token=reader_key).list_repo_tree(REPO, recursive=True)
                    if hasattr(f, "lfs") and f.lfs
                }
                with ThreadPoolExecutor(WORKERS) as pool:  # hashlib releases the GIL: files hash in parallel
                    got = dict(zip(tree, pool.map(lambda p: sha256_of(local / p), tree), strict=True))
                bad = [p for p, sha in tree.items() if got[p] != sha]
                assert not bad and len(tree) == len(manifest), bad
                return fetched, time.perf_counter() - t

            def metadata_round() -> float:
                """What snapshot_download asks the API before the bytes: repo info, tree, one HEAD per file."""
                from huggingface_hub import get_hf_file_metadata, hf_hub_url

                t = time.perf_counter()
                api = HfApi(endpoint=url, token=reader_key)
                sha = api.repo_info(REPO).sha
                files = [f.path for f in api.list_repo_tree(REPO, revision=sha, recursive=True)]
                with ThreadPoolExecutor(WORKERS) as pool:
                    list(pool.map(lambda p: get_hf_file_metadata(hf_hub_url(REPO, p, revision=sha), token=reader_key), files))
                return time.perf_counter() - t

            def presigned_round(dest: Path) -> float:
                """The presigned URLs alone, fetched with huggingface_hub's own ``http_get``, 8 at a time:
                isolates the client library's streaming cost from the protocol's round trips."""
                from huggingface_hub import get_hf_file_metadata, hf_hub_url
                from huggingface_hub.file_download import http_get

                dest.mkdir()
                locations = {p: get_hf_file_metadata(hf_hub_url(REPO, p), token=reader_key).location for p in manifest}

                def fetch(p: str) -> None:
                    with (dest / p).open("wb") as f:
                        http_get(locations[p], f)

                t = time.perf_counter()
                with ThreadPoolExecutor(WORKERS) as pool:
                    list(pool.map(fetch, manifest))
                return time.perf_counter() - t

            raw_s, hub_s, hub_checked_s, presigned_s = [], [], [], []
            meta_s = statistics.median(metadata_round() for _ in range(5))
            for r in range(args.rounds):
                fetched, checked = hub_round(tmp / f"cache-{r}")
                hub_s.append(fetched)
                hub_checked_s.append(checked)
                raw_s.append(raw_round(tmp / f"raw-{r}"))
                presigned_s.append(presigned_round(tmp / f"presigned-{r}"))
            child.send_signal(signal.SIGINT)
            child.wait(timeout=60)
            child = None
            counts: dict[str, int] = json.loads((tmp / "api-counts.json").read_text())
            resolve_bytes = sum(n for k, n in counts.items() if k.endswith("/resolve"))
            api_bytes = sum(counts.values())
        finally:
            if child is not None:
                child.kill()
            running.close()

    mb = total / 1e6
    raw, hub, checked = statistics.median(raw_s), statistics.median(hub_s), statistics.median(hub_checked_s)
    pre = statistics.median(presigned_s)
    lines = [
        "# Hub read: snapshot_download vs raw boto3, same objects, same store",
        "",
        f"{args.shards} safetensors shards of {args.shard_mib} MiB + index + config ({mb:.0f} MB); embedded SeaweedFS "
        f"on loopback, SQLite catalog; {WORKERS} parallel files on both sides; median of {args.rounds} alternating rounds.",
        "",
        "| what | seconds | MB/s | raw / this |",
        "|---|---:|---:|---:|",
        f"| raw boto3 `get_object`, {WORKERS} files at a time | {raw:.2f} | {mb / raw:.0f} | 1.00 |",
        f"| `snapshot_download` via weightstore (302 → presigned GET) | {hub:.2f} | {mb / hub:.0f} | {raw / hub:.2f} |",
        f"| ... plus the client's sha256 check of every file against the tree's LFS oid | {checked:.2f} | {mb / checked:.0f} | "
        f"{raw / checked:.2f} |",
        f"| the same presigned URLs with huggingface_hub's `http_get` (no API calls) | {pre:.2f} | {mb / pre:.0f} | "
        f"{raw / pre:.2f} |",
        f"| API calls only (repo info, tree, {len(manifest)} HEAD resolve → 302) | {meta_s:.2f} | | |",
        "",
        f"Bytes in successful API response bodies over all rounds: {api_bytes:,} (JSON: repo info, trees); of them in "
        f"`resolve` answers: {resolve_bytes:,}. File bytes downloaded: {total * args.rounds:,}.",
        f"Raw rounds: {', '.join(f'{x:.2f}' for x in raw_s)} s; hub rounds: {', '.join(f'{x:.2f}' for x in hub_s)} s.",
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert resolve_bytes == 0


if __name__ == "__main__":
    main()
