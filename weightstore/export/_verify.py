"""Verification run inside every export, before the output is renamed into place.

Three checks, each aimed at a different way merge tools have corrupted weights:

1. **No-op guard** -- a non-zero adapter must change the model. Measured in the merge loop on the
   values actually written: per tensor, whether anything changed and how much of the intended
   delta rounding into the base dtype swallowed (warning above ``rounding_warn_fraction``).
2. **Sampled recomputation** -- the output files are re-read from disk with a different reader
   (``safetensors.safe_open``, mmap) and sampled tensors are recomputed in float64 from the base
   and adapter files, then compared element-wise against a rounding bound derived from the dtype.
   Untouched tensors are compared byte for byte; the output's tensor list, dtypes and shapes must
   equal the plan's. This catches wrong bytes, offsets, scales, rows and shards.
3. **Forward pass** (models up to ``forward_max_bytes``) -- the exported model (merged: loaded with
   ``AutoModelForCausalLM``; PEFT: ``PeftModel`` on the base) against *base + adapter* built by the
   family's ``apply_reference`` directly on a loaded transformers model. That reference never uses
   the merge ops or the on-disk layout, so a wrong mapping (swapped gate/up, wrong expert) shows up
   as a logits mismatch even though checks 1 and 2 -- which follow the plan -- are satisfied.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from weightstore.errors import InvalidFormat, VerificationFailed, WeightstoreError
from weightstore.export._checkpoint import FactorReader, TinkerAdapter
from weightstore.export._ops import FactorRef
from weightstore.export._plan import MERGED_INDEX, ExportPlan, MergedTensor
from weightstore.export._registry import profile_for
from weightstore.export._results import (
    ForwardCheck,
    NoOpGuard,
    RecomputeCheck,
    TensorDelta,
    VerificationReport,
)
from weightstore.export._safetensors import TORCH_DTYPES, TensorInfo, read_header

# Forward checks load the model twice in fp32 (reference, then export), i.e. ~4x the bf16 size
# in memory at the peak of each load; 512 MB of weights keeps that near 2 GB on a worker.
DEFAULT_FORWARD_MAX_BYTES = 512_000_000
# Rounding into bf16 swallowing more than half of a delta's norm means the merged model no longer
# carries most of what was trained -- worth telling the user (the PEFT export keeps it intact).
DEFAULT_ROUNDING_WARN_FRACTION = 0.5
DEFAULT_SAMPLES = 6
# Forward tolerances relative to max(1, max |reference logit|). Merged: the reference rounds its
# weights to the base dtype exactly like the merge, so only fp32 summation order differs (an
# occasional 1-ulp weight); PEFT: unmerged fp32 LoRA vs merged fp32 reference, summation order only.
FORWARD_RTOL = {"merged": 1e-3, "peft": 1e-4}
# A forward check whose adapter effect is below this multiple of its tolerance proves little.
WEAK_SIGNAL_RATIO = 10.0
_FORWARD_SHAPE = (2, 16)
_ROWS_PER_PROBE, _PROBES = 16, 4


# --- 1. no-op guard -----------------------------------------------------------------------------


def noop_guard(deltas: list[TensorDelta], warn_fraction: float, *, adapter_is_zero: bool) -> NoOpGuard:
    """``deltas`` as measured on the written values; ``adapter_is_zero`` decided from the factors alone,
    so a merge loop that silently skipped its work cannot also report a zero adapter."""
    delta_sq = sum(d.delta_norm**2 for d in deltas)
    lost_sq = sum(d.lost_norm**2 for d in deltas)
    unchanged = tuple(d.name for d in deltas if d.delta_norm > 0 and not d.changed)
    all_unchanged = bool(deltas) and not any(d.changed for d in deltas)
    return NoOpGuard(
        passed=adapter_is_zero or not all_unchanged,
        adapter_is_zero=adapter_is_zero,
        adapted_tensors=len(deltas),
        unchanged_tensors=unchanged,
        rounding_loss=math.sqrt(lost_sq / delta_sq) if delta_sq > 0 else 0.0,
        rounding_warn_fraction=warn_fraction,
        rounding_warned=tuple(d.name for d in deltas if d.lost_fraction > warn_fraction),
    )


def module_delta_norms(adapter: TinkerAdapter) -> list[TensorDelta]:
    """Norm of each module's ``scale * B @ A`` (per expert, summed) via ``||BA||^2 = <A A^T, B^T B>``.

    r x r products in fp32 (summed in fp64): cheap, accurate enough for a norm, and exactly zero
    for a zero factor -- which is what decides "the adapter is zero".
    """
    out = []
    with FactorReader(adapter) as factors:
        for module in adapter.modules.values():
            if module.is_empty:
                continue
            a = factors.raw(FactorRef(module.a.name, None)).float()
            b = factors.raw(FactorRef(module.b.name, None)).float()
            if a.dim() == 2:
                sq = float(((a @ a.T) * (b.T @ b)).sum(dtype=torch.float64))
            else:
                # (1|E, r, r) * (E|1, r, r) broadcasts the shared factor to every expert
                sq = float(((a @ a.transpose(1, 2)) * (b.transpose(1, 2) @ b)).sum(dtype=torch.float64))
            norm = adapter.scale * math.sqrt(max(sq, 0.0))
            out.append(TensorDelta(module.path, norm > 0, norm, 0.0))
    return out


# --- 2. sampled recomputation --------------------------------------------------------------------

_HALF_ULP = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


def _spread(items: list[Any], n: int) -> list[Any]:
    """Up to ``n`` items evenly spread over ``items``, always including the first and the last."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


class _Opened:
    """safetensors files opened with safe_open (mmap), kept open for the whole check."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}  # safe_open handles: safetensors ships no types for them
        self._stack = contextlib.ExitStack()

    def __call__(self, path: Path) -> Any:
        from safetensors import safe_open

        handle = self._handles.get(path)
        if handle is None:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            self._handles[path] = handle
        return handle

    def close(self) -> None:
        self._stack.close()


def _row_probes(n_rows: int) -> list[range]:
    """A few short row ranges spread over a tensor (start, middle, end)."""
    if n_rows <= _ROWS_PER_PROBE * _PROBES:
        return [range(n_rows)]
    starts = _spread(list(range(0, n_rows - _ROWS_PER_PROBE + 1)), _PROBES)
    return [range(s, s + _ROWS_PER_PROBE) for s in starts]


def _check_slab(
    t: MergedTensor,
    expert: int | None,
    out_slab: torch.Tensor,
    base_slab: torch.Tensor,
    rows: list[int],
    factors: FactorReader,
    scale: float,
    rank: int,
) -> tuple[float, float]:
    """Compare one (out, in)-oriented slab's selected rows with an fp64 recomputation.

    Returns (max abs error, max error/allowed ratio). ``out_slab``/``base_slab`` hold exactly the
    rows in ``rows`` (fp64).
    """
    expected = base_slab.clone()
    magnitude = base_slab.abs()
    pos = {r: i for i, r in enumerate(rows)}
    for op in t.ops:
        if op.expert != expert:
            continue
        sel = [r for r in op.rows.indices() if r in pos]
        if not sel:
            continue
        k = torch.tensor([(r - op.rows.start) // op.rows.step for r in sel])
        at = torch.tensor([pos[r] for r in sel])
        a = factors.raw(op.a).double()
        b = factors.raw(op.b)[k].double()
        expected[at] += scale * (b @ a)
        magnitude[at] += scale * (b.abs() @ a.abs())
    dtype = t.source.dtype
    # |written - exact| <= half an ulp of the result (relative) + what fp32 accumulation of
    # W + scale*B@A (r products) can be off by before that rounding, + half the smallest subnormal.
    finfo = torch.finfo(TORCH_DTYPES[dtype])
    allowed = _HALF_ULP[dtype] * expected.abs() + (rank + 2) * 2.0**-23 * magnitude + finfo.smallest_normal * finfo.eps / 2
    err = (out_slab - expected).abs()
    return float(err.max()) if err.numel() else 0.0, float((err / allowed).max()) if err.numel() else 0.0


def output_tensors(out_dir: Path) -> dict[str, TensorInfo]:
    """The tensors of a merged output directory, via its index (checked against the shards) or single file."""
    index_path = out_dir / MERGED_INDEX
    if not index_path.exists():
        return read_header(out_dir / "model.safetensors")[0]
    weight_map = json.loads(index_path.read_text()).get("weight_map", {})
    written: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        written.update(read_header(out_dir / shard)[0])
    if weight_map != {n: i.file.name for n, i in written.items()}:
        raise InvalidFormat("the output index does not match its shards")
    return written


def _same_bytes(a: TensorInfo, b: TensorInfo, chunk: int = 1 << 20) -> bool:
    """Compare two tensors' bytes on disk: all of a small tensor, three 1 MB windows of a big one.

    Windows (start, middle, end) catch a wrong source, offset or length of the kernel copy without
    re-reading gigabytes of embeddings on every export.
    """
    if a.nbytes != b.nbytes:
        return False
    starts = [0] if a.nbytes <= 3 * chunk else [0, (a.nbytes - chunk) // 2, a.nbytes - chunk]
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        for start in starts:
            n = min(chunk, a.nbytes - start) if a.nbytes > 3 * chunk else a.nbytes
            fa.seek(a.offset + start)
            fb.seek(b.offset + start)
            if fa.read(n) != fb.read(n):
                return False
    return True


def recompute_merged(plan: ExportPlan, out_dir: Path, samples: int) -> RecomputeCheck:
    tolerance = "|written - fp64(W + scale*B@A)| <= half-ulp(dtype)*|expected| + (r+2)*2^-23*(|W| + scale*|B|@|A|)"
    # Structure: the output holds exactly the planned tensors with the planned dtypes and shapes.
    try:
        written = output_tensors(out_dir)
    except WeightstoreError as exc:
        return RecomputeCheck(False, (), (), math.inf, math.inf, tolerance, f"unreadable output: {exc}")
    expected_meta = {t.name: (t.source.dtype, t.source.shape) for t in plan.merged}
    actual_meta = {n: (i.dtype, i.shape) for n, i in written.items()}
    if expected_meta != actual_meta:
        diff = sorted(set(expected_meta.items()) ^ set(actual_meta.items()))
        return RecomputeCheck(False, (), (), math.inf, math.inf, tolerance, f"output tensors differ from the plan: {diff[:3]}")

    adapted = [t for t in plan.merged if t.ops]
    lm_head = [t for t in adapted if t.name == "lm_head.weight"]
    sampled = _spread(adapted, samples) + [t for t in lm_head if t not in _spread(adapted, samples)]
    untouched = _spread([t for t in plan.merged if not t.ops], samples)
    opened = _Opened()
    max_err, worst = 0.0, 0.0
    try:
        with FactorReader(plan.adapter) as factors:
            for t in sampled:
                out_f = opened(written[t.name].file)
                base_f = opened(t.source.file)
                shape = t.source.shape
                if len(shape) == 3:
                    experts = sorted({op.expert for op in t.ops if op.expert is not None})
                    units: list[tuple[int | None, Any, Any]] = []
                    for e in _spread(experts, 3):
                        units.append((e, out_f.get_slice(t.name)[e : e + 1][0], base_f.get_slice(t.source.name)[e : e + 1][0]))
                else:
                    units = [(None, None, None)]
                for expert, out_slab, base_slab in units:
                    transposed = t.ops[0].transposed
                    if expert is None and not transposed:
                        n_rows = shape[0]
                        for probe in _row_probes(n_rows):
                            o = out_f.get_slice(t.name)[probe.start : probe.stop].double()
                            b = base_f.get_slice(t.source.name)[probe.start : probe.stop].double()
                            e_, w_ = _check_slab(t, None, o, b, list(probe), factors, plan.scale, plan.adapter.rank)
                            max_err, worst = max(max_err, e_), max(worst, w_)
                        continue
                    if expert is None:
                        out_slab = out_f.get_tensor(t.name)
                        base_slab = base_f.get_tensor(t.source.name)
                    o, b = out_slab.double(), base_slab.double()
                    if transposed:
                        o, b = o.T, b.T
                    e_, w_ = _check_slab(t, expert, o, b, list(range(o.shape[0])), factors, plan.scale, plan.adapter.rank)
                    max_err, worst = max(max_err, e_), max(worst, w_)
                factors.clear()
        # Untouched tensors: byte-identical to the base (read back, not trusted from the writer).
        for t in untouched:
            if not _same_bytes(written[t.name], t.source):
                return RecomputeCheck(
                    False,
                    tuple(s.name for s in sampled),
                    tuple(u.name for u in untouched),
                    max_err,
                    worst,
                    tolerance,
                    f"untouched tensor {t.name} differs from the base",
                )
    finally:
        opened.close()
    passed = worst <= 1.0
    return RecomputeCheck(
        passed,
        tuple(s.name for s in sampled),
        tuple(u.name for u in untouched),
        max_err,
        worst,
        tolerance,
        "" if passed else f"recomputed values off by {worst:.3g}x the allowed error",
    )


def recompute_peft(plan: ExportPlan, out_dir: Path) -> RecomputeCheck:
    """Re-read every PEFT tensor: each block must equal its factor exactly, and the rest be zero."""
    tolerance = "exact: each block equals its Tinker factor (cast to the stored dtype); other entries are zero"
    (shard,) = plan.shards
    opened = _Opened()
    try:
        f = opened(out_dir / shard.file)
        keys = set(f.keys())
        if keys != {s.name for s in plan.peft}:
            return RecomputeCheck(False, (), (), math.inf, math.inf, tolerance, "PEFT keys differ from the plan")
        max_err = 0.0
        with FactorReader(plan.adapter) as factors:
            for spec in plan.peft:
                got = f.get_tensor(spec.name).double()
                covered = torch.zeros(got.shape, dtype=torch.bool)
                for block in spec.blocks:
                    region = (block.rows.slice, block.cols.slice)
                    want = factors.raw(block.source).to(TORCH_DTYPES[spec.dtype]).double()
                    max_err = max(max_err, float((got[region] - want).abs().max()) if want.numel() else 0.0)
                    covered[region] = True
                if bool(covered.logical_not().any()):
                    max_err = max(max_err, float(got[~covered].abs().max()))
    finally:
        opened.close()
    passed = max_err == 0.0
    return RecomputeCheck(
        passed,
        tuple(s.name for s in plan.peft),
        (),
        max_err,
        0.0 if passed else math.inf,
        tolerance,
        "" if passed else f"PEFT tensors differ from the adapter by up to {max_err:.3g}",
    )


# --- 3. forward pass -----------------------------------------------------------------------------


def forward_check(plan: ExportPlan, out_dir: Path, max_bytes: int) -> ForwardCheck:
    size = plan.base.total_bytes
    if size > max_bytes:
        return ForwardCheck(
            False, True, f"skipped: base weights {size} bytes exceed the forward-check threshold of {max_bytes} bytes"
        )
    from transformers import AutoModelForCausalLM  # heavy; only when the check runs

    vocab = int(plan.base.config.get("vocab_size") or 0)
    if vocab <= 0:
        return ForwardCheck(False, True, "skipped: base config has no vocab_size")
    generator = torch.Generator().manual_seed(20240601)
    ids = torch.randint(0, vocab, _FORWARD_SHAPE, generator=generator)
    load_kw: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}

    def logits(model: Any) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = model(input_ids=ids).logits.float()  # transformers models are untyped calls
        return out

    profile = profile_for(plan.base.config)
    merged = plan.to == "merged"
    # Rounding the reference's weights through the base dtype reproduces W' = cast(W + delta)
    # exactly as specified, so the merged comparison can be tight.
    cast = plan.adapted_tensors[0].source.torch_dtype if merged and plan.adapted_tensors else None
    model = AutoModelForCausalLM.from_pretrained(plan.base.root, **load_kw)
    base_logits = logits(model)
    with FactorReader(plan.adapter) as factors:
        profile.apply_reference(
            model, plan.adapter, lambda key: factors.raw(FactorRef(key, None)).float(), scale=plan.scale, cast=cast
        )
    ref_logits = logits(model)
    del model
    exported: Any  # a transformers model, or a PeftModel wrapping one
    if merged:
        exported = AutoModelForCausalLM.from_pretrained(out_dir, **load_kw)
    else:
        from peft import PeftModel

        exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plan.base.root, **load_kw), str(out_dir))
    out_logits = logits(exported)
    del exported
    tol = FORWARD_RTOL[plan.to] * max(1.0, float(ref_logits.abs().max()))
    diff = float((out_logits - ref_logits).abs().max())
    effect = float((ref_logits - base_logits).abs().max())
    what = "AutoModelForCausalLM(merged)" if merged else "PeftModel(base, adapter)"
    return ForwardCheck(
        True,
        diff <= tol,
        f"{what} vs base + adapter applied in memory ({profile.name} reference)",
        diff,
        tol,
        effect,
        ids.numel(),
    )


# --- all together ----------------------------------------------------------------------------------


def verify(
    plan: ExportPlan,
    out_dir: Path,
    deltas: list[TensorDelta] | None,
    *,
    samples: int = DEFAULT_SAMPLES,
    forward_max_bytes: int = DEFAULT_FORWARD_MAX_BYTES,
    rounding_warn_fraction: float = DEFAULT_ROUNDING_WARN_FRACTION,
) -> VerificationReport:
    """Run all checks on an export written to ``out_dir``; raise :class:`VerificationFailed` on failure."""
    warnings: list[str] = []
    module_deltas = module_delta_norms(plan.adapter)
    adapter_is_zero = not any(d.delta_norm > 0 for d in module_deltas)
    if plan.to == "merged":
        if deltas is None:
            deltas = deltas_from_disk(plan, out_dir)
        noop = noop_guard(deltas, rounding_warn_fraction, adapter_is_zero=adapter_is_zero)
        recompute = recompute_merged(plan, out_dir, samples)
    else:
        noop = noop_guard(module_deltas, rounding_warn_fraction, adapter_is_zero=adapter_is_zero)
        recompute = recompute_peft(plan, out_dir)
    if noop.rounding_loss > rounding_warn_fraction:
        warnings.append(
            f"rounding into the base dtype lost {noop.rounding_loss:.0%} of the adapter's delta norm "
            f"(threshold {rounding_warn_fraction:.0%}); the PEFT export keeps the adapter exact"
        )
    elif noop.rounding_warned:
        warnings.append(
            f"{len(noop.rounding_warned)} tensor(s) lost more than {rounding_warn_fraction:.0%} of "
            f"their delta to rounding, e.g. {noop.rounding_warned[0]}"
        )
    if noop.adapter_is_zero:
        warnings.append("the adapter is exactly zero: the export equals the base model")
    forward = (
        forward_check(plan, out_dir, forward_max_bytes)
        if noop.passed and recompute.passed
        else ForwardCheck(False, True, "skipped: an earlier check failed")
    )
    if (
        forward.ran
        and forward.passed
        and forward.adapter_effect < WEAK_SIGNAL_RATIO * forward.tolerance
        and not noop.adapter_is_zero
    ):
        warnings.append(
            f"the adapter moves the logits by only {forward.adapter_effect:.3g} "
            f"(tolerance {forward.tolerance:.3g}); the forward check is weak evidence"
        )
    report = VerificationReport(noop, recompute, forward, tuple(warnings))
    if not report.passed:
        problems = []
        if not noop.passed:
            problems.append(
                f"no-op guard: all {noop.adapted_tensors} adapted tensors equal the base although the "
                f"adapter is not zero (rounding into the base dtype accounts for "
                f"{noop.rounding_loss:.0%} of the delta)"
            )
        if not recompute.passed:
            problems.append(f"recomputation: {recompute.detail}")
        if not forward.passed:
            problems.append(
                f"forward pass: logits differ from base + adapter by {forward.max_abs_diff:.3g} "
                f"(tolerance {forward.tolerance:.3g}, adapter effect {forward.adapter_effect:.3g})"
            )
        raise VerificationFailed("export verification failed: " + "; ".join(problems), report=report.to_dict())
    return report


def deltas_from_disk(plan: ExportPlan, out_dir: Path) -> list[TensorDelta]:
    """No-op guard statistics for an already written merged export (re-verification).

    Loads each adapted tensor whole (fp32), so use it for re-checking, not inside the streaming merge.
    """
    written = output_tensors(out_dir)
    opened = _Opened()
    out: list[TensorDelta] = []
    try:
        with FactorReader(plan.adapter) as factors:
            for t in plan.adapted_tensors:
                got = opened(written[t.name].file).get_tensor(t.name)
                base = opened(t.source.file).get_tensor(t.source.name)
                exact = base.float()
                for op in t.ops:
                    view = exact if op.expert is None else exact[op.expert]
                    view = view.T if op.transposed else view
                    view[op.rows.slice] += plan.scale * (factors.fp32(op.b) @ factors.fp32(op.a))
                factors.clear()
                delta = float((exact - base.float()).norm())
                lost = float((exact - got.float()).norm())
                out.append(TensorDelta(t.name, not torch.equal(got, base), delta, lost))
    finally:
        opened.close()
    return out
