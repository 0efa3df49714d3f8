"""PyTorch Distributed Checkpoint through weightstore vs DCP's own ``FileSystemWriter`` onto local
disk vs s3torchconnector's DCP writer to the same SeaweedFS (issue 14, part 2), one run, same state:

- ``local disk``: ``FileSystemWriter`` (fsync on) / ``FileSystemReader`` into a temp directory;
- ``weightstore``: ``WeightstoreStorageWriter`` (presigned PUTs straight to SeaweedFS, one commit) /
  ``WeightstoreStorageReader`` (verified ranged GETs); loads timed twice: right after the save (no
  chunk digests yet for single-PUT blobs: each file fetched whole and checked against its sha256)
  and after the server backfilled chunk digests (each chunk verified as it lands);
- ``s3torchconnector``: ``S3StorageWriter``/``S3StorageReader`` (AWS's Rust/CRT client) with the
  SeaweedFS endpoint, path-style, 8 writer threads, to its own bucket on the same store. Only when
  ``s3torchconnector`` (with ``tenacity``) is importable: it is not a project dependency; install it
  into a scratch target dir and put that on ``PYTHONPATH`` for the run;
- ``Client.upload``: the same bytes as one safetensors file through the ordinary save path
  (reference for what the service and store sustain here);
- ``weightstore, unchanged``: the same state saved again under a new name (dedup: 0 data bytes move).

Also a time breakdown of the weightstore save (serialising and hashing into temp files, adding and
sending the files, the commit), by wrapping the writer's steps. Peak RSS of each step is the
process's ``VmHWM`` after resetting it (``/proc/self/clear_refs``), so it includes the state
itself (about ``--size-mib``). Single process (DCP without a process group: one rank), so the
figures are the storage path alone. Usage: ``python -m benchmarks.dcp_save_load [--size-mib 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import serve_stack

MiB = 1024 * 1024
S3T_BUCKET = "s3torch"


def _hwm_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _hwm_mib() -> float:
    return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from weightstore.client import Client
    from weightstore.integrations import dcp as ws_dcp
    from weightstore.integrations.dcp import WeightstoreStorageReader, WeightstoreStorageWriter

    g = torch.Generator().manual_seed(14)
    n = args.size_mib * MiB // 4 // 32  # 32 fp32 tensors: weights and two Adam moments
    state = {f"layer{i}.{k}": torch.randn(n, generator=g) for i in range(32 // 4) for k in ("w", "b", "m", "v")}
    nbytes = sum(t.numel() * 4 for t in state.values())

    def target() -> dict[str, torch.Tensor]:
        return {k: torch.empty_like(v) for k, v in state.items()}

    rows: dict[str, float] = {}
    rss: dict[str, float] = {}

    def timed(label: str, fn) -> float:  # type: ignore[no-untyped-def]
        _hwm_reset()
        t = time.perf_counter()
        fn()
        rows[label] = time.perf_counter() - t
        rss[label] = _hwm_mib()
        return rows[label]

    # Where the weightstore save spends its time: wrap the writer's steps (single process: one thread).
    parts: dict[str, float] = {
        "serialise (torch.save into bytes)": 0.0,
        "add files + send": 0.0,
        "commit": 0.0,
        "fetch + verify (per file, in turn)": 0.0,
        "apply (torch.load + copy into the state)": 0.0,
    }

    def wrap(obj: Any, attr: str, label: str) -> None:
        real = getattr(obj, attr)

        def timed_call(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                parts[label] += time.perf_counter() - t

        setattr(obj, attr, timed_call)

    wrap(ws_dcp, "_serialise", "serialise (torch.save into bytes)")
    wrap(ws_dcp, "_send", "add files + send")
    wrap(Client, "commit_upload", "commit")
    wrap(WeightstoreStorageReader, "_fetch", "fetch + verify (per file, in turn)")
    wrap(ws_dcp, "_apply", "apply (torch.load + copy into the state)")

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ws-dcp-"))
    local = work / "local"
    timed("local disk save", lambda: dcp.save(state, storage_writer=FileSystemWriter(local)))
    got = target()
    timed("local disk load", lambda: dcp.load(got, storage_reader=FileSystemReader(local)))
    assert all(torch.equal(got[k], v) for k, v in state.items())
    shutil.rmtree(local)

    stack = serve_stack.start(work, buckets=[S3T_BUCKET])
    s3t_error = None
    try:
        url, key = stack.url, stack.new_key("bench")
        c = Client(url, key, progress=False)
        run = c.create_run("bench-base")["run_id"]
        w = WeightstoreStorageWriter(url=url, api_key=key, run_id=run, name="s1", transfer="presigned")
        timed("weightstore save", lambda: dcp.save(state, storage_writer=w))
        save_parts = {k: v for k, v in parts.items() if k in ("serialise (torch.save into bytes)", "add files + send", "commit")}
        got = target()
        r1 = WeightstoreStorageReader(url=url, api_key=key, path=w.tinker_path)
        timed("weightstore load (whole-file sha256)", lambda: dcp.load(got, storage_reader=r1))
        assert all(torch.equal(got[k], v) for k, v in state.items())
        t = time.perf_counter()
        while not all(f["chunk_sha256"] for f in c.file_urls(w.tinker_path or "")["files"] if f["path"] != ".metadata"):
            time.sleep(0.5)
        rows["server chunk backfill (not on any client's path)"] = time.perf_counter() - t
        got = target()
        r2 = WeightstoreStorageReader(url=url, api_key=key, path=w.tinker_path)
        parts["fetch + verify (per file, in turn)"] = parts["apply (torch.load + copy into the state)"] = 0.0
        timed("weightstore load (chunk-verified ranges)", lambda: dcp.load(got, storage_reader=r2))
        load_parts = {k: parts[k] for k in ("fetch + verify (per file, in turn)", "apply (torch.load + copy into the state)")}
        assert all(torch.equal(got[k], v) for k, v in state.items()) and r2.ranged
        try:
            s3t = _s3torch(stack)
        except ImportError as exc:
            s3t, s3t_error = None, f"not importable: {exc}"
        if s3t is not None:
            writer, reader = s3t
            try:
                timed("s3torchconnector save", lambda: dcp.save(state, storage_writer=writer()))
                got = target()
                timed("s3torchconnector load", lambda: dcp.load(got, storage_reader=reader()))
                assert all(torch.equal(got[k], v) for k, v in state.items())
            except Exception as exc:  # noqa: BLE001 - reported, not fatal: the other rows stand
                s3t_error = f"{type(exc).__name__}: {exc}"[:500]
        # Reference: the service's ordinary save of the same bytes as one safetensors file
        # (Client.upload, presigned), by a fresh tenant so nothing is deduplicated.
        from weightstore import tensorio

        blob = tensorio.weights_bytes(state)
        c2 = Client(url, stack.new_key("bench-ref"), progress=False, transfer="presigned")
        run2 = c2.create_run("bench-base")["run_id"]
        ref = {"adapter_model.safetensors": blob, "adapter_config.json": b'{"r": 8, "lora_alpha": 8}'}
        timed("Client.upload of the same bytes (safetensors)", lambda: c2.upload(run2, "sampler", "ref", ref))
        ref.clear()
        blob = b""
        w2 = WeightstoreStorageWriter(url=url, api_key=key, run_id=run, name="s2", transfer="presigned")
        timed("weightstore save, unchanged state", lambda: dcp.save(state, storage_writer=w2))
        sent2 = w2.bytes_sent
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    out = {
        "bytes": nbytes,
        "load_average_before_after": [load_before, load_after],
        "seconds": rows,
        "MiB_per_s": {k: nbytes / MiB / v for k, v in rows.items() if "backfill" not in k},
        "peak_rss_mib": rss,
        "weightstore_save_breakdown_s": save_parts,
        "weightstore_chunk_verified_load_breakdown_s": load_parts,
        "ratio_vs_local": {
            "save": rows["local disk save"] / rows["weightstore save"],
            "save vs Client.upload": rows["Client.upload of the same bytes (safetensors)"] / rows["weightstore save"],
            "load (chunk-verified)": rows["local disk load"] / rows["weightstore load (chunk-verified ranges)"],
            "load (whole-file)": rows["local disk load"] / rows["weightstore load (whole-file sha256)"],
            **(
                {
                    "s3torchconnector save": rows["local disk save"] / rows["s3torchconnector save"],
                    "s3torchconnector load": rows["local disk load"] / rows["s3torchconnector load"],
                    "weightstore save / s3torchconnector save": rows["s3torchconnector save"] / rows["weightstore save"],
                    "weightstore load (chunk-verified) / s3torchconnector load": rows["s3torchconnector load"]
                    / rows["weightstore load (chunk-verified ranges)"],
                }
                if "s3torchconnector load" in rows
                else {}
            ),
        },
        "s3torchconnector_error": s3t_error,
        "unchanged_save_bytes_sent": sent2,
    }
    print(json.dumps(out, indent=2))


def _s3torch(stack: serve_stack.ServeStack) -> tuple[Any, Any]:
    """Factories for s3torchconnector's DCP writer and reader on SeaweedFS (its writer takes no
    endpoint: the file system's client is replaced by one that has it, path-style)."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

    os.environ.update(
        {"AWS_ACCESS_KEY_ID": stack.access, "AWS_SECRET_ACCESS_KEY": stack.secret, "AWS_EC2_METADATA_DISABLED": "true"}
    )
    cfg = S3ClientConfig(force_path_style=True)
    path = f"s3://{S3T_BUCKET}/ckpt"

    def client() -> Any:
        return S3Client("us-east-1", endpoint=stack.endpoint, s3client_config=cfg)

    def writer() -> Any:
        w = S3StorageWriter("us-east-1", path, s3client_config=cfg, thread_count=8)
        w.fs._client = client()
        return w

    def reader() -> Any:
        r = S3StorageReader("us-east-1", path, s3client_config=cfg)
        r.fs._client = client()
        return r

    return writer, reader


if __name__ == "__main__":
    main()
