"""Tiny models built from configs, Tinker-format adapters, and an independent base + adapter oracle.

Nothing is downloaded. A base model is a random transformers model from a config, saved with
``save_pretrained``; an adapter is written the way Tinker writes it (``base_model.model.`` prefix,
Tinker module names, shared-outer 3-D expert factors).

The oracle (:func:`oracle_logits`) computes *base + adapter* without the library: it edits the base
checkpoint's tensors **by name**, following the semantics of the Hub layout written out here
(``experts.{e}.gate_proj`` += w1 expert e, GPT-OSS gate = even columns, ...), saves that, and lets
transformers load it. For Qwen3-MoE it always edits the *separate* per-expert layout and lets
transformers fuse it, so it shares nothing with the library's fused-layout mapping.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIMS = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
FFN, MOE_FFN, EXPERTS = 48, 16, 4
RANK, ALPHA = 4, 8  # scale 2
INPUT_IDS = torch.tensor([[5, 17, 42, 3, 88, 61, 9, 30, 2, 77, 14, 50], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def make_config(family: str, *, tied: bool = False) -> Any:
    from transformers import GptOssConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(DIMS, tie_word_embeddings=tied)
    if family == "llama":
        return LlamaConfig(intermediate_size=FFN, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=FFN, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=FFN, **common)
    if family == "qwen3":
        return Qwen3Config(intermediate_size=FFN, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            intermediate_size=FFN, moe_intermediate_size=MOE_FFN, num_experts=EXPERTS, num_experts_per_tok=2, **common
        )
    if family == "gpt_oss":
        return GptOssConfig(
            intermediate_size=MOE_FFN,
            num_local_experts=EXPERTS,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
    raise ValueError(family)


def build_base(
    path: Path,
    family: str,
    *,
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """A random tiny base model in Hugging Face layout (plus a tokenizer-ish side file)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, tied=tied))
    with torch.no_grad():
        for p in model.parameters():  # std 0.05 everywhere: biases and norms random too
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


def fuse_qwen3_moe(separate: Path, out: Path) -> Path:
    """Rewrite a separate-expert Qwen3-MoE checkpoint with fused (E, 2*ffn, hidden) / (E, hidden, ffn) experts."""
    out.mkdir()
    for f in separate.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(separate.glob("*.safetensors")):
        sd.update(load_file(f))
    fused = {k: v for k, v in sd.items() if ".experts." not in k}
    for layer in range(DIMS["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"]]) for e in range(EXPERTS)]
        )
        fused[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(EXPERTS)])
    save_file(fused, out / "model.safetensors", metadata={"format": "pt"})
    return out


@dataclass
class Adapter:
    """A Tinker adapter on disk, with its tensors in memory for the oracle."""

    path: Path
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _dense_shapes(family: str) -> dict[str, tuple[int, int]]:
    h, q, kv = DIMS["hidden_size"], DIMS["num_attention_heads"] * DIMS["head_dim"], DIMS["num_key_value_heads"] * DIMS["head_dim"]
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    if family not in ("qwen3_moe", "gpt_oss"):
        shapes.update({"gate_proj": (FFN, h), "up_proj": (FFN, h), "down_proj": (h, FFN)})
    return shapes


def build_adapter(
    path: Path,
    family: str,
    *,
    rank: int = RANK,
    alpha: float = ALPHA,
    seed: int = 1,
    std: float = 0.15,
    unembed: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """A random Tinker-format adapter on every linear layer (+ unembed), experts in shared-outer layout."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    t: dict[str, torch.Tensor] = {}
    attn = "attn" if family == "gpt_oss" else "self_attn"
    h = DIMS["hidden_size"]
    for layer in range(DIMS["num_hidden_layers"]):
        pre = f"base_model.model.model.layers.{layer}"
        for name, (out_dim, in_dim) in _dense_shapes(family).items():
            mod = f"{pre}.{attn}.{name}" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else f"{pre}.mlp.{name}"
            t[f"{mod}.lora_A.weight"] = rnd(rank, in_dim)
            t[f"{mod}.lora_B.weight"] = rnd(out_dim, rank)
        if family in ("qwen3_moe", "gpt_oss"):
            ex = f"{pre}.mlp.experts"
            for w in ("w1", "w3"):
                t[f"{ex}.{w}.lora_A.weight"] = rnd(1, rank, h)
                t[f"{ex}.{w}.lora_B.weight"] = rnd(EXPERTS, MOE_FFN, rank)
            t[f"{ex}.w2.lora_A.weight"] = rnd(EXPERTS, rank, MOE_FFN)
            t[f"{ex}.w2.lora_B.weight"] = rnd(1, h, rank)
    if unembed:
        t["base_model.model.model.unembed_tokens.lora_A.weight"] = rnd(rank, h)
        t["base_model.model.model.unembed_tokens.lora_B.weight"] = rnd(DIMS["vocab_size"], rank)
    return write_adapter(path, t, rank=rank, alpha=alpha)


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], *, rank: int = RANK, alpha: float = ALPHA) -> Adapter:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": alpha, "base_model_name_or_path": "tiny-base"})
    )
    return Adapter(path, tensors, rank, alpha)


# --- the oracle ----------------------------------------------------------------------------------

_HF_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _pick(t: torch.Tensor, e: int) -> torch.Tensor:
    return t[0] if t.shape[0] == 1 else t[e]


def oracle_state_dict(base: Path, adapter: Adapter, *, round_to_base: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """Base tensors (fp32) + every delta, by on-disk name. Returns (state dict, untied lm_head)."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("*.safetensors")):
        sd.update(load_file(f))
    dtypes = {k: v.dtype for k, v in sd.items()}
    sd = {k: v.float() for k, v in sd.items()}
    config = json.loads((base / "config.json").read_text())
    untied = False

    def add(name: str, delta: torch.Tensor, dtype: torch.dtype) -> None:
        new = sd[name] + adapter.scale * delta
        sd[name] = new.to(dtype).float() if round_to_base else new

    for key, a in adapter.tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = adapter.tensors[key.replace("lora_A", "lora_B")].float()
        a = a.float()
        mod = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight").replace(".attn.", ".self_attn.")
        if mod == "model.unembed_tokens":
            if "lm_head.weight" not in sd or config.get("tie_word_embeddings"):
                sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
                dtypes["lm_head.weight"] = dtypes["model.embed_tokens.weight"]
                untied = True
            add("lm_head.weight", b @ a, dtypes["lm_head.weight"])
            continue
        if ".experts.w" not in mod:
            add(f"{mod}.weight", b @ a, dtypes[f"{mod}.weight"])
            continue
        block, w = mod.rsplit(".", 1)
        for e in range(EXPERTS):
            delta = _pick(b, e) @ _pick(a, e)  # (out, in)
            if f"{block}.{e}.gate_proj.weight" in sd:  # Hub layout, one Linear per expert
                name = f"{block}.{e}.{_HF_EXPERT[w]}.weight"
                add(name, delta, dtypes[name])
            else:  # GPT-OSS: gate_up_proj (E, in, 2*ffn) gate = even columns; down_proj (E, in, out)
                name = f"{block}.gate_up_proj" if w != "w2" else f"{block}.down_proj"
                full = torch.zeros_like(sd[name])
                if w == "w1":
                    full[e][:, 0::2] = delta.T
                elif w == "w3":
                    full[e][:, 1::2] = delta.T
                else:
                    full[e] = delta.T
                new = sd[name] + adapter.scale * full
                sd[name] = new.to(dtypes[name]).float() if round_to_base else new
    return sd, untied


def load_logits(model_dir: Path, peft_dir: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir))
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def oracle_logits(
    base: Path, adapter: Adapter, tmp: Path, *, round_to_base: bool, separate_base: Path | None = None
) -> torch.Tensor:
    """Logits of base + adapter, computed from an edited copy of the base checkpoint."""
    src = separate_base or base
    sd, untied = oracle_state_dict(src, adapter, round_to_base=round_to_base)
    out = tmp / f"oracle-{'rounded' if round_to_base else 'exact'}"
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    if untied:
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    logits = load_logits(out)
    shutil.rmtree(out)
    return logits


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, rtol: float) -> None:
    """``max|got - want| <= rtol * max(1, max|want|)``, and the adapter visibly moved the logits."""
    tol = rtol * max(1.0, float(want.abs().max()))
    diff = float((got - want).abs().max())
    effect = float((want - base).abs().max())
    assert diff <= tol, f"logits differ by {diff:.3g} > {tol:.3g} (adapter effect {effect:.3g})"
    assert effect > 50 * tol, f"adapter effect {effect:.3g} too small to prove anything (tol {tol:.3g})"


def leftovers(parent: Path) -> list[str]:
    """Partial export directories left next to an output directory."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base models shared by the tests (read-only)."""
    root = tmp_path_factory.mktemp("bases")
    out = {
        "llama": build_base(root / "llama", "llama", max_shard_size="40KB"),
        "mistral": build_base(root / "mistral", "mistral"),
        "qwen2": build_base(root / "qwen2", "qwen2"),
        "qwen3_tied": build_base(root / "qwen3_tied", "qwen3", tied=True),
        "qwen3_moe": build_base(root / "qwen3_moe", "qwen3_moe"),
        "gpt_oss": build_base(root / "gpt_oss", "gpt_oss"),
        "llama_fp32": build_base(root / "llama_fp32", "llama", dtype=torch.float32),
    }
    out["qwen3_moe_fused"] = fuse_qwen3_moe(out["qwen3_moe"], root / "qwen3_moe_fused")
    return out
