"""What every model family shares, and the hooks a family module overrides.

A *profile* answers three questions for its family, and nothing else:

1. **Merge**: which base tensor (and which slice of it) does each Tinker LoRA module land in?
   (:meth:`FamilyProfile.merge_ops`)
2. **PEFT**: which PEFT keys, tensor layouts and config fields make ``peft`` load the adapter onto
   this family's transformers model? (:meth:`FamilyProfile.peft_layout`)
3. **Reference**: how is the same adapter applied to a *loaded* transformers model, in memory?
   (:meth:`FamilyProfile.apply_reference`) -- used by verification as the independent
   "base + adapter" against which merged and PEFT outputs are compared. It is written against the
   model's in-memory parameters (whose layout transformers defines), never against the merge ops
   or the on-disk layout, so a wrong mapping in (1) or (2) cannot hide behind the same mistake here.

Dense modules (attention and MLP projections, ``unembed_tokens``) are handled here once; families
with experts override the ``expert_*`` hooks in their own module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from weightstore.errors import InvalidRequest
from weightstore.export._checkpoint import TINKER_PREFIX, BaseCheckpoint, LoraModule, TinkerAdapter
from weightstore.export._ops import FactorRef, MergeOp, PeftBlock, Rows
from weightstore.export._safetensors import TensorInfo

UNEMBED = "model.unembed_tokens"
LM_HEAD = "lm_head"
_EXPERT_MODULE = re.compile(r"^(?P<block>.+\.experts)\.(?P<kind>w[123])$")

LoadFactor = Callable[[str], torch.Tensor]
"""Loads an adapter tensor by key, as fp32."""


@dataclass(frozen=True)
class MergeTarget:
    """One merge op, with the output tensor it writes and the base tensor it reads."""

    target: str
    """Output tensor name."""
    source: TensorInfo
    """Base tensor that provides the starting values (``embed_tokens`` for an untied ``lm_head``)."""
    op: MergeOp
    """The delta and where it lands."""


@dataclass(frozen=True)
class PeftTensorSpec:
    """One tensor of a PEFT ``adapter_model.safetensors``: its name, shape and how to assemble it."""

    name: str
    """PEFT key, ``base_model.model.<module>.lora_A.weight`` etc."""
    dtype: str
    """safetensors dtype (that of the Tinker factors)."""
    shape: tuple[int, int]
    """2-D shape; regions no block covers are zero."""
    blocks: tuple[PeftBlock, ...]
    """Factor copies that fill it."""


@dataclass
class PeftLayout:
    """A PEFT adapter under construction: tensors plus the config fields they need."""

    tensors: list[PeftTensorSpec] = field(default_factory=list)
    target_modules: set[str] = field(default_factory=set)
    target_parameters: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def dense_peft_tensors(
    hf_module: str, module: LoraModule, *, a: FactorRef | None = None, b: FactorRef | None = None
) -> list[PeftTensorSpec]:
    """The two PEFT tensors of a plain ``nn.Linear`` LoRA: the factors copied unscaled."""
    a = a or FactorRef(module.a.name, None)
    b = b or FactorRef(module.b.name, None)
    a_shape = module.a.shape[-2:]
    b_shape = module.b.shape[-2:]
    prefix = f"{TINKER_PREFIX}{hf_module}"
    return [
        PeftTensorSpec(
            f"{prefix}.lora_A.weight",
            module.a.dtype,
            (a_shape[0], a_shape[1]),
            (PeftBlock(a, Rows.all(a_shape[0]), Rows.all(a_shape[1])),),
        ),
        PeftTensorSpec(
            f"{prefix}.lora_B.weight",
            module.b.dtype,
            (b_shape[0], b_shape[1]),
            (PeftBlock(b, Rows.all(b_shape[0]), Rows.all(b_shape[1])),),
        ),
    ]


def param(module: nn.Module, name: str) -> torch.Tensor:
    """A module's parameter by name, typed (``nn.Module.__getattr__`` is not)."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


def cast_like(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round ``x`` through ``dtype`` (the base's on-disk dtype) and back, or leave it alone."""
    return x if dtype is None else x.to(dtype).to(x.dtype)


class FamilyProfile:
    """Base profile: dense modules, embeddings and the registry metadata of a family."""

    name: ClassVar[str]
    """Short family name (``llama``, ``qwen``, ``qwen3_moe``, ``gpt_oss``)."""
    description: ClassVar[str]
    """One line for the support matrix and error messages."""
    model_types: ClassVar[frozenset[str]]
    """``config.json`` ``model_type`` values this profile handles."""
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    """Substring renames from Tinker module paths to transformers module paths."""
    embed_key: ClassVar[str] = "model.embed_tokens.weight"
    """The input embedding tensor (source of an untied ``lm_head``)."""

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") in self.model_types

    # --- naming ----------------------------------------------------------------------------------

    def hf_module(self, tinker_path: str) -> str:
        """The transformers module path of a Tinker module (``unembed_tokens`` is ``lm_head``)."""
        if tinker_path == UNEMBED:
            return LM_HEAD
        path = tinker_path
        for old, new in self.renames:
            path = path.replace(old, new)
        return path

    @staticmethod
    def expert_parts(hf_module: str) -> tuple[str, str] | None:
        """``(experts block path, w1|w2|w3)`` for an expert module, else None."""
        m = _EXPERT_MODULE.match(hf_module)
        return (m["block"], m["kind"]) if m else None

    # --- merge -----------------------------------------------------------------------------------

    def merge_ops(self, module: LoraModule, base: BaseCheckpoint) -> list[MergeTarget]:
        hf = self.hf_module(module.path)
        parts = self.expert_parts(hf)
        if parts is not None:
            return self.expert_merge_ops(module, parts[0], parts[1], base)
        return [self.dense_merge_op(module, hf, base)]

    def dense_source(self, module: LoraModule, hf: str, base: BaseCheckpoint) -> tuple[str, TensorInfo]:
        """The output tensor a dense module merges into, and the base tensor it starts from."""
        if len(module.a.shape) != 2:
            raise InvalidRequest(
                f"adapter module {module.path}: expected 2-D LoRA factors, got lora_A {module.a.shape}", module=module.path
            )
        if hf.endswith("embed_tokens"):
            # nn.Embedding LoRA has the transposed convention (delta = (B @ A).T); Tinker never
            # trains input embeddings, so an adapter that does is refused rather than guessed at.
            raise InvalidRequest(f"adapter module {module.path}: LoRA on input embeddings is not supported", module=module.path)
        target = f"{hf}.weight"
        if hf == LM_HEAD and base.ties_embeddings:
            # The merged model gets its own lm_head = embed_tokens + delta; folding the delta into
            # embed_tokens would also change the input embeddings (DESIGN §8).
            source = base.tensors.get(self.embed_key)
            if source is None:
                raise InvalidRequest(
                    f"adapter trains unembed_tokens but the tied base has no {self.embed_key}", module=module.path
                )
        else:
            source = base.tensors.get(target)
            if source is None:
                raise InvalidRequest(
                    f"adapter module {module.path} targets {target}, which the base model does not have",
                    module=module.path,
                    target=target,
                )
        out_dim, in_dim = module.b.shape[0], module.a.shape[1]
        if source.shape != (out_dim, in_dim):
            raise InvalidRequest(
                f"adapter module {module.path}: delta shape {(out_dim, in_dim)} does not match base tensor "
                f"{source.name} {source.shape}",
                module=module.path,
                target=target,
            )
        return target, source

    def dense_merge_op(self, module: LoraModule, hf: str, base: BaseCheckpoint) -> MergeTarget:
        target, source = self.dense_source(module, hf, base)
        op = MergeOp(
            module=module.path,
            a=FactorRef(module.a.name, None),
            b=FactorRef(module.b.name, None),
            expert=None,
            transposed=False,
            rows=Rows.all(source.shape[0]),
        )
        return MergeTarget(target, source, op)

    def expert_merge_ops(self, module: LoraModule, block: str, kind: str, base: BaseCheckpoint) -> list[MergeTarget]:
        raise InvalidRequest(f"family {self.name} has no experts, but the adapter has {module.path}", module=module.path)

    # --- PEFT ------------------------------------------------------------------------------------

    def peft_layout(self, adapter: TinkerAdapter, base: BaseCheckpoint) -> PeftLayout:
        layout = PeftLayout()
        expert_blocks: dict[str, dict[str, LoraModule]] = {}
        for module in adapter.modules.values():
            if module.is_empty:
                continue
            hf = self.hf_module(module.path)
            parts = self.expert_parts(hf)
            if parts is not None:
                expert_blocks.setdefault(parts[0], {})[parts[1]] = module
                continue
            self.dense_source(module, hf, base)  # same existence and shape checks as the merge
            layout.tensors.extend(dense_peft_tensors(hf, module))
            layout.target_modules.add(hf.rsplit(".", 1)[-1])
        for block, kinds in sorted(expert_blocks.items()):
            self.expert_peft(layout, block, kinds, adapter, base)
        return layout

    def expert_peft(
        self, layout: PeftLayout, block: str, kinds: Mapping[str, LoraModule], adapter: TinkerAdapter, base: BaseCheckpoint
    ) -> None:
        first = next(iter(kinds.values()))
        raise InvalidRequest(f"family {self.name} has no experts, but the adapter has {first.path}", module=first.path)

    # --- reference (in memory, on a loaded transformers model) ------------------------------------

    def apply_reference(
        self, model: nn.Module, adapter: TinkerAdapter, load: LoadFactor, *, scale: float, cast: torch.dtype | None
    ) -> None:
        """Add every LoRA delta to ``model``'s parameters in place (fp32 math, optional rounding)."""
        with torch.no_grad():
            for module in adapter.modules.values():
                if module.is_empty:
                    continue
                hf = self.hf_module(module.path)
                parts = self.expert_parts(hf)
                a, b = load(module.a.name), load(module.b.name)
                if parts is not None:
                    self.expert_reference(model, parts[0], parts[1], a, b, scale=scale, cast=cast)
                    continue
                linear = model.get_submodule(hf)
                weight = param(linear, "weight")
                if hf == LM_HEAD and weight is param(getattr(model, "get_input_embeddings")(), "weight"):  # noqa: B009
                    # untie first, exactly what the merged model will be
                    linear.weight = nn.Parameter(weight.detach().clone())
                    weight = param(linear, "weight")
                weight.copy_(cast_like(weight.float() + scale * (b @ a), cast).to(weight.dtype))

    def expert_reference(
        self, model: nn.Module, block: str, kind: str, a: torch.Tensor, b: torch.Tensor, *, scale: float, cast: torch.dtype | None
    ) -> None:
        raise InvalidRequest(f"family {self.name} has no experts")


def config_experts(base: BaseCheckpoint) -> int:
    """The expert count from the base config (``num_experts`` on the Hub, ``num_local_experts`` as
    transformers 5.x writes it -- the two are aliases in its config classes)."""
    for key in ("num_experts", "num_local_experts"):
        n = base.config.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    raise InvalidRequest(f"{base.model_type} base config has neither num_experts nor num_local_experts")


def broadcast_experts(module: LoraModule, num_experts: int) -> list[tuple[FactorRef, FactorRef]]:
    """Per-expert ``(lora_A, lora_B)`` refs for Tinker's shared-outer 3-D factors.

    One factor is shared (leading dim 1) and broadcast to every expert, the other is per expert
    (leading dim E). Both shared, or a leading dim that is neither 1 nor the base's expert count,
    is refused: there is no unambiguous reading of such an adapter.
    """
    a, b = module.a.shape, module.b.shape
    if len(a) != 3 or len(b) != 3:
        raise InvalidRequest(
            f"adapter module {module.path}: expert LoRA factors must be 3-D, got lora_A {a}, lora_B {b}", module=module.path
        )
    if a[0] == 1 and b[0] == 1:
        raise InvalidRequest(
            f"adapter module {module.path}: both factors are shared (leading dim 1); cannot tell the expert count",
            module=module.path,
        )
    for what, dim in (("lora_A", a[0]), ("lora_B", b[0])):
        if dim not in (1, num_experts):
            raise InvalidRequest(
                f"adapter module {module.path}: {what} has {dim} experts, the base model {num_experts}", module=module.path
            )
    return [
        (FactorRef(module.a.name, 0 if a[0] == 1 else e), FactorRef(module.b.name, 0 if b[0] == 1 else e))
        for e in range(num_experts)
    ]


def expert_slice(t: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` of a 3-D Tinker factor, broadcasting a shared (size-1) leading dim."""
    return t[0] if t.shape[0] == 1 else t[e]
