"""End to end, per family: random tiny base + random Tinker adapter, exported both ways, loaded by
transformers / peft, logits compared with the independent oracle of ``conftest``.

Tolerances (all computed in fp32, relative to ``max(1, max |oracle logit|)``):

- merged: ``1e-3``. The oracle rounds its weights through the base dtype exactly as the spec says
  (``W' = cast(W + scale * B @ A)``), so the only differences are fp32 summation order in ``B @ A``
  flipping an occasional rounding; in practice the difference is 0.
- PEFT: ``1e-4``. PEFT applies the unmerged LoRA in fp32 against an fp32 merged oracle.

Each comparison also asserts the adapter moved the logits by more than 50x the tolerance, so a
silently dropped module could not pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.export.conftest import (
    assert_close_logits,
    build_adapter,
    leftovers,
    load_logits,
    oracle_logits,
)
from weightstore.export import export_merged, export_peft

MERGED_RTOL, PEFT_RTOL = 1e-3, 1e-4

CASES = [
    # (base fixture key, adapter family, oracle base key)
    ("llama", "llama", None),
    ("mistral", "mistral", None),
    ("qwen2", "qwen2", None),
    ("qwen3_tied", "qwen3", None),
    ("qwen3_moe", "qwen3_moe", None),
    ("qwen3_moe_fused", "qwen3_moe", "qwen3_moe"),
    ("gpt_oss", "gpt_oss", None),
    ("llama_fp32", "llama", None),
]


@pytest.mark.parametrize(("base_key", "family", "oracle_key"), CASES, ids=[c[0] for c in CASES])
def test_export_both_ways_matches_base_plus_adapter(
    models: dict[str, Path], tmp_path: Path, base_key: str, family: str, oracle_key: str | None
) -> None:
    base = models[base_key]
    oracle_base = models[oracle_key] if oracle_key else None
    adapter = build_adapter(tmp_path / "adapter", family)
    base_logits = load_logits(base)

    merged = export_merged(adapter.path, base, tmp_path / "merged", shard_size=20_000)
    assert merged.verification.passed and merged.verification.forward.ran
    assert merged.verification.forward.max_abs_diff <= merged.verification.forward.tolerance
    want = oracle_logits(base, adapter, tmp_path, round_to_base=True, separate_base=oracle_base)
    assert_close_logits(load_logits(tmp_path / "merged"), want, base_logits, MERGED_RTOL)

    peft = export_peft(adapter.path, base, tmp_path / "peft")
    assert peft.verification.passed and peft.verification.forward.ran
    want = oracle_logits(base, adapter, tmp_path, round_to_base=False, separate_base=oracle_base)
    assert_close_logits(load_logits(base, tmp_path / "peft"), want, base_logits, PEFT_RTOL)
    assert leftovers(tmp_path) == []


def test_tied_base_gets_its_own_lm_head(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["qwen3_tied"]
    adapter = build_adapter(tmp_path / "adapter", "qwen3")
    result = export_merged(adapter.path, base, tmp_path / "out")
    assert result.plan["untied_lm_head"] is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with (
        safe_open(str(base / "model.safetensors"), "pt") as fb,
        safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fo,
    ):
        assert "lm_head.weight" not in set(fb.keys()) and "lm_head.weight" in set(fo.keys())
        embed = fb.get_tensor("model.embed_tokens.weight")
        # input embeddings untouched (byte-for-byte), the head carries the unembed delta
        assert torch.equal(fo.get_tensor("model.embed_tokens.weight").view(torch.int16), embed.view(torch.int16))
        a = adapter.tensors["base_model.model.model.unembed_tokens.lora_A.weight"]
        b = adapter.tensors["base_model.model.model.unembed_tokens.lora_B.weight"]
        expected = (embed.float() + adapter.scale * (b @ a)).to(torch.bfloat16)
        assert torch.equal(fo.get_tensor("lm_head.weight"), expected)


def test_untied_config_left_verbatim(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["mistral"]
    adapter = build_adapter(tmp_path / "adapter", "mistral")
    export_merged(adapter.path, base, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == (base / "tokenizer_config.json").read_bytes()
    assert (tmp_path / "out" / "generation_config.json").exists()


def test_peft_adapter_config(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "qwen3_moe")
    export_peft(adapter.path, models["qwen3_moe"], tmp_path / "out", base_model_name="Qwen/Qwen3-30B-A3B")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["base_model_name_or_path"] == "Qwen/Qwen3-30B-A3B"
    assert config["target_modules"] == sorted(
        ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    )
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # experts expanded per expert, unscaled, shared factors broadcast
        b3 = f.get_tensor("base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight")
        a0 = f.get_tensor("base_model.model.model.layers.1.mlp.experts.0.down_proj.lora_A.weight")
        assert torch.equal(b3, adapter.tensors["base_model.model.model.layers.1.mlp.experts.w3.lora_B.weight"][3])
        assert torch.equal(a0, adapter.tensors["base_model.model.model.layers.1.mlp.experts.w2.lora_A.weight"][0])
        assert torch.equal(
            f.get_tensor("base_model.model.lm_head.lora_A.weight"),
            adapter.tensors["base_model.model.model.unembed_tokens.lora_A.weight"],
        )
    assert len(keys) == 2 * (2 * 4 + 2 * 4 * 3 + 1)  # A+B x (2 layers x 4 attn + 2 x 4 experts x 3 + head)


def test_gpt_oss_peft_uses_target_parameters(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = build_adapter(tmp_path / "adapter", "gpt_oss")
    export_peft(adapter.path, models["gpt_oss"], tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["rank_pattern"] == {"gate_up_proj": 8} and config["alpha_pattern"] == {"gate_up_proj": 16}
    assert "attn" not in config["target_modules"] and "q_proj" in config["target_modules"]
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert list(f.get_slice("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight").get_shape()) == [
            8 * 4,
            32,
        ]
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in set(f.keys())
