"""Export-job benchmark (issue 5, "full job through the object store"), side by side in one run:

1. the local conversion alone (``weightstore.export.export_merged`` on local directories);
2. a raw boto3 transfer of the same bytes a job moves (download adapter + base, upload output);
3. a full merged-export job through the catalog and the object store, cold (base model not in the
   worker's cache) and warm (cached), run by ``exportjobs.run_one`` as a worker does.

Overhead = job − (conversion + raw transfer). Catalog: SQLite; store: SeaweedFS on loopback.
Usage: ``python -m benchmarks.bench_export_job [--hidden 1024 --layers 8]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import boto3
import torch
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from weightstore import auth, basemodels, bootstrap, exportjobs, runs, tensorio, uploads
from weightstore.db import session_scope
from weightstore.export import export_merged
from weightstore.settings import Settings

RESULTS = Path(__file__).parent / "results" / "export_job.md"


def build_base(dest: Path, hidden: int, layers: int, vocab: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dest, max_shard_size=f"{max(1, model.num_parameters() * 2 // 4 // 2**20)}MB")
    return sum(p.stat().st_size for p in dest.iterdir())


def build_adapter(dest: Path, hidden: int, layers: int, rank: int, kv: int) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(1)
    w = {}
    outs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    for layer in range(layers):
        for proj, out in outs.items():
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            w[f"{pre}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.01
            w[f"{pre}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    files = {
        "adapter_model.safetensors": tensorio.weights_bytes(w),
        "adapter_config.json": json.dumps(
            {"r": rank, "lora_alpha": rank, "target_modules": sorted(outs), "base_model_name_or_path": "bench"}
        ).encode(),
    }
    dest.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (dest / k).write_bytes(v)
    return files


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_s:
        tmp = Path(tmp_s)
        base_dir, adapter_dir = tmp / "base", tmp / "adapter"
        base_bytes = build_base(base_dir, args.hidden, args.layers, args.vocab)
        kv = max(1, args.hidden // 256) * 64
        files = build_adapter(adapter_dir, args.hidden, args.layers, args.rank, kv)

        t = time.perf_counter()
        export_merged(adapter_dir, base_dir, tmp / "local-out")
        local_s = time.perf_counter() - t
        out_bytes = dir_bytes(tmp / "local-out")

        settings = Settings(data_dir=tmp / "var", embedded_gc=False, embedded_worker=False, log_json=False)
        running = bootstrap.start(settings)
        try:
            ctx = running.ctx
            now = ctx.clock.now()
            with session_scope(ctx.engine) as s:
                admin_key = auth.create_key(s, tenant="ops", role="admin", now=now)[1]
                trainer_key = auth.create_key(s, tenant="acme", role="trainer", now=now)[1]
                admin = auth.authenticate(s, admin_key, now=now)
                trainer = auth.authenticate(s, trainer_key, now=now)
            t = time.perf_counter()
            basemodels.register(ctx, admin, "bench", base_dir)
            register_s = time.perf_counter() - t
            with session_scope(ctx.engine) as s:
                run = runs.create_run(s, trainer, base_model="bench", now=now)
            import hashlib

            ans = uploads.declare(
                ctx,
                trainer,
                uploads.UploadRequest(
                    run.id,
                    "sampler",
                    "step-1",
                    [uploads.DeclaredFile(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()],
                ),
            )
            for f in ans.files:
                uploads.receive_bytes(ctx, trainer, ans.upload_id, f.path, files[f.path])
            src = uploads.commit(ctx, trainer, ans.upload_id).tinker_path

            # raw boto3: the same bytes a job moves (adapter + base down, output up)
            s3 = boto3.client(
                "s3",
                endpoint_url=ctx.settings.s3_endpoint_url,
                aws_access_key_id=ctx.settings.s3_access_key_id,
                aws_secret_access_key=ctx.settings.s3_secret_access_key.get_secret_value(),  # type: ignore[union-attr]
                config=Config(s3={"addressing_style": "path"}),
            )
            tc = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=8)
            bucket = ctx.settings.s3_bucket
            inputs = [adapter_dir / k for k in files] + [p for p in base_dir.iterdir() if p.is_file()]
            for i, p in enumerate(inputs):
                s3.upload_file(str(p), bucket, f"raw/in/{i}", Config=tc)
            t = time.perf_counter()
            for i, _p in enumerate(inputs):
                s3.download_file(bucket, f"raw/in/{i}", str(tmp / f"raw-{i}"), Config=tc)
            for i, p in enumerate(sorted((tmp / "local-out").iterdir())):
                s3.upload_file(str(p), bucket, f"raw/out/{i}", Config=tc)
            raw_s = time.perf_counter() - t

            timings = {}
            for label, name in (("cold", "m-cold"), ("warm", "m-warm")):
                job = exportjobs.submit(ctx, trainer, src, target="merged", output_name=name)
                t = time.perf_counter()
                state = exportjobs.run_one(ctx, "bench")
                timings[label] = time.perf_counter() - t
                assert state == "succeeded", (state, job.id)
        finally:
            running.close()

    mb = 1e6
    moved = (sum(len(v) for v in files.values()) + base_bytes + out_bytes) / mb
    lines = [
        "# Export job: full job through the object store vs its parts",
        "",
        f"Llama-shaped bf16 base: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
        f"({base_bytes / mb:.0f} MB, 4 shards); rank-{args.rank} adapter on attention; merged output "
        f"{out_bytes / mb:.0f} MB. SeaweedFS on loopback, SQLite catalog, 2 cores.",
        "",
        "| what | seconds | vs raw transfer + conversion |",
        "|---|---:|---:|",
        f"| local conversion (`export_merged`, verified) | {local_s:.2f} | |",
        f"| raw boto3 transfer of the same {moved:.0f} MB (down adapter+base, up output) | {raw_s:.2f} | |",
        f"| raw transfer + conversion | {raw_s + local_s:.2f} | 1.00× |",
        f"| full job, cold cache (download base, verify sha256, convert, upload, commit) | {timings['cold']:.2f} | "
        f"{timings['cold'] / (raw_s + local_s):.2f}× |",
        f"| full job, warm cache (base already on the worker) | {timings['warm']:.2f} | "
        f"{timings['warm'] / (raw_s + local_s):.2f}× |",
        f"| base model registration (hash + verified upload) | {register_s:.2f} | |",
        "",
        f"Overhead of the cold job over raw transfer + conversion: {timings['cold'] - raw_s - local_s:+.2f} s "
        "(sha256 of every byte on download and upload, format validation at commit, catalog writes).",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
