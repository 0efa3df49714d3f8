"""Plan an export before touching any tensor data: what merges into what, and what gets written.

A plan is built from headers alone and is complete: every output tensor with its source and its
merge ops (or every PEFT tensor with the factor blocks that fill it), the output shards with their
tensor lists, and the config files. Building it checks everything that can fail without data:

- the family is known, the base is not quantised, the adapter's rank and shapes are consistent;
- every adapter module lands somewhere that exists, with matching shapes -- no adapter key unused;
- every op fits its target view, and no two ops of the same target write overlapping rows
  (a profile that mapped ``w1`` and ``w3`` to the same slice would be refused here).

Execution (``_merge``, ``_peft``) then only moves bytes and does arithmetic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from weightstore.errors import InvalidRequest
from weightstore.export._checkpoint import BaseCheckpoint, TinkerAdapter, open_adapter, open_base
from weightstore.export._ops import MergeOp, Rows
from weightstore.export._profile import LM_HEAD, FamilyProfile, PeftTensorSpec
from weightstore.export._registry import profile_for
from weightstore.export._safetensors import OutEntry, TensorInfo, order_for_alignment

ExportTarget = Literal["peft", "merged"]

# Hugging Face's default max_shard_size ("5GB", decimal): the usual shard size of Hub checkpoints.
DEFAULT_SHARD_BYTES = 5_000_000_000
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
MERGED_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of a merged model: where its starting bytes come from and which deltas it gets."""

    name: str
    """Output tensor name."""
    source: TensorInfo
    """Base tensor read for it (``embed_tokens`` for an ``lm_head`` untied from a tied base)."""
    ops: tuple[MergeOp, ...]
    """LoRA deltas added to it; empty means the bytes are copied unchanged."""

    @property
    def entry(self) -> OutEntry:
        return OutEntry(self.name, self.source.dtype, self.source.shape)


@dataclass(frozen=True)
class OutputShard:
    """One output safetensors file."""

    file: str
    """File name inside the output directory."""
    entries: tuple[OutEntry, ...]
    """Its tensors, in the order (and hence at the offsets) they are written."""

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export will do, decided from headers alone."""

    to: ExportTarget
    """``peft`` (adapter in PEFT format) or ``merged`` (full model with the delta folded in)."""
    family: str
    """Profile that produced the mapping."""
    base: BaseCheckpoint
    """The opened base model."""
    adapter: TinkerAdapter
    """The opened Tinker adapter."""
    modules: tuple[str, ...]
    """Tinker modules the export consumes (all non-empty modules of the adapter)."""
    merged: tuple[MergedTensor, ...] = ()
    """Merged exports: every output tensor, keyed by name through :attr:`shards` order."""
    peft: tuple[PeftTensorSpec, ...] = ()
    """PEFT exports: every tensor of ``adapter_model.safetensors``."""
    shards: tuple[OutputShard, ...] = ()
    """Output safetensors files and their layouts."""
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Merged exports: keys changed in ``config.json`` (``tie_word_embeddings: false`` when untying)."""
    peft_config: Mapping[str, Any] = field(default_factory=dict)
    """PEFT exports: the ``adapter_config.json`` to write."""
    copy_files: tuple[str, ...] = ()
    """Merged exports: base files (tokenizer, generation config, ...) copied verbatim."""

    @property
    def scale(self) -> float:
        return self.adapter.scale

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def adapted_tensors(self) -> tuple[MergedTensor, ...]:
        return tuple(t for t in self.merged if t.ops)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (what ``--dry-run`` prints and the job stores)."""
        return {
            "to": self.to,
            "family": self.family,
            "rank": self.adapter.rank,
            "lora_alpha": self.adapter.alpha,
            "scale": self.scale,
            "adapter_modules": len(self.modules),
            "base_tensors": len(self.base.tensors),
            "base_bytes": self.base.total_bytes,
            "output_files": [s.file for s in self.shards],
            "output_bytes": self.output_bytes,
            "adapted_tensors": len(self.adapted_tensors),
            "merge_ops": sum(len(t.ops) for t in self.merged),
            "peft_tensors": len(self.peft),
            "untied_lm_head": bool(self.config_overrides.get("tie_word_embeddings") is False),
        }


def _view_shape(target: TensorInfo, op: MergeOp) -> tuple[int, int]:
    """The ``(out, in)`` shape of the 2-D view ``op`` adds into (checked independently of profiles)."""
    shape = target.shape
    if op.expert is None:
        if len(shape) != 2:
            raise InvalidRequest(f"{op.module}: target {target.name} {shape} is not 2-D", module=op.module)
        view = shape
    else:
        if len(shape) != 3 or not 0 <= op.expert < shape[0]:
            raise InvalidRequest(f"{op.module}: expert {op.expert} does not exist in {target.name} {shape}", module=op.module)
        view = shape[1:]
    out_dim, in_dim = (view[1], view[0]) if op.transposed else (view[0], view[1])
    return out_dim, in_dim


def factor_shapes(adapter: TinkerAdapter) -> dict[str, tuple[int, ...]]:
    """Shape of every adapter tensor by key."""
    return {i.name: i.shape for m in adapter.modules.values() for i in (m.a, m.b)}


def _factor_shape(shapes: Mapping[str, tuple[int, ...]], key: str, index: int | None) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise InvalidRequest(f"adapter has no tensor {key}", key=key)
    if index is None:
        return shape
    if len(shape) != 3 or not 0 <= index < shape[0]:
        raise InvalidRequest(f"adapter factor {key} has no expert {index}", key=key)
    return shape[1:]


def _overlap(a: Rows, b: Rows) -> bool:
    """Whether two strided row ranges share an index (arithmetic for the layouts that occur)."""
    if a.step == b.step:
        if (a.start - b.start) % a.step:
            return False  # interleaved: different residues never meet
        return a.start < b.stop and b.start < a.stop
    return bool(set(a.indices()) & set(b.indices()))


def check_merge_ops(
    name: str, source: TensorInfo, ops: list[MergeOp] | tuple[MergeOp, ...], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Every op fits the target's view, and ops on the same view never write the same rows."""
    _ = source.torch_dtype  # refuses integer/fp8 targets before any work
    by_unit: dict[int | None, list[MergeOp]] = {}
    for op in ops:
        out_dim, in_dim = _view_shape(source, op)
        a_shape = _factor_shape(shapes, op.a.key, op.a.index)
        b_shape = _factor_shape(shapes, op.b.key, op.b.index)
        if op.rows.stop > out_dim or a_shape[1] != in_dim or b_shape[0] != op.rows.count:
            raise InvalidRequest(
                f"{op.module}: delta {b_shape[0]}x{a_shape[1]} does not fit rows {op.rows} of {name} (view {out_dim}x{in_dim})",
                module=op.module,
                target=name,
            )
        for other in by_unit.get(op.expert, ()):
            if _overlap(op.rows, other.rows):
                where = "" if op.expert is None else f" expert {op.expert}"
                raise InvalidRequest(
                    f"{op.module} and {other.module} write the same rows of {name}{where}", module=op.module, target=name
                )
        by_unit.setdefault(op.expert, []).append(op)


def assign_shards(entries: list[OutEntry], shard_bytes: int) -> tuple[OutputShard, ...]:
    """Greedy, order-preserving split into files of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    groups: list[list[OutEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return tuple(OutputShard(name, tuple(order_for_alignment(g))) for name, g in zip(names, groups, strict=True))


def _unused_keys(adapter: TinkerAdapter, used: set[str]) -> list[str]:
    return sorted(k for m in adapter.modules.values() if not m.is_empty for k in (m.a.name, m.b.name) if k not in used)


def build_plan(
    base: BaseCheckpoint,
    adapter: TinkerAdapter,
    *,
    to: ExportTarget,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    base_model_name: str | None = None,
) -> ExportPlan:
    """Plan an export of ``adapter`` onto ``base`` (both already opened)."""
    if to not in ("peft", "merged"):
        raise InvalidRequest(f"export target must be 'peft' or 'merged', got {to!r}")
    if shard_bytes <= 0:
        raise InvalidRequest("shard size must be positive")
    if base.config.get("quantization_config"):
        method = base.config["quantization_config"].get("quant_method", "?")
        raise InvalidRequest(
            f"quantised base models ({method}) are not supported; use a bf16/fp32 checkpoint", quant_method=str(method)
        )
    profile = profile_for(base.config)
    modules = tuple(p for p, m in adapter.modules.items() if not m.is_empty)
    if to == "peft":
        return _plan_peft(base, adapter, profile, modules, base_model_name)

    by_target: dict[str, tuple[TensorInfo, list[MergeOp]]] = {}
    used: set[str] = set()
    for path in modules:
        for mt in profile.merge_ops(adapter.modules[path], base):
            source, ops = by_target.setdefault(mt.target, (mt.source, []))
            if source != mt.source:
                raise InvalidRequest(f"{path}: {mt.target} has two different sources", target=mt.target)
            ops.append(mt.op)
            used.update((mt.op.a.key, mt.op.b.key))
    unused = _unused_keys(adapter, used)
    if unused:
        raise InvalidRequest(f"adapter keys not used by the {profile.name} mapping: {', '.join(unused[:5])}", keys=unused[:20])
    shapes = factor_shapes(adapter)
    for name, (source, ops) in by_target.items():
        check_merge_ops(name, source, ops, shapes)

    untie = LM_HEAD + ".weight" in by_target and base.ties_embeddings
    tensors: list[MergedTensor] = []
    for name, info in base.tensors.items():
        source, ops = by_target.get(name, (info, []))
        tensors.append(MergedTensor(name, source, tuple(ops)))
    for name, (source, ops) in by_target.items():
        if name not in base.tensors:  # an lm_head materialised from a tied base
            tensors.append(MergedTensor(name, source, tuple(ops)))
    return ExportPlan(
        to="merged",
        family=profile.name,
        base=base,
        adapter=adapter,
        modules=modules,
        merged=tuple(tensors),
        shards=assign_shards([t.entry for t in tensors], shard_bytes),
        config_overrides={"tie_word_embeddings": False} if untie else {},
        copy_files=base.aux_files,
    )


def _plan_peft(
    base: BaseCheckpoint, adapter: TinkerAdapter, profile: FamilyProfile, modules: tuple[str, ...], base_model_name: str | None
) -> ExportPlan:
    layout = profile.peft_layout(adapter, base)
    counts = Counter(t.name for t in layout.tensors)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise InvalidRequest(f"PEFT mapping produced duplicate keys: {', '.join(dupes[:5])}", keys=dupes[:20])
    used = {b.source.key for t in layout.tensors for b in t.blocks}
    unused = _unused_keys(adapter, used)
    if unused:
        raise InvalidRequest(
            f"adapter keys not used by the {profile.name} PEFT mapping: {', '.join(unused[:5])}", keys=unused[:20]
        )
    shapes = factor_shapes(adapter)
    for spec in layout.tensors:
        for block in spec.blocks:
            src = _factor_shape(shapes, block.source.key, block.source.index)
            if (
                block.rows.stop > spec.shape[0]
                or block.cols.stop > spec.shape[1]
                or (block.rows.count, block.cols.count) != tuple(src)
            ):
                raise InvalidRequest(f"PEFT block {block} does not fit {spec.name} {spec.shape}", key=spec.name)
    name = base_model_name or adapter.base_model_name or base.root.name
    config: dict[str, Any] = {
        "alpha_pattern": dict(sorted(layout.alpha_pattern.items())),
        "base_model_name_or_path": name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": adapter.alpha if not float(adapter.alpha).is_integer() else int(adapter.alpha),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": adapter.rank,
        "rank_pattern": dict(sorted(layout.rank_pattern.items())),
        "target_modules": sorted(layout.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    if layout.target_parameters:
        config["target_parameters"] = list(layout.target_parameters)
    entries = [OutEntry(t.name, t.dtype, t.shape) for t in sorted(layout.tensors, key=lambda t: t.name)]
    return ExportPlan(
        to="peft",
        family=profile.name,
        base=base,
        adapter=adapter,
        modules=modules,
        peft=tuple(sorted(layout.tensors, key=lambda t: t.name)),
        shards=(OutputShard(PEFT_WEIGHTS, tuple(order_for_alignment(entries))),),
        peft_config=config,
    )


def plan_export(
    adapter_dir: str | Path,
    base_dir: str | Path,
    *,
    to: ExportTarget,
    shard_size: int = DEFAULT_SHARD_BYTES,
    base_model_name: str | None = None,
    base_sha256: Mapping[str, str] | None = None,
    adapter_sha256: Mapping[str, str] | None = None,
) -> ExportPlan:
    """Open both inputs (header-only, hashes checked when given) and plan the export."""
    base = open_base(Path(base_dir), expected_sha256=base_sha256)
    adapter = open_adapter(Path(adapter_dir), expected_sha256=adapter_sha256)
    return build_plan(base, adapter, to=to, shard_bytes=shard_size, base_model_name=base_model_name)
