"""Tiny models for export-job tests: a random Llama base saved in HF layout and a Tinker adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from weightstore import tensorio

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, INTER = 32, 2, 4, 2, 64, 48
HEAD_DIM = HIDDEN // HEADS
RANK, ALPHA = 4, 8
OUT_DIM = {"q_proj": HIDDEN, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM, "o_proj": HIDDEN}


def build_base(directory: Path, *, seed: int = 0, shard: str = "40KB") -> Path:
    """A random LlamaForCausalLM (fp32) saved as several safetensors shards plus an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory, max_shard_size=shard)
    (directory / "README.md").write_text("not part of the model")
    return directory


def adapter_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            out[f"{pre}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 0.1
            out[f"{pre}.lora_B.weight"] = torch.randn(OUT_DIM[proj], RANK, generator=g) * 0.1
    return out


def adapter_files(seed: int = 1, base_name: str = "tiny-llama") -> dict[str, bytes]:
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base_name}
    return {
        "adapter_model.safetensors": tensorio.weights_bytes(adapter_weights(seed)),
        "adapter_config.json": json.dumps(config, sort_keys=True).encode(),
    }


def reference_logits(base_dir: Path, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Base model with W + (alpha / r) B @ A applied in memory (independent of the export code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = weights[key.replace("lora_A", "lora_B")]
            params[f"{module}.weight"] += (ALPHA / RANK) * (b @ a)
        return model(tokens).logits
