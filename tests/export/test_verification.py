"""The export's own verification catches wrong mappings, skipped merges and swallowed deltas.

Wrong mappings are injected two ways: by editing a valid plan (what a buggy profile would have
produced) and by patching a profile's mapping table. Either way the plan is self-consistent, so
only verification can notice -- and it must, leaving no output behind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.export.conftest import build_adapter, leftovers
from weightstore.errors import VerificationFailed
from weightstore.export import VerifyOptions, _gpt_oss, _merge, _qwen3_moe, export_merged, export_peft, plan_export
from weightstore.export._plan import ExportPlan


def _swap_ops(plan: ExportPlan, first: str, second: str) -> ExportPlan:
    """Exchange the ops of two output tensors (e.g. gate_proj and up_proj of one expert)."""
    ops = {t.name: t.ops for t in plan.merged}
    merged = tuple(
        dataclasses.replace(t, ops=ops[second] if t.name == first else ops[first] if t.name == second else t.ops)
        for t in plan.merged
    )
    return dataclasses.replace(plan, merged=merged)


def _edit_ops(plan: ExportPlan, target: str, edit) -> ExportPlan:  # type: ignore[no-untyped-def]
    merged = tuple(dataclasses.replace(t, ops=tuple(edit(op) for op in t.ops)) if t.name == target else t for t in plan.merged)
    return dataclasses.replace(plan, merged=merged)


def _expect_caught(adapter_dir: Path, base: Path, out: Path, plan: ExportPlan) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as info:
        export_merged(adapter_dir, base, out, plan=plan)
    assert not out.exists() and leftovers(out.parent) == []
    return info.value


def test_swapped_w1_w3_separate_layout_caught(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["qwen3_moe"]
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    plan = plan_export(adapter.path, base, to="merged")
    bad = plan
    for e in range(4):
        bad = _swap_ops(bad, f"model.layers.1.mlp.experts.{e}.gate_proj.weight", f"model.layers.1.mlp.experts.{e}.up_proj.weight")
    err = _expect_caught(adapter.path, base, tmp_path / "out", bad)
    assert "forward pass" in err.message
    report = err.details["report"]
    assert report["noop"]["passed"] and report["recompute"]["passed"] and not report["forward"]["passed"]


def test_wrong_expert_index_caught(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["qwen3_moe_fused"]
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    plan = plan_export(adapter.path, base, to="merged")
    # expert e's delta goes to expert (e + 1) % 4 -- one layer, one tensor, all rows still covered once
    bad = _edit_ops(plan, "model.layers.0.mlp.experts.down_proj", lambda op: dataclasses.replace(op, expert=(op.expert + 1) % 4))
    _expect_caught(adapter.path, base, tmp_path / "out", bad)


def test_swapped_gate_up_in_fused_layout_caught(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["qwen3_moe_fused"]
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    plan = plan_export(adapter.path, base, to="merged")
    ffn = 16
    bad = _edit_ops(
        plan,
        "model.layers.0.mlp.experts.gate_up_proj",
        lambda op: dataclasses.replace(op, rows=dataclasses.replace(op.rows, start=ffn - op.rows.start)),
    )
    _expect_caught(adapter.path, base, tmp_path / "out", bad)


def test_buggy_profile_tables_caught(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile whose mapping table is wrong fails its own exports, merged and PEFT."""
    monkeypatch.setattr(_qwen3_moe, "EXPERT_PROJECTIONS", {"w1": "up_proj", "w3": "gate_proj", "w2": "down_proj"})
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    for to, export, base in (
        ("merged", export_merged, "qwen3_moe"),
        ("merged_fused", export_merged, "qwen3_moe_fused"),
        ("peft", export_peft, "qwen3_moe"),
    ):
        with pytest.raises(VerificationFailed, match="forward pass"):
            export(adapter.path, models[base], tmp_path / to)
        assert not (tmp_path / to).exists()

    monkeypatch.setattr(_gpt_oss, "INTERLEAVE_OFFSET", {"w1": 1, "w3": 0})
    adapter = build_adapter(tmp_path / "adapter_oss", "gpt_oss")
    for to, export in (("merged", export_merged), ("peft", export_peft)):
        with pytest.raises(VerificationFailed, match="forward pass"):
            export(adapter.path, models["gpt_oss"], tmp_path / f"oss_{to}")
        assert not (tmp_path / f"oss_{to}").exists()
    assert leftovers(tmp_path) == []


def test_wrong_peft_expert_caught(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["gpt_oss"]
    adapter = build_adapter(tmp_path / "adapter", "gpt_oss")
    plan = plan_export(adapter.path, base, to="peft")
    peft = tuple(
        dataclasses.replace(
            s,
            blocks=tuple(
                dataclasses.replace(b, source=dataclasses.replace(b.source, index=(b.source.index + 1) % 4)) for b in s.blocks
            ),
        )
        if s.name.endswith("layers.1.mlp.experts.base_layer.lora_B.weight")
        else s
        for s in plan.peft
    )
    with pytest.raises(VerificationFailed, match="forward pass"):
        export_peft(adapter.path, base, tmp_path / "out", plan=dataclasses.replace(plan, peft=peft))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_recomputation_catches_a_dropped_delta_without_forward(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the forward check off (large models), a merge bug is still caught by recomputation."""
    original = _merge._slab_block

    def drop_last_op(fd, info, slab, ops, *rest):  # type: ignore[no-untyped-def]
        return original(fd, info, slab, ops[:-1] or ops, *rest)

    monkeypatch.setattr(_merge, "_slab_block", drop_last_op)
    adapter = build_adapter(tmp_path / "adapter", "gpt_oss")
    with pytest.raises(VerificationFailed, match="recomputation"):
        export_merged(
            adapter.path, models["gpt_oss"], tmp_path / "out", verify_options=VerifyOptions(forward_max_bytes=0, samples=1000)
        )
    assert not (tmp_path / "out").exists()


def test_export_equal_to_base_refused(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge loop that copies the base instead of merging is refused by the no-op guard."""

    def copy_instead(fd, info, r0, n, a, b, scale, dst_fd, dst_offset, ws):  # type: ignore[no-untyped-def]
        row_bytes = info.shape[1] * info.itemsize
        _merge._safetensors.copy_range(fd, info.offset + r0 * row_bytes, dst_fd, dst_offset + r0 * row_bytes, n * row_bytes)
        return n * row_bytes, None

    monkeypatch.setattr(_merge, "_dense_block", copy_instead)
    adapter = build_adapter(tmp_path / "adapter", "llama")
    with pytest.raises(VerificationFailed, match="no-op guard") as info:
        export_merged(adapter.path, models["llama"], tmp_path / "out")
    assert "recomputation" in info.value.message
    assert not (tmp_path / "out").exists()


def test_zero_adapter_passes_and_equals_base(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "qwen2", std=0.0)
    result = export_merged(adapter.path, models["qwen2"], tmp_path / "out")
    noop = result.verification.noop
    assert noop.passed and noop.adapter_is_zero
    assert any("exactly zero" in w for w in result.verification.warnings)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (models["qwen2"] / "model.safetensors").read_bytes()


def test_delta_swallowed_by_bf16_refused(models: dict[str, Path], tmp_path: Path) -> None:
    # delta ~ 2 * 4 * (1e-9)^2: below half a bf16 ulp of every weight -> the merged model IS the base
    adapter = build_adapter(tmp_path / "adapter", "qwen2", std=1e-9)
    with pytest.raises(VerificationFailed, match="no-op guard") as info:
        export_merged(adapter.path, models["qwen2"], tmp_path / "out")
    assert "100% of the delta" in info.value.message
    assert not (tmp_path / "out").exists()
    # ... while the PEFT export keeps it
    assert export_peft(adapter.path, models["qwen2"], tmp_path / "peft").verification.passed


def test_mostly_swallowed_delta_warns(models: dict[str, Path], tmp_path: Path) -> None:
    # delta ~ 1e-7: only weights within ~1e-5 of zero move; nearly all of the delta is lost, not all
    adapter = build_adapter(tmp_path / "adapter", "qwen2", std=1e-4)
    result = export_merged(adapter.path, models["qwen2"], tmp_path / "out", verify_options=VerifyOptions(forward_max_bytes=0))
    noop = result.verification.noop
    assert noop.passed and noop.rounding_loss > 0.9
    assert len(noop.rounding_warned) == noop.adapted_tensors
    assert any("rounding into the base dtype lost" in w for w in result.verification.warnings)


def test_rounding_loss_warned(models: dict[str, Path], tmp_path: Path) -> None:
    # delta ~ 8 * (4e-3)^2 ~ 1.3e-4, about half a bf16 ulp at |w| ~ 0.05: most of it rounds away
    adapter = build_adapter(tmp_path / "adapter", "qwen2", std=4e-3)
    result = export_merged(adapter.path, models["qwen2"], tmp_path / "out", verify_options=VerifyOptions(forward_max_bytes=0))
    noop = result.verification.noop
    assert noop.passed and 0.5 < noop.rounding_loss < 1.0
    assert any("rounding" in w for w in result.verification.warnings)
    fp32 = export_merged(
        adapter.path, models["llama_fp32"], tmp_path / "out32", verify_options=VerifyOptions(forward_max_bytes=0)
    )
    assert fp32.verification.noop.rounding_loss < 1e-5 and not fp32.verification.warnings


def test_report_is_json_serialisable(models: dict[str, Path], tmp_path: Path) -> None:
    import json

    adapter = build_adapter(tmp_path / "adapter", "llama")
    result = export_merged(adapter.path, models["llama"], tmp_path / "out", shard_size=15_000)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["verification"]["passed"] is True
    assert data["verification"]["forward"]["ran"] is True
    assert data["plan"]["family"] == "llama" and len(data["plan"]["output_files"]) > 2
    assert torch.isfinite(torch.tensor(data["verification"]["recompute"]["worst_ratio"]))
