"""Small builders shared by tests: tiny LoRA adapters and their files."""

from __future__ import annotations

import json
from typing import Any

import torch

from weightstore import tensorio

ADAPTER_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny"}


def lora_weights(seed: int = 0, layers: int = 2, hidden: int = 16, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            out[f"{pre}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
            out[f"{pre}.lora_B.weight"] = torch.randn(hidden, r, generator=g)
    return out


def sampler_files(seed: int = 0) -> dict[str, bytes]:
    return {
        "adapter_model.safetensors": tensorio.weights_bytes(lora_weights(seed)),
        "adapter_config.json": json.dumps(ADAPTER_CONFIG, sort_keys=True).encode(),
    }


def state_files(seed: int = 0) -> dict[str, bytes]:
    weights = lora_weights(seed)
    params = [torch.nn.Parameter(weights[k].clone()) for k in sorted(weights)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    return {**sampler_files(seed), "optimizer.safetensors": tensorio.optimizer_bytes(opt.state_dict())}


def lock_waiters(engine: Any) -> int:
    """How many backends of ``engine``'s PostgreSQL database wait on a lock right now (the tests'
    way to see that a transaction they started is blocked, without timing it)."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return int(conn.execute(sa.text(sql)).scalar() or 0)
