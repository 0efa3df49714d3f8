"""Qwen3-MoE: Tinker's shared-outer expert LoRA into separate or fused expert weights.

Tinker trains experts as three 3-D LoRAs per layer (reference §6.3): ``w1`` = gate, ``w3`` = up
(``lora_A (1, r, hidden)`` shared, ``lora_B (E, ffn, r)`` per expert) and ``w2`` = down
(``lora_A (E, r, ffn)`` per expert, ``lora_B (1, hidden, r)`` shared).

Base checkpoints come in two layouts, and the merge writes into whichever the base uses:

- **separate** -- ``experts.{e}.gate_proj.weight`` ``(ffn, hidden)`` etc. This is what the Hub
  checkpoints hold *and* what transformers 5.x ``save_pretrained`` writes (it reverses its load-time
  fusion on save).
- **fused** -- ``experts.gate_up_proj`` ``(E, 2*ffn, hidden)`` with gate rows first, then up rows,
  and ``experts.down_proj`` ``(E, hidden, ffn)``: transformers 5.x's in-memory layout, which it also
  loads directly from disk.

The PEFT export is always per expert (``experts.{e}.gate_proj`` ...): that is what vLLM serves, and
PEFT 0.21 converts it on load into ``target_parameters`` LoRA on the fused in-memory parameters
(it needs gate and up together, since they become one block-diagonal rank-2r LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from weightstore.errors import InvalidRequest
from weightstore.export._checkpoint import BaseCheckpoint, LoraModule, TinkerAdapter
from weightstore.export._ops import MergeOp, Rows
from weightstore.export._profile import (
    FamilyProfile,
    MergeTarget,
    PeftLayout,
    broadcast_experts,
    cast_like,
    config_experts,
    dense_peft_tensors,
    expert_slice,
    param,
)

# Tinker expert names -> transformers projection names (Qwen/DeepSeek convention: w1 gate, w3 up).
EXPERT_PROJECTIONS: Mapping[str, str] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Order of the projections stacked in a fused (E, 2*ffn, hidden) gate_up_proj.
FUSED_GATE_UP: tuple[str, str] = ("gate_proj", "up_proj")


class Qwen3MoeProfile(FamilyProfile):
    """Qwen3-MoE (e.g. Qwen3-30B-A3B)."""

    name: ClassVar[str] = "qwen3_moe"
    description: ClassVar[str] = "Qwen3-MoE (experts separate or fused gate_up_proj/down_proj)"
    model_types: ClassVar[frozenset[str]] = frozenset({"qwen3_moe"})

    def expert_merge_ops(self, module: LoraModule, block: str, kind: str, base: BaseCheckpoint) -> list[MergeTarget]:
        num_experts = config_experts(base)
        refs = broadcast_experts(module, num_experts)
        proj = EXPERT_PROJECTIONS[kind]
        out_dim, in_dim = module.b.shape[1], module.a.shape[2]
        ops: list[MergeTarget] = []
        if f"{block}.0.{proj}.weight" in base.tensors:  # separate layout
            for e, (a, b) in enumerate(refs):
                target = f"{block}.{e}.{proj}.weight"
                source = base.tensors.get(target)
                if source is None:
                    raise InvalidRequest(
                        f"adapter module {module.path}: base model lacks {target}", module=module.path, target=target
                    )
                if source.shape != (out_dim, in_dim):
                    raise InvalidRequest(
                        f"adapter module {module.path}: delta {(out_dim, in_dim)} does not match {target} {source.shape}",
                        module=module.path,
                        target=target,
                    )
                ops.append(MergeTarget(target, source, MergeOp(module.path, a, b, None, False, Rows.all(out_dim))))
            return ops
        fused = f"{block}.down_proj" if kind == "w2" else f"{block}.gate_up_proj"
        source = base.tensors.get(fused)
        if source is None:
            raise InvalidRequest(
                f"adapter module {module.path}: base model has neither {block}.0.{proj}.weight nor {fused}", module=module.path
            )
        if kind == "w2":
            expected = (num_experts, out_dim, in_dim)  # (E, hidden, ffn)
            rows = Rows.all(out_dim)
        else:
            expected = (num_experts, 2 * out_dim, in_dim)  # (E, 2*ffn, hidden): [gate rows | up rows]
            rows = Rows(FUSED_GATE_UP.index(proj) * out_dim, 1, out_dim)
        if source.shape != expected:
            raise InvalidRequest(
                f"adapter module {module.path}: {fused} is {source.shape}, expected {expected}", module=module.path, target=fused
            )
        for e, (a, b) in enumerate(refs):
            ops.append(MergeTarget(fused, source, MergeOp(module.path, a, b, e, False, rows)))
        return ops

    def expert_peft(
        self, layout: PeftLayout, block: str, kinds: Mapping[str, LoraModule], adapter: TinkerAdapter, base: BaseCheckpoint
    ) -> None:
        if ("w1" in kinds) != ("w3" in kinds):
            raise InvalidRequest(
                f"{block}: PEFT fuses gate (w1) and up (w3) into one LoRA on transformers 5.x, "
                "so the adapter must train both or neither"
            )
        for kind, module in sorted(kinds.items()):
            self.expert_merge_ops(module, block, kind, base)  # same shape checks as the merge
            proj = EXPERT_PROJECTIONS[kind]
            for e, (a, b) in enumerate(broadcast_experts(module, config_experts(base))):
                layout.tensors.extend(dense_peft_tensors(f"{block}.{e}.{proj}", module, a=a, b=b))
            layout.target_modules.add(proj)

    def expert_reference(
        self, model: nn.Module, block: str, kind: str, a: torch.Tensor, b: torch.Tensor, *, scale: float, cast: torch.dtype | None
    ) -> None:
        # transformers' Qwen3MoeExperts: gate_up_proj (E, 2*ffn, hidden), forward does
        # `linear(x, gate_up_proj[e]).chunk(2)` -> gate = first half of rows, up = second half;
        # down_proj (E, hidden, ffn). Written against that module, not against EXPERT_PROJECTIONS.
        experts = model.get_submodule(block)
        gate_up, down = param(experts, "gate_up_proj"), param(experts, "down_proj")
        num_experts, fused_rows = gate_up.shape[:2]
        half = fused_rows // 2
        rows = slice(0, half) if kind == "w1" else slice(half, 2 * half)
        for e in range(num_experts):
            view = down[e] if kind == "w2" else gate_up[e, rows]
            delta = expert_slice(b, e) @ expert_slice(a, e)
            view.copy_(cast_like(view.float() + scale * delta, cast).to(view.dtype))
