"""PyTorch Distributed Checkpoint through weightstore vs DCP's own ``FileSystemWriter`` onto local
disk (issue 14, part 2), one run, same state, side by side:

- ``local disk``: ``FileSystemWriter`` (fsync on) / ``FileSystemReader`` into a temp directory;
- ``weightstore``: ``WeightstoreStorageWriter`` (presigned PUTs straight to SeaweedFS, one commit) /
  ``WeightstoreStorageReader`` (verified ranged GETs); loads timed twice: right after the save (no
  chunk digests yet for presigned blobs: each file fetched whole and checked against its sha256) and
  after the server backfilled chunk digests (each chunk verified as it lands);
- ``Client.upload``: the same bytes as one safetensors file through the ordinary save path
  (reference for what the service and store sustain here);
- ``weightstore, unchanged``: the same state saved again under a new name (dedup: 0 data bytes move).

s3torchconnector's DCP writer is not included (not a project dependency, and not installable offline
here). Single process (DCP without a process group: one rank writes one file), so the figures are
the storage path alone. Usage: ``python -m benchmarks.dcp_save_load [--size-mib 1024]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks import serve_stack

MiB = 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from weightstore.client import Client
    from weightstore.integrations.dcp import WeightstoreStorageReader, WeightstoreStorageWriter

    g = torch.Generator().manual_seed(14)
    n = args.size_mib * MiB // 4 // 32  # 32 fp32 tensors: weights and two Adam moments
    state = {f"layer{i}.{k}": torch.randn(n, generator=g) for i in range(32 // 4) for k in ("w", "b", "m", "v")}
    nbytes = sum(t.numel() * 4 for t in state.values())

    def target() -> dict[str, torch.Tensor]:
        return {k: torch.empty_like(v) for k, v in state.items()}

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    rows: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="ws-dcp-"))
    local = work / "local"
    rows["local disk save"] = timed(lambda: dcp.save(state, storage_writer=FileSystemWriter(local)))
    got = target()
    rows["local disk load"] = timed(lambda: dcp.load(got, storage_reader=FileSystemReader(local)))
    assert all(torch.equal(got[k], v) for k, v in state.items())
    shutil.rmtree(local)

    stack = serve_stack.start(work)
    try:
        url, key = stack.url, stack.new_key("bench")
        c = Client(url, key, progress=False)
        run = c.create_run("bench-base")["run_id"]
        w = WeightstoreStorageWriter(url=url, api_key=key, run_id=run, name="s1")
        rows["weightstore save"] = timed(lambda: dcp.save(state, storage_writer=w))
        got = target()
        r1 = WeightstoreStorageReader(url=url, api_key=key, path=w.tinker_path)
        rows["weightstore load (whole-file sha256)"] = timed(lambda: dcp.load(got, storage_reader=r1))
        assert all(torch.equal(got[k], v) for k, v in state.items())
        t = time.perf_counter()
        while not all(f["chunk_sha256"] for f in c.file_urls(w.tinker_path or "")["files"] if f["path"] != ".metadata"):
            time.sleep(0.5)
        rows["server chunk backfill (not on any client's path)"] = time.perf_counter() - t
        got = target()
        r2 = WeightstoreStorageReader(url=url, api_key=key, path=w.tinker_path)
        rows["weightstore load (chunk-verified ranges)"] = timed(lambda: dcp.load(got, storage_reader=r2))
        assert all(torch.equal(got[k], v) for k, v in state.items()) and r2.ranged
        # Reference: the service's ordinary save of the same bytes as one safetensors file
        # (Client.upload, presigned), by a fresh tenant so nothing is deduplicated.
        from weightstore import tensorio

        blob = tensorio.weights_bytes(state)
        c2 = Client(url, stack.new_key("bench-ref"), progress=False)
        run2 = c2.create_run("bench-base")["run_id"]
        ref = {"adapter_model.safetensors": blob, "adapter_config.json": b'{"r": 8, "lora_alpha": 8}'}
        rows["Client.upload of the same bytes (safetensors)"] = timed(lambda: c2.upload(run2, "sampler", "ref", ref))
        w2 = WeightstoreStorageWriter(url=url, api_key=key, run_id=run, name="s2")
        rows["weightstore save, unchanged state"] = timed(lambda: dcp.save(state, storage_writer=w2))
        sent2 = w2.bytes_sent
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "bytes": nbytes,
        "seconds": rows,
        "MiB_per_s": {k: nbytes / MiB / v for k, v in rows.items() if "backfill" not in k},
        "ratio_vs_local": {
            "save": rows["local disk save"] / rows["weightstore save"],
            "save vs Client.upload": rows["Client.upload of the same bytes (safetensors)"] / rows["weightstore save"],
            "load (chunk-verified)": rows["local disk load"] / rows["weightstore load (chunk-verified ranges)"],
            "load (whole-file)": rows["local disk load"] / rows["weightstore load (whole-file sha256)"],
        },
        "unchanged_save_bytes_sent": sent2,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
