"""GPT-OSS: Tinker's ``attn`` is transformers' ``self_attn``; experts are fused, transposed, interleaved.

transformers' ``GptOssExperts`` (and the Hub checkpoints, once dequantised) store
``gate_up_proj`` as ``(E, hidden, 2*ffn)`` -- ``(in, out)`` per expert -- with gate and up
*interleaved* along the output axis (``[g0, u0, g1, u1, ...]``; the forward takes ``[..., ::2]`` as
gate and ``[..., 1::2]`` as up), and ``down_proj`` as ``(E, ffn, hidden)``. Tinker's ``w1`` (gate),
``w3`` (up) and ``w2`` (down) deltas land transposed, gate on even and up on odd output columns.

PEFT cannot load per-expert module names here (transformers has no conversion for GPT-OSS), so the
PEFT export targets the 3-D parameters directly (``target_parameters``). PEFT's ``ParamWrapper``
packs ``E`` experts of rank ``R`` as ``lora_A (R*E, in)`` (expert-major rows: ``e*R + j``) and
``lora_B (out, R*E)`` (rank-major columns: ``j*E + e``). Gate and up share one wrapper, so they
become one rank-``2r`` LoRA: ``A = [A_gate; A_up]`` and a block-diagonal ``B`` whose gate block
feeds the even output rows and up block the odd ones; ``rank_pattern``/``alpha_pattern`` double
``r`` and ``lora_alpha`` for it so the scaling ``alpha / r`` is unchanged. With both parameters
targeted PEFT nests the wrappers (``gate_up_proj`` inner, i.e. under ``experts.base_layer``;
``down_proj`` outer, under ``experts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from weightstore.errors import InvalidRequest
from weightstore.export._checkpoint import TINKER_PREFIX, BaseCheckpoint, LoraModule, TinkerAdapter
from weightstore.export._ops import MergeOp, PeftBlock, Rows
from weightstore.export._profile import (
    FamilyProfile,
    MergeTarget,
    PeftLayout,
    PeftTensorSpec,
    broadcast_experts,
    cast_like,
    config_experts,
    expert_slice,
    param,
)

GATE_UP = "gate_up_proj"
DOWN = "down_proj"
# Output-row offset of each Tinker expert LoRA inside the interleaved gate_up_proj (gate even, up odd).
INTERLEAVE_OFFSET: Mapping[str, int] = {"w1": 0, "w3": 1}


class GptOssProfile(FamilyProfile):
    """GPT-OSS 20B / 120B (bf16 or dequantised checkpoints)."""

    name: ClassVar[str] = "gpt_oss"
    description: ClassVar[str] = "GPT-OSS (fused interleaved gate_up_proj; bf16/fp32 bases, not MXFP4)"
    model_types: ClassVar[frozenset[str]] = frozenset({"gpt_oss"})
    renames: ClassVar[tuple[tuple[str, str], ...]] = ((".attn.", ".self_attn."),)

    def _target(self, module: LoraModule, block: str, kind: str, base: BaseCheckpoint) -> tuple[Any, Rows]:
        num_experts = config_experts(base)
        out_dim, in_dim = module.b.shape[1], module.a.shape[2]
        if kind == "w2":
            name, expected, rows = f"{block}.{DOWN}", (num_experts, in_dim, out_dim), Rows.all(out_dim)
        else:
            name, expected = f"{block}.{GATE_UP}", (num_experts, in_dim, 2 * out_dim)
            rows = Rows(INTERLEAVE_OFFSET[kind], 2, out_dim)
        source = base.tensors.get(name)
        if source is None:
            hint = " (MXFP4-quantised bases must be dequantised first)" if f"{name}_blocks" in base.tensors else ""
            raise InvalidRequest(f"adapter module {module.path}: base model lacks {name}{hint}", module=module.path, target=name)
        if source.shape != expected:
            raise InvalidRequest(
                f"adapter module {module.path}: {name} is {source.shape}, expected {expected}", module=module.path, target=name
            )
        return source, rows

    def expert_merge_ops(self, module: LoraModule, block: str, kind: str, base: BaseCheckpoint) -> list[MergeTarget]:
        source, rows = self._target(module, block, kind, base)
        refs = broadcast_experts(module, config_experts(base))
        return [MergeTarget(source.name, source, MergeOp(module.path, a, b, e, True, rows)) for e, (a, b) in enumerate(refs)]

    def expert_peft(
        self, layout: PeftLayout, block: str, kinds: Mapping[str, LoraModule], adapter: TinkerAdapter, base: BaseCheckpoint
    ) -> None:
        num_experts, r = config_experts(base), adapter.rank
        for kind, module in kinds.items():
            self._target(module, block, kind, base)  # same shape checks as the merge
        # target_parameters applies to every layer, so the targeted set (and hence the nesting) is
        # decided from the whole adapter, not from this block alone.
        kinds_everywhere = {parts[1] for p in adapter.modules if (parts := self.expert_parts(self.hf_module(p))) is not None}
        has_gate_up = bool(kinds_everywhere & {"w1", "w3"})
        has_down = "w2" in kinds_everywhere
        prefix = f"{TINKER_PREFIX}{block}"
        if has_gate_up:
            gate_up = f"{prefix}.base_layer" if has_down else prefix
            hidden = base.tensors[f"{block}.{GATE_UP}"].shape[1]
            two_ffn = base.tensors[f"{block}.{GATE_UP}"].shape[2]
            rank = 2 * r
            a_blocks, b_blocks = [], []
            for kind, j0 in (("w1", 0), ("w3", r)):
                half = kinds.get(kind)
                if half is None:
                    continue  # the other half of the block-diagonal LoRA stays zero
                for e, (a, b) in enumerate(broadcast_experts(half, num_experts)):
                    a_blocks.append(PeftBlock(a, Rows(e * rank + j0, 1, r), Rows.all(hidden)))
                    b_blocks.append(
                        PeftBlock(b, Rows(INTERLEAVE_OFFSET[kind], 2, two_ffn // 2), Rows(j0 * num_experts + e, num_experts, r))
                    )
            dtype = next(iter(kinds.values())).a.dtype if kinds else "F32"
            layout.tensors.append(
                PeftTensorSpec(f"{gate_up}.lora_A.weight", dtype, (rank * num_experts, hidden), tuple(a_blocks))
            )
            layout.tensors.append(
                PeftTensorSpec(f"{gate_up}.lora_B.weight", dtype, (two_ffn, rank * num_experts), tuple(b_blocks))
            )
            layout.rank_pattern[GATE_UP] = rank
            layout.alpha_pattern[GATE_UP] = 2 * adapter.alpha
            if f"mlp.experts.{GATE_UP}" not in layout.target_parameters:
                layout.target_parameters.append(f"mlp.experts.{GATE_UP}")
        if has_down:
            ffn, hidden = base.tensors[f"{block}.{DOWN}"].shape[1:]
            a_blocks, b_blocks = [], []
            w2 = kinds.get("w2")
            if w2 is not None:
                for e, (a, b) in enumerate(broadcast_experts(w2, num_experts)):
                    a_blocks.append(PeftBlock(a, Rows(e * r, 1, r), Rows.all(ffn)))
                    b_blocks.append(PeftBlock(b, Rows.all(hidden), Rows(e, num_experts, r)))
            dtype = w2.a.dtype if w2 is not None else "F32"
            layout.tensors.append(PeftTensorSpec(f"{prefix}.lora_A.weight", dtype, (r * num_experts, ffn), tuple(a_blocks)))
            layout.tensors.append(PeftTensorSpec(f"{prefix}.lora_B.weight", dtype, (hidden, r * num_experts), tuple(b_blocks)))
            if f"mlp.experts.{DOWN}" not in layout.target_parameters:
                layout.target_parameters.append(f"mlp.experts.{DOWN}")

    def expert_reference(
        self, model: nn.Module, block: str, kind: str, a: torch.Tensor, b: torch.Tensor, *, scale: float, cast: torch.dtype | None
    ) -> None:
        # transformers' GptOssExperts: `gate_up = x @ gate_up_proj[e]`, gate = gate_up[..., ::2],
        # up = gate_up[..., 1::2]; `out = h @ down_proj[e]`. Weights are (in, out), so the
        # (out, in) LoRA delta goes in transposed. Written against that module, not the merge ops.
        experts = model.get_submodule(block)
        gate_up, down = param(experts, "gate_up_proj"), param(experts, "down_proj")
        columns = slice(0, None, 2) if kind == "w1" else slice(1, None, 2)  # gate even, up odd
        for e in range(gate_up.shape[0]):
            view = down[e] if kind == "w2" else gate_up[e][:, columns]
            delta = (expert_slice(b, e) @ expert_slice(a, e)).T
            view.copy_(cast_like(view.float() + scale * delta, cast).to(view.dtype))
