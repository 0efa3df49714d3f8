"""Inputs that do not fit fail with a clear, typed error -- and never leave an output directory behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.export.conftest import build_adapter, leftovers, write_adapter
from weightstore.errors import (
    AlreadyExists,
    ExportFailed,
    IntegrityError,
    InvalidFormat,
    InvalidRequest,
    WeightstoreError,
)
from weightstore.export import _safetensors, export_merged, export_peft, known_families
from weightstore.hashing import sha256_file

P = "base_model.model."


def _both(tmp_path: Path, adapter: Path, base: Path, error: type[WeightstoreError], match: str) -> None:
    for to, export in (("merged", export_merged), ("peft", export_peft)):
        out = tmp_path / f"out_{to}"
        with pytest.raises(error, match=match):
            export(adapter, base, out)
        assert not out.exists()
    assert leftovers(tmp_path) == []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_adapter_module_the_base_lacks(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "llama")
    tensors = dict(adapter.tensors)
    tensors[f"{P}model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 32)
    tensors[f"{P}model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)
    bad = write_adapter(tmp_path / "bad", tensors)
    _both(tmp_path, bad.path, models["llama"], InvalidRequest, r"layers\.7\.self_attn\.q_proj\.weight, which the base")


def test_adapter_for_a_dense_model_on_moe_base(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "qwen3")  # dense mlp.gate_proj etc.
    _both(tmp_path, adapter.path, models["qwen3_moe"], InvalidRequest, "which the base model does not have")


def test_shape_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "llama")
    tensors = dict(adapter.tensors)
    tensors[f"{P}model.layers.0.mlp.down_proj.lora_A.weight"] = torch.ones(4, 47)  # ffn is 48
    bad = write_adapter(tmp_path / "bad", tensors)
    _both(tmp_path, bad.path, models["llama"], InvalidRequest, r"delta shape \(32, 47\) does not match")


def test_expert_count_mismatch(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    tensors = dict(adapter.tensors)
    tensors[f"{P}model.layers.0.mlp.experts.w1.lora_B.weight"] = torch.ones(3, 16, 4)  # base has 4 experts
    bad = write_adapter(tmp_path / "bad", tensors)
    _both(tmp_path, bad.path, models["qwen3_moe"], InvalidRequest, "has 3 experts, the base model 4")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop(f"{P}model.layers.0.self_attn.q_proj.lora_B.weight"), "has no lora_B"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}), "unexpected key"),
        (lambda t: t.update({f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(3, 32)}), "inconsistent with r=4"),
    ],
    ids=["missing-half", "no-prefix", "wrong-rank"],
)
def test_malformed_adapter(models: dict[str, Path], tmp_path: Path, edit: Callable[[dict], object], match: str) -> None:
    tensors = dict(build_adapter(tmp_path / "adapter", "llama").tensors)
    edit(tensors)
    bad = write_adapter(tmp_path / "bad", tensors)
    _both(tmp_path, bad.path, models["llama"], InvalidFormat, match)


def test_missing_base_shard(models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(models["llama"], tmp_path / "base")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (base / victim).unlink()
    adapter = build_adapter(tmp_path / "adapter", "llama")
    _both(
        tmp_path, adapter.path, base, InvalidFormat, f"shard\\(s\\) {victim} listed in model.safetensors.index.json are missing"
    )


def test_corrupted_shard_sha256(models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(models["llama"], tmp_path / "base")
    expected = {p.name: sha256_file(p) for p in base.iterdir()}
    shard = sorted(base.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # one bit in the last tensor's data: the header stays valid
    shard.write_bytes(bytes(data))
    adapter = build_adapter(tmp_path / "adapter", "llama")
    for export in (export_merged, export_peft):
        with pytest.raises(IntegrityError, match=f"{shard.name} is corrupt"):
            export(adapter.path, base, tmp_path / "out", base_sha256=expected)  # type: ignore[operator]
        assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_adapter_sha256_checked(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "llama")
    expected = {p.name: sha256_file(p) for p in adapter.path.iterdir()}
    expected["adapter_model.safetensors"] = "0" * 64
    with pytest.raises(IntegrityError, match="adapter_model.safetensors is corrupt"):
        export_merged(adapter.path, models["llama"], tmp_path / "out", adapter_sha256=expected)
    assert not (tmp_path / "out").exists()


def test_shard_that_disagrees_with_the_index(models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(models["llama"], tmp_path / "base")
    path = base / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    path.write_text(json.dumps(index))
    adapter = build_adapter(tmp_path / "adapter", "llama")
    _both(tmp_path, adapter.path, base, InvalidFormat, "corrupt shard or stale index")


def test_truncated_shard(models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(models["llama"], tmp_path / "base")
    shard = sorted(base.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    adapter = build_adapter(tmp_path / "adapter", "llama")
    _both(tmp_path, adapter.path, base, InvalidFormat, "data section")


def test_unknown_architecture_lists_known_ones(models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(models["llama"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "mamba"
    (base / "config.json").write_text(json.dumps(config))
    adapter = build_adapter(tmp_path / "adapter", "llama")
    with pytest.raises(InvalidRequest) as info:
        export_merged(adapter.path, base, tmp_path / "out")
    for family in known_families():
        assert family.name in info.value.message
    assert "'mamba'" in info.value.message and info.value.details["known"] == [f.name for f in known_families()]
    assert not (tmp_path / "out").exists()


def test_quantised_base_refused(models: dict[str, Path], tmp_path: Path) -> None:
    base = _copy(models["gpt_oss"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (base / "config.json").write_text(json.dumps(config))
    adapter = build_adapter(tmp_path / "adapter", "gpt_oss")
    _both(tmp_path, adapter.path, base, InvalidRequest, "quantised base models \\(mxfp4\\)")


def test_existing_output_dir_untouched(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AlreadyExists):
        export_merged(adapter.path, models["llama"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_io_failure_mid_write_leaves_nothing(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = _safetensors.copy_range

    def failing_copy(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_safetensors, "copy_range", failing_copy)
    adapter = build_adapter(tmp_path / "adapter", "llama")
    with pytest.raises(ExportFailed, match="No space left on device"):
        export_merged(adapter.path, models["llama"], tmp_path / "out", shard_size=20_000)
    assert calls["n"] == 5
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_two_modules_onto_one_slice_refused_at_plan_time(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightstore.export import _qwen3_moe

    monkeypatch.setattr(_qwen3_moe, "EXPERT_PROJECTIONS", {"w1": "gate_proj", "w3": "gate_proj", "w2": "down_proj"})
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    for base in (models["qwen3_moe"], models["qwen3_moe_fused"]):
        with pytest.raises(InvalidRequest, match="write the same rows"):
            export_merged(adapter.path, base, tmp_path / "out")
        assert not (tmp_path / "out").exists()
