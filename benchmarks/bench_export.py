"""Merged export: weightstore's streaming merge vs PEFT's path vs a naive shard loop, side by side.

Issue 5's benchmark. A random Llama-shaped base (default ~0.85 B parameters, bf16, 4 shards) and a
rank-32 Tinker adapter on every linear layer are generated once; then each contender runs in its
own subprocess under ``/usr/bin/time -v`` (peak RSS = "Maximum resident set size"):

- **weightstore**: ``weightstore.export.export_merged`` (plan, stream, verify; the forward check is
  skipped above its size threshold, recomputation and the no-op guard run);
- **peft**: ``AutoModelForCausalLM.from_pretrained`` -> ``PeftModel.from_pretrained`` ->
  ``merge_and_unload`` -> ``save_pretrained`` (on the PEFT export of the same adapter, made
  beforehand and not timed);
- **naive shard loop**: ``load_file`` each shard, ``W += scale * B @ A`` in fp32, ``save_file``.

Then the model is doubled (twice the layers and vocabulary, still 4 shards, so every shard
doubles too) and weightstore runs again: its peak RSS must not grow. Results go to stdout and to
``benchmarks/results/export.md`` as a markdown table.

    .venv/bin/python benchmarks/bench_export.py                      # full size (minutes, ~12 GB disk)
    .venv/bin/python benchmarks/bench_export.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "export.md"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (self.intermediate, h),
            "mlp.up_proj": (self.intermediate, h),
            "mlp.down_proj": (h, self.intermediate),
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            out.append((f"{p}.input_layernorm.weight", (self.hidden,)))
            out.extend((f"{p}.{name}.weight", shape) for name, shape in self.linears().items())
            out.append((f"{p}.post_attention_layernorm.weight", (self.hidden,)))
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())


def make_base(path: Path, shape: Shape, shards: int) -> int:
    """Random bf16 Llama checkpoint in ``shards`` files; returns the largest shard's size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    config.dtype = "bfloat16"
    config.save_pretrained(path)
    tensors = shape.tensors()
    total = sum(math.prod(s) * 2 for _, s in tensors)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in tensors:  # cut into `shards` nearly equal files
        if size >= total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, s))
        size += math.prod(s) * 2
    weight_map, largest = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in group}
        save_file(data, path / fname, metadata={"format": "pt"})
        largest = max(largest, (path / fname).stat().st_size)
        weight_map.update({n: fname for n, _ in group})
        del data
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    )
    return largest


def make_adapter(path: Path, shape: Shape, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(shape.layers):
        for name, (out_dim, in_dim) in shape.linears().items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": rank, "base_model_name_or_path": "bench-llama"})
    )


# --- contenders (each runs as `python bench_export.py --run NAME ...` in a child process) ----------


def run_weightstore(adapter: str, base: str, out: str) -> dict[str, object]:
    import resource

    from weightstore.export import export_merged

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    t, c = time.perf_counter(), cpu()
    result = export_merged(adapter, base, out)
    return {
        "call_s": time.perf_counter() - t,
        "call_cpu_s": cpu() - c,
        "write_s": result.write_seconds,
        "bytes": result.bytes_written,
        "verified": result.verification.passed,
        "forward": result.verification.forward.reason,
        "rounding_loss": result.verification.noop.rounding_loss,
    }


def run_peft(adapter: str, base: str, out: str) -> dict[str, object]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    return {"call_s": time.perf_counter() - t, "bytes": sum(p.stat().st_size for p in Path(out).iterdir())}


def run_naive(adapter: str, base: str, out: str) -> dict[str, object]:
    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(Path(adapter) / "adapter_model.safetensors")
    Path(out).mkdir()
    for shard in sorted(Path(base).glob("*.safetensors")):
        tensors = load_file(shard)
        for name, w in tensors.items():
            a = lora.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
            if a is not None:
                b = lora[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
                tensors[name] = (w.float() + scale * (b @ a)).to(w.dtype)
        save_file(tensors, Path(out) / shard.name, metadata={"format": "pt"})
        del tensors
    for f in Path(base).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, Path(out) / f.name)
    return {"call_s": time.perf_counter() - t, "bytes": sum(p.stat().st_size for p in Path(out).iterdir())}


CONTENDERS = {"weightstore": run_weightstore, "peft": run_peft, "naive": run_naive}


def measure(name: str, adapter: Path, base: Path, out: Path) -> dict[str, object]:
    """Run one contender in a fresh process under /usr/bin/time -v."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--run", name, str(adapter), str(base), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr)
    assert rss and wall and user and system
    data["cpu_s"] = float(user.group(1)) + float(system.group(1))
    parts = [float(x) for x in wall.group(1).split(":")]
    data["wall_s"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    data["rss_bytes"] = int(rss.group(1)) * 1024
    shutil.rmtree(out, ignore_errors=True)  # keep disk and page cache pressure down between runs
    return data


def median_run(name: str, adapter: Path, base: Path, out: Path, repeat: int) -> dict[str, object]:
    runs = [measure(name, adapter, base, out) for _ in range(repeat)]
    best = dict(runs[0])
    for key in ("wall_s", "call_s", "rss_bytes", "write_s", "cpu_s", "call_cpu_s"):
        if key in best:
            best[key] = statistics.median(float(r[key]) for r in runs)  # type: ignore[arg-type]
    best["runs"] = [round(float(r["wall_s"]), 2) for r in runs]  # type: ignore[arg-type]
    return best


def load_note() -> str:
    """The machine's load average (the benchmark shares its cores; numbers need this context)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender (median reported)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT contender")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive shard loop")
    ap.add_argument("--no-double", action="store_true", help="skip the doubled model")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--run", nargs=4, metavar=("NAME", "ADAPTER", "BASE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.run:  # child process
        name, adapter, base, out = args.run
        print(json.dumps(CONTENDERS[name](adapter, base, out)))
        return

    shape = Shape(args.hidden, args.intermediate, args.layers, args.vocab, args.heads, args.kv_heads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"generating base: {shape.params / 1e9:.2f} B params bf16 in {args.shards} shards ...", file=sys.stderr)
        largest = make_base(work / "base", shape, args.shards)
        make_adapter(work / "adapter", shape, args.rank)
        rows: list[tuple[str, dict[str, object]]] = []
        print("weightstore ...", file=sys.stderr)
        ours = median_run("weightstore", work / "adapter", work / "base", work / "out", args.repeat)
        rows.append(("weightstore export_merged", ours))
        if not args.no_peft:
            sys.path.insert(0, str(ROOT))
            from weightstore.export import VerifyOptions, export_peft

            export_peft(work / "adapter", work / "base", work / "peft_adapter", verify_options=VerifyOptions(forward_max_bytes=0))
            print("peft ...", file=sys.stderr)
            rows.append(
                (
                    "PEFT load + merge_and_unload + save",
                    median_run("peft", work / "peft_adapter", work / "base", work / "out", args.repeat),
                )
            )
        if not args.no_naive:
            print("naive shard loop ...", file=sys.stderr)
            rows.append(
                (
                    "naive shard loop (load_file/save_file)",
                    median_run("naive", work / "adapter", work / "base", work / "out", args.repeat),
                )
            )
        doubled = None
        if not args.no_double:
            # twice the layers and twice the vocabulary: exactly twice the parameters
            shape2 = Shape(args.hidden, args.intermediate, 2 * args.layers, 2 * args.vocab, args.heads, args.kv_heads)
            shutil.rmtree(work / "base")
            print(f"doubled: {shape2.params / 1e9:.2f} B params ...", file=sys.stderr)
            largest2 = make_base(work / "base2", shape2, args.shards)
            make_adapter(work / "adapter2", shape2, args.rank)
            doubled = (shape2, largest2, median_run("weightstore", work / "adapter2", work / "base2", work / "out", args.repeat))
        report = render(shape, largest, args, rows, doubled)
        print(report)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(report)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def render(
    shape: Shape,
    largest: int,
    args: argparse.Namespace,
    rows: list[tuple[str, dict[str, object]]],
    doubled: tuple[Shape, int, dict[str, object]] | None,
) -> str:
    ours = rows[0][1]
    out_bytes = float(ours["bytes"])  # type: ignore[arg-type]
    lines = [
        "## Merged export (issue 5)",
        "",
        f"Random Llama-shaped base: {shape.params / 1e9:.3f} B params, bf16, {args.shards} shards "
        f"(largest {gb(largest)}), hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}; "
        f"Tinker adapter rank {args.rank} on all 7 linear layers per block. {os.cpu_count()} CPU cores. "
        f"Each contender in its own process under `/usr/bin/time -v`; median of {args.repeat} run(s); "
        f"base files warm in the page cache. Load average when done: {load_note()}.",
        "",
        "| contender | wall (process) | export call | CPU (user+sys) | peak RSS | output MB/s (call) "
        "| time vs weightstore (wall / CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        wall, call, rss = float(r["wall_s"]), float(r["call_s"]), float(r["rss_bytes"])  # type: ignore[arg-type]
        cpu = float(r["cpu_s"])  # type: ignore[arg-type]
        ratio = wall / float(ours["wall_s"])  # type: ignore[arg-type]
        cpu_ratio = cpu / float(ours["cpu_s"])  # type: ignore[arg-type]
        lines.append(
            f"| {name} | {wall:.2f} s | {call:.2f} s | {cpu:.2f} s | {gb(rss)} | {out_bytes / 1e6 / call:.0f} | "
            f"{ratio:.2f}x / {cpu_ratio:.2f}x |"
        )
    budget = 2 * largest + 0.5e9
    rss = float(ours["rss_bytes"])  # type: ignore[arg-type]
    write_s = float(ours["write_s"])  # type: ignore[arg-type]
    lines += [
        "",
        f"- weightstore output: {gb(out_bytes)}; write phase {write_s:.2f} s = **{out_bytes / 1e6 / write_s:.0f} MB/s**"
        f" (whole call incl. planning and verification: {out_bytes / 1e6 / float(ours['call_s']):.0f} MB/s; "  # type: ignore[arg-type]
        f"target >= 500 MB/s).",
        f"- CPU cost of the export call (planning, merge, verification; no imports): "
        f"{float(ours['call_cpu_s']) * 1000 / (out_bytes / 1e6):.2f} ms per output MB, i.e. "  # type: ignore[arg-type]
        f"{out_bytes / 1e6 / float(ours['call_cpu_s']) * (os.cpu_count() or 1):.0f} MB/s if all "  # type: ignore[arg-type]
        f"{os.cpu_count()} cores were ours -- the contention-free estimate on this shared machine.",
        f"- peak RSS {gb(rss)} vs budget 2 x largest shard + 0.5 GB = {gb(budget)}: {'within' if rss <= budget else 'OVER'}.",
        f"- verification: passed={ours['verified']}; forward check: {ours['forward']}; "
        f"rounding loss {float(ours['rounding_loss']):.1%} of the delta norm.",  # type: ignore[arg-type]
    ]
    for name, r in rows[1:]:
        lines.append(
            f"- {name}: weightstore is {float(r['wall_s']) / float(ours['wall_s']):.2f}x faster "  # type: ignore[arg-type]
            f"(process wall; {float(r['cpu_s']) / float(ours['cpu_s']):.2f}x in CPU time) "  # type: ignore[arg-type]
            f"at {rss / float(r['rss_bytes']):.2f}x its peak RSS."
        )  # type: ignore[arg-type]
    if doubled is not None:
        shape2, largest2, r2 = doubled
        rss2 = float(r2["rss_bytes"])  # type: ignore[arg-type]
        call2 = float(r2["call_s"])  # type: ignore[arg-type]
        lines += [
            "",
            "| weightstore, model doubled | params | largest shard | wall | peak RSS | output MB/s (write) |",
            "|---|---:|---:|---:|---:|---:|",
            f"| base | {shape.params / 1e9:.2f} B | {gb(largest)} | {float(ours['wall_s']):.2f} s | {gb(rss)} | "  # type: ignore[arg-type]
            f"{out_bytes / 1e6 / write_s:.0f} |",
            f"| doubled | {shape2.params / 1e9:.2f} B | {gb(largest2)} | {float(r2['wall_s']):.2f} s | {gb(rss2)} | "  # type: ignore[arg-type]
            f"{float(r2['bytes']) / 1e6 / float(r2['write_s']):.0f} |",  # type: ignore[arg-type]
            "",
            f"- peak RSS growth when the model (and every shard) doubles: {(rss2 / rss - 1):+.1%} (target < 10 %); "
            f"call time {call2 / float(ours['call_s']):.2f}x.",  # type: ignore[arg-type]
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
