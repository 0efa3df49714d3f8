"""Synthetic tensors whose merged values are obvious (``lora_A = fill * ones``): exact expectations
for every layout -- dense, per-expert, fused concatenated, fused interleaved and transposed.

These bases are hand-written safetensors files (not loadable models), so the forward check is
disabled (``forward_max_bytes=0``); the sampled recomputation still runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.export.conftest import write_adapter
from weightstore.export import VerifyOptions, export_merged, export_peft, plan_export

NO_FORWARD = VerifyOptions(forward_max_bytes=0)
P = "base_model.model."


def write_base(path: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def read(path: Path, name: str) -> torch.Tensor:
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as h:
            if name in set(h.keys()):
                return h.get_tensor(name)
    raise KeyError(name)


def test_dense_fill_ones(tmp_path: Path) -> None:
    bf16 = torch.bfloat16
    base = write_base(
        tmp_path / "base",
        {"model_type": "llama", "vocab_size": 8},
        {
            "model.embed_tokens.weight": torch.arange(32, dtype=bf16).view(8, 4),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4, dtype=bf16),
            "model.layers.0.mlp.down_proj.weight": torch.ones(4, 6, dtype=bf16),
            "model.norm.weight": torch.ones(4, dtype=torch.float32),
            "lm_head.weight": torch.ones(8, 4, dtype=bf16),
        },
    )
    # r=2, alpha=4 -> scale 2. q: B@A = 2 * 1 * 0.5 = 1 -> +2. down: row i of B is (i+1) -> +(i+1).
    adapter = write_adapter(
        tmp_path / "adapter",
        {
            f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": 0.5 * torch.ones(2, 4),
            f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 2),
            f"{P}model.layers.0.mlp.down_proj.lora_A.weight": 0.25 * torch.ones(2, 6),
            f"{P}model.layers.0.mlp.down_proj.lora_B.weight": torch.arange(1, 5.0).view(4, 1).expand(4, 2),
        },
        rank=2,
        alpha=4,
    )
    result = export_merged(adapter.path, base, tmp_path / "out", verify_options=NO_FORWARD)
    out = tmp_path / "out"
    assert torch.equal(read(out, "model.layers.0.self_attn.q_proj.weight"), torch.full((4, 4), 2.0, dtype=bf16))
    assert torch.equal(
        read(out, "model.layers.0.mlp.down_proj.weight"), (1 + torch.arange(1, 5.0)).view(4, 1).expand(4, 6).to(bf16)
    )
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(read(out, name), read(base, name))
    assert read(out, "model.norm.weight").dtype == torch.float32
    report = result.verification
    assert report.passed and not report.forward.ran and report.recompute.worst_ratio <= 1.0
    assert report.noop.adapted_tensors == 2 and report.noop.unchanged_tensors == ()
    assert report.noop.rounding_loss == 0.0  # these deltas are exact in bf16


def _moe_adapter(tmp_path: Path, hidden: int, ffn: int, experts: int) -> object:
    # w1 (gate): expert e gets +s*(e+1); w3 (up): -(e+1); w2 (down): +10*(e+1). r=1, alpha=2 -> s=2.
    e = torch.arange(1, experts + 1.0)
    return write_adapter(
        tmp_path / "adapter",
        {
            f"{P}model.layers.0.mlp.experts.w1.lora_A.weight": torch.ones(1, 1, hidden),
            f"{P}model.layers.0.mlp.experts.w1.lora_B.weight": e.view(experts, 1, 1).expand(experts, ffn, 1).clone(),
            f"{P}model.layers.0.mlp.experts.w3.lora_A.weight": torch.ones(1, 1, hidden),
            f"{P}model.layers.0.mlp.experts.w3.lora_B.weight": -e.view(experts, 1, 1).expand(experts, ffn, 1).clone(),
            f"{P}model.layers.0.mlp.experts.w2.lora_A.weight": (10 * e).view(experts, 1, 1).expand(experts, 1, ffn).clone(),
            f"{P}model.layers.0.mlp.experts.w2.lora_B.weight": torch.ones(1, hidden, 1),
        },
        rank=1,
        alpha=2,
    )


def test_qwen3_moe_separate_experts_exact(tmp_path: Path) -> None:
    hidden, ffn, experts = 4, 3, 3
    tensors = {}
    for e in range(experts):
        for proj, shape in (("gate_proj", (ffn, hidden)), ("up_proj", (ffn, hidden)), ("down_proj", (hidden, ffn))):
            tensors[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.zeros(shape, dtype=torch.bfloat16)
    base = write_base(tmp_path / "base", {"model_type": "qwen3_moe", "num_experts": experts}, tensors)
    adapter = _moe_adapter(tmp_path, hidden, ffn, experts)
    export_merged(adapter.path, base, tmp_path / "out", verify_options=NO_FORWARD)  # type: ignore[attr-defined]
    for e in range(experts):
        k = e + 1
        assert torch.equal(
            read(tmp_path / "out", f"model.layers.0.mlp.experts.{e}.gate_proj.weight"),
            torch.full((ffn, hidden), 2.0 * k, dtype=torch.bfloat16),
        )
        assert torch.equal(
            read(tmp_path / "out", f"model.layers.0.mlp.experts.{e}.up_proj.weight"),
            torch.full((ffn, hidden), -2.0 * k, dtype=torch.bfloat16),
        )
        assert torch.equal(
            read(tmp_path / "out", f"model.layers.0.mlp.experts.{e}.down_proj.weight"),
            torch.full((hidden, ffn), 20.0 * k, dtype=torch.bfloat16),
        )


def test_qwen3_moe_fused_experts_exact(tmp_path: Path) -> None:
    hidden, ffn, experts = 4, 3, 3
    base = write_base(
        tmp_path / "base",
        {"model_type": "qwen3_moe", "num_local_experts": experts},
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(experts, 2 * ffn, hidden, dtype=torch.bfloat16),
            "model.layers.0.mlp.experts.down_proj": torch.zeros(experts, hidden, ffn, dtype=torch.bfloat16),
        },
    )
    adapter = _moe_adapter(tmp_path, hidden, ffn, experts)
    export_merged(adapter.path, base, tmp_path / "out", verify_options=NO_FORWARD)  # type: ignore[attr-defined]
    gate_up = read(tmp_path / "out", "model.layers.0.mlp.experts.gate_up_proj").float()
    down = read(tmp_path / "out", "model.layers.0.mlp.experts.down_proj").float()
    for e in range(experts):
        k = e + 1
        assert torch.equal(gate_up[e, :ffn], torch.full((ffn, hidden), 2.0 * k))  # gate rows first
        assert torch.equal(gate_up[e, ffn:], torch.full((ffn, hidden), -2.0 * k))  # then up rows
        assert torch.equal(down[e], torch.full((hidden, ffn), 20.0 * k))


def test_gpt_oss_interleaved_transposed_exact(tmp_path: Path) -> None:
    hidden, ffn, experts = 4, 3, 3
    base = write_base(
        tmp_path / "base",
        {"model_type": "gpt_oss", "num_local_experts": experts},
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(experts, hidden, 2 * ffn, dtype=torch.bfloat16),
            "model.layers.0.mlp.experts.gate_up_proj_bias": torch.zeros(experts, 2 * ffn, dtype=torch.bfloat16),
            "model.layers.0.mlp.experts.down_proj": torch.zeros(experts, ffn, hidden, dtype=torch.bfloat16),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, hidden, dtype=torch.bfloat16),
        },
    )
    tensors = dict(_moe_adapter(tmp_path / "x", hidden, ffn, experts).tensors)  # type: ignore[attr-defined]
    tensors[f"{P}model.layers.0.attn.q_proj.lora_A.weight"] = torch.ones(1, hidden)  # Tinker's "attn"
    tensors[f"{P}model.layers.0.attn.q_proj.lora_B.weight"] = torch.ones(4, 1)
    adapter = write_adapter(tmp_path / "adapter", tensors, rank=1, alpha=2)
    export_merged(adapter.path, base, tmp_path / "out", verify_options=NO_FORWARD)
    gate_up = read(tmp_path / "out", "model.layers.0.mlp.experts.gate_up_proj").float()
    down = read(tmp_path / "out", "model.layers.0.mlp.experts.down_proj").float()
    for e in range(experts):
        k = e + 1
        assert torch.equal(gate_up[e][:, 0::2], torch.full((hidden, ffn), 2.0 * k))  # gate: even columns
        assert torch.equal(gate_up[e][:, 1::2], torch.full((hidden, ffn), -2.0 * k))  # up: odd columns
        assert torch.equal(down[e], torch.full((ffn, hidden), 20.0 * k))
    assert torch.equal(
        read(tmp_path / "out", "model.layers.0.mlp.experts.gate_up_proj_bias"),
        torch.zeros(experts, 2 * ffn, dtype=torch.bfloat16),
    )
    assert torch.equal(
        read(tmp_path / "out", "model.layers.0.self_attn.q_proj.weight"), torch.full((4, hidden), 2.0, dtype=torch.bfloat16)
    )


def test_gpt_oss_peft_packing_matches_peft_semantics(tmp_path: Path) -> None:
    """The packed target_parameters tensors, read back with PEFT ParamWrapper's own reshape rules,
    give exactly Tinker's per-expert deltas (gate on even, up on odd output features)."""
    hidden, ffn, experts = 4, 3, 3
    base = write_base(
        tmp_path / "base",
        {"model_type": "gpt_oss", "num_local_experts": experts},
        {
            "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(experts, hidden, 2 * ffn, dtype=torch.bfloat16),
            "model.layers.0.mlp.experts.down_proj": torch.zeros(experts, ffn, hidden, dtype=torch.bfloat16),
        },
    )
    g = torch.Generator().manual_seed(0)
    r = 2
    t = {
        f"{P}model.layers.0.mlp.experts.w1.lora_A.weight": torch.randn(1, r, hidden, generator=g),
        f"{P}model.layers.0.mlp.experts.w1.lora_B.weight": torch.randn(experts, ffn, r, generator=g),
        f"{P}model.layers.0.mlp.experts.w3.lora_A.weight": torch.randn(1, r, hidden, generator=g),
        f"{P}model.layers.0.mlp.experts.w3.lora_B.weight": torch.randn(experts, ffn, r, generator=g),
        f"{P}model.layers.0.mlp.experts.w2.lora_A.weight": torch.randn(experts, r, ffn, generator=g),
        f"{P}model.layers.0.mlp.experts.w2.lora_B.weight": torch.randn(1, hidden, r, generator=g),
    }
    adapter = write_adapter(tmp_path / "adapter", t, rank=r, alpha=r)
    export_peft(adapter.path, base, tmp_path / "out", verify_options=NO_FORWARD)
    out = tmp_path / "out"
    ex = f"{P}model.layers.0.mlp.experts"
    # PEFT ParamWrapper.get_delta_weight: A -> (E, R, in), B -> (out, R, E); delta[e] = (B[:, :, e] @ A[e]).T
    for wrapper, rank in ((f"{ex}.base_layer", 2 * r), (ex, r)):
        a = read(out, f"{wrapper}.lora_A.weight").reshape(experts, rank, -1)
        b = read(out, f"{wrapper}.lora_B.weight").reshape(-1, rank, experts)
        delta = torch.einsum("ore,eri->eio", b, a)  # (E, in, out), the parameter's orientation
        for e in range(experts):
            if wrapper.endswith("base_layer"):
                gate = t[f"{ex}.w1.lora_B.weight"][e] @ t[f"{ex}.w1.lora_A.weight"][0]
                up = t[f"{ex}.w3.lora_B.weight"][e] @ t[f"{ex}.w3.lora_A.weight"][0]
                torch.testing.assert_close(delta[e][:, 0::2], gate.T)
                torch.testing.assert_close(delta[e][:, 1::2], up.T)
            else:
                down = t[f"{ex}.w2.lora_B.weight"][0] @ t[f"{ex}.w2.lora_A.weight"][e]
                torch.testing.assert_close(delta[e], down.T)


def test_plan_is_header_only_and_complete(tmp_path: Path) -> None:
    bf16 = torch.bfloat16
    base = write_base(
        tmp_path / "base",
        {"model_type": "qwen2", "vocab_size": 8, "tie_word_embeddings": True},
        {
            "model.embed_tokens.weight": torch.ones(8, 4, dtype=bf16),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4, dtype=bf16),
            "model.layers.0.self_attn.q_proj.bias": torch.zeros(4, dtype=bf16),
        },
    )
    adapter = write_adapter(
        tmp_path / "adapter",
        {
            f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 4),
            f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 1),
            f"{P}model.unembed_tokens.lora_A.weight": torch.ones(1, 4),
            f"{P}model.unembed_tokens.lora_B.weight": torch.ones(8, 1),
        },
        rank=1,
        alpha=1,
    )
    plan = plan_export(adapter.path, base, to="merged")
    summary = plan.summary()
    assert summary["family"] == "qwen" and summary["adapted_tensors"] == 2 and summary["untied_lm_head"]
    assert [t.name for t in plan.merged][-1] == "lm_head.weight"  # materialised from embed_tokens
    assert plan.merged[-1].source.name == "model.embed_tokens.weight"
    assert not (tmp_path / "out").exists()
    peft_plan = plan_export(adapter.path, base, to="peft")
    assert peft_plan.peft_config["target_modules"] == ["lm_head", "q_proj"]
