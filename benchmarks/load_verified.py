"""Verified parallel loads (issue 14, part 1), side by side in one run, same bucket, same bytes:

- ``weightstore verified``: ``Client.load_weights`` (ranged GETs, per-chunk sha256 on all cores,
  tensors on the filled buffer);
- ``weightstore before #14``: the loader this issue replaced (one streamed GET, in-order sha256,
  ``safetensors.load`` of the joined bytes), kept as ``Client.read_file`` + ``tensorio.load_weights``;
- ``boto3 ranged (unverified)``: 16 MiB ranged GETs on 4 threads into one buffer, no hashing;
- ``Run:ai streamer (unverified)``: ``runai_model_streamer.SafetensorsStreamer`` on the blob's
  ``s3://`` key, concurrency 8 (only when ``runai-model-streamer[s3]`` is installed: it is not a
  project dependency; ``pip install 'runai-model-streamer[s3]'`` into the venv to include it).

Each reader runs in its own process (so peak RSS is its own) against one SeaweedFS and one
``weightstore serve``. Usage: ``python -m benchmarks.load_verified [--size-mib 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import serve_stack

MiB = 1024 * 1024


def child(mode: str, cfg: dict[str, str]) -> None:
    """One reader, timed from first request to tensors in memory; prints JSON."""
    import torch

    t = time.perf_counter()
    n = 0
    if mode == "verified":
        from weightstore.client import Client

        with Client(cfg["url"], cfg["key"], progress=False) as c:
            tensors = c.load_weights(cfg["path"])
        n = sum(v.numel() * v.element_size() for v in tensors.values())
    elif mode == "before":
        from weightstore import tensorio
        from weightstore.client import Client

        with Client(cfg["url"], cfg["key"], progress=False) as c:
            tensors = tensorio.load_weights(c.read_file(cfg["path"], "adapter_model.safetensors"))
        n = sum(v.numel() * v.element_size() for v in tensors.values())
    elif mode == "boto3":
        from concurrent.futures import ThreadPoolExecutor

        import boto3
        from botocore.config import Config

        s3 = boto3.client(
            "s3",
            endpoint_url=cfg["endpoint"],
            aws_access_key_id=cfg["access"],
            aws_secret_access_key=cfg["secret"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=8),
        )
        size = int(cfg["size"])
        buf = bytearray(size)

        def get(o: int) -> None:
            end = min(o + 16 * MiB, size) - 1
            buf[o : end + 1] = s3.get_object(Bucket=cfg["bucket"], Key=cfg["blob_key"], Range=f"bytes={o}-{end}")["Body"].read()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(get, range(0, size, 16 * MiB)))
        n = size
    elif mode == "runai":
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": cfg["endpoint"],
                "AWS_ACCESS_KEY_ID": cfg["access"],
                "AWS_SECRET_ACCESS_KEY": cfg["secret"],
                "AWS_DEFAULT_REGION": "us-east-1",
                "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                "AWS_EC2_METADATA_DISABLED": "true",
                "RUNAI_STREAMER_CONCURRENCY": "8",
            }
        )
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_files([f"s3://{cfg['bucket']}/{cfg['blob_key']}"])
            for _name, tensor in streamer.get_tensors():
                n += tensor.numel() * tensor.element_size()
    dt = time.perf_counter() - t
    del torch
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    hwm = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    print(json.dumps({"seconds": dt, "bytes": n, "peak_rss_mib": hwm / 1024}))


def _fmt(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--child", default=None)
    ap.add_argument("--cfg", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child, json.loads(args.cfg))

    import torch

    from weightstore import tensorio
    from weightstore.client import Client
    from weightstore.objectstore import blob_key

    work = Path(tempfile.mkdtemp(prefix="ws-load-"))
    stack = serve_stack.start(work)
    try:
        url, key = stack.url, stack.new_key("bench")
        g = torch.Generator().manual_seed(14)
        per = args.size_mib * MiB // 64 // 2
        weights = {f"model.layers.{i}.w": torch.randn(per, generator=g).to(torch.bfloat16) for i in range(64)}
        data = tensorio.weights_bytes(weights)
        del weights
        c = Client(url, key, progress=False)
        run = c.create_run("bench-base")["run_id"]
        files = {"adapter_model.safetensors": data, "adapter_config.json": b'{"r": 32, "lora_alpha": 32}'}
        path = str(c.upload(run, "sampler", "w", files)["tinker_path"])
        import hashlib

        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        del data
        t = time.perf_counter()
        while True:  # presigned save: the files request has the server backfill the chunk digests
            ans = next(f for f in c.file_urls(path)["files"] if f["path"] == "adapter_model.safetensors")
            if ans["chunk_sha256"]:
                break
            time.sleep(0.5)
        backfill_s = time.perf_counter() - t
        cfg = {
            "url": url,
            "key": key,
            "path": path,
            "endpoint": stack.endpoint,
            "access": stack.access,
            "secret": stack.secret,
            "bucket": "weightstore",
            "blob_key": blob_key(sha),
            "size": str(size),
        }
        load_before = os.getloadavg()
        modes = ["boto3", "verified", "before"]
        try:
            import runai_model_streamer  # noqa: F401

            modes.append("runai")
        except ImportError:
            print("runai-model-streamer not installed: skipped", file=sys.stderr)
        rows = {}
        for mode in modes:
            os.sync()
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.load_verified", "--child", mode, "--cfg", json.dumps(cfg)],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                print(f"{mode} failed: {out.stderr[-1500:]}", file=sys.stderr)
                continue
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        load_after = os.getloadavg()
        fastest = max(r["bytes"] / MiB / r["seconds"] for m, r in rows.items() if m in ("boto3", "runai"))
        names = {
            "verified": "weightstore verified (this issue)",
            "before": "weightstore before #14",
            "boto3": "boto3 ranged 16 MiB x4 (unverified)",
            "runai": "Run:ai streamer c=8 (unverified)",
        }
        verified = {"verified": "100 %", "before": "100 %", "boto3": "0", "runai": "0"}
        print(f"\n{size / MiB:.0f} MiB bf16 safetensors; chunk digests ready {backfill_s:.1f} s after the first files request")
        print(f"load average (1/5/15 min) before {_fmt(load_before)}, after {_fmt(load_after)}; {os.cpu_count()} cores\n")
        print("| Reader | Bytes verified | Time (s) | MiB/s | × fastest unverified | Peak RSS (MiB) |")
        print("|---|---|---|---|---|---|")
        for mode, r in rows.items():
            mibs = r["bytes"] / MiB / r["seconds"]
            rss = r["peak_rss_mib"]
            print(f"| {names[mode]} | {verified[mode]} | {r['seconds']:.2f} | {mibs:.0f} | {mibs / fastest:.2f} | {rss:.0f} |")
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)  # SeaweedFS data: the file's size, once per run


if __name__ == "__main__":
    main()
