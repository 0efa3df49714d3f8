"""What lands on disk: shards and index, byte-for-byte copies, alignment, determinism, progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.export.conftest import build_adapter, write_adapter
from weightstore.errors import VerificationFailed
from weightstore.export import VerifyOptions, export_merged, export_peft, verify_export
from weightstore.export._safetensors import read_header
from weightstore.formats import DTYPE_SIZES


def _tensors(out: Path) -> dict[str, object]:
    found: dict[str, object] = {}
    for f in sorted(out.glob("*.safetensors")):
        found.update(read_header(f)[0])
    return found


def test_sharded_output_with_correct_index(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "llama")
    result = export_merged(adapter.path, models["llama"], tmp_path / "out", shard_size=12_000)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = _tensors(out)
    assert index["weight_map"] == {name: info.file.name for name, info in sorted(written.items())}  # type: ignore[attr-defined]
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in written.values())  # type: ignore[attr-defined]
    base_tensors = _tensors(models["llama"])
    assert set(written) == set(base_tensors)
    for shard in shards:
        tensors = read_header(out / shard)[0]
        assert sum(t.nbytes for t in tensors.values()) <= 12_000 or len(tensors) == 1
    assert {f.path for f in result.files} == {
        *shards,
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
    }
    assert result.bytes_written == sum((out / f.path).stat().st_size for f in result.files)


def test_untouched_tensors_are_byte_identical(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "qwen2", unembed=False)
    export_merged(adapter.path, models["qwen2"], tmp_path / "out")
    base, out = _tensors(models["qwen2"]), _tensors(tmp_path / "out")
    adapted = 0
    for name, b in base.items():
        o = out[name]
        with open(b.file, "rb") as fb, open(o.file, "rb") as fo:  # type: ignore[attr-defined]
            fb.seek(b.offset)  # type: ignore[attr-defined]
            fo.seek(o.offset)  # type: ignore[attr-defined]
            same = fb.read(b.nbytes) == fo.read(o.nbytes)  # type: ignore[attr-defined]
        is_adapted = name.endswith("proj.weight")
        adapted += is_adapted
        assert same != is_adapted, name  # biases, norms, embeddings, lm_head: identical; projections: changed
    assert adapted == 2 * 7


def test_deterministic_output(models: dict[str, Path], tmp_path: Path) -> None:
    """Same inputs, same bytes -- whatever the number of merge threads (1 = no thread pool)."""
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    for i, workers in enumerate((1, 3)):
        export_merged(
            adapter.path,
            models["qwen3_moe"],
            tmp_path / f"m{i}",
            shard_size=25_000,
            verify_options=VerifyOptions(forward_max_bytes=0),
            workers=workers,
        )
        export_peft(adapter.path, models["qwen3_moe"], tmp_path / f"p{i}", verify_options=VerifyOptions(forward_max_bytes=0))
    for kind in ("m", "p"):
        files = sorted(p.name for p in (tmp_path / f"{kind}0").iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"{kind}1").iterdir())
        for name in files:
            assert (tmp_path / f"{kind}0" / name).read_bytes() == (tmp_path / f"{kind}1" / name).read_bytes()


def test_progress_reports_every_byte(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "gpt_oss")
    seen: list[tuple[int, int]] = []
    result = export_merged(
        adapter.path,
        models["gpt_oss"],
        tmp_path / "out",
        progress=lambda d, t: seen.append((d, t)),
        verify_options=VerifyOptions(forward_max_bytes=0),
    )
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(t for _, t in seen)) == 1
    assert done[-1] == seen[-1][1] == result.plan["output_bytes"] == sum(i.nbytes for i in _tensors(tmp_path / "out").values())  # type: ignore[attr-defined]


def test_mixed_dtypes_stay_aligned(tmp_path: Path) -> None:
    """Odd-sized bf16 tensors never push an fp32 tensor off its 4-byte alignment."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(
        {
            "a.weight": torch.ones(3, 3, dtype=torch.bfloat16),  # 18 bytes
            "model.layers.0.self_attn.q_proj.weight": torch.ones(5, 3, dtype=torch.bfloat16),  # 30 bytes
            "b.norm": torch.ones(3, dtype=torch.float32),
            "c.norm": torch.ones(1, dtype=torch.float64),
        },
        base / "model.safetensors",
    )
    adapter = write_adapter(
        tmp_path / "adapter",
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 3),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(5, 1),
        },
        rank=1,
        alpha=1,
    )
    export_merged(adapter.path, base, tmp_path / "out", verify_options=VerifyOptions(forward_max_bytes=0))
    header_len = int.from_bytes((tmp_path / "out" / "model.safetensors").read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0
    for info in _tensors(tmp_path / "out").values():
        assert info.offset % int(DTYPE_SIZES[info.dtype]) == 0, info  # type: ignore[attr-defined]


def test_verify_export_rechecks_an_existing_directory(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    export_merged(adapter.path, models["qwen3_moe_fused"], tmp_path / "out", shard_size=25_000)
    report = verify_export(adapter.path, models["qwen3_moe_fused"], tmp_path / "out", to="merged")
    assert report.passed and report.forward.ran and report.noop.unchanged_tensors == ()
    # flip one expert value of the written gate_up_proj: re-verification must notice
    written = _tensors(tmp_path / "out")["model.layers.1.mlp.experts.gate_up_proj"]
    data = bytearray(written.file.read_bytes())  # type: ignore[attr-defined]
    at = written.offset + 2 * 7  # type: ignore[attr-defined]
    data[at + 1] ^= 0x20  # bf16 high byte: a large change
    written.file.write_bytes(bytes(data))  # type: ignore[attr-defined]
    with pytest.raises(VerificationFailed, match="forward pass"):
        verify_export(adapter.path, models["qwen3_moe_fused"], tmp_path / "out", to="merged")
    with pytest.raises(VerificationFailed, match="recomputation"):  # sampling every tensor, no forward pass
        verify_export(
            adapter.path,
            models["qwen3_moe_fused"],
            tmp_path / "out",
            to="merged",
            verify_options=VerifyOptions(samples=100, forward_max_bytes=0),
        )
