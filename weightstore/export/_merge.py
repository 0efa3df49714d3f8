"""The merge loop: stream every output shard front to back, folding LoRA deltas in on the way.

Memory is bounded by a *row block*, not by a shard or even a tensor: untouched tensors move
file-to-file in the kernel; a dense adapted tensor is read, merged and written a block of rows at a
time (``W[rows] + scale * B[rows] @ A``, accumulated in fp32, cast back to the base dtype); a 3-D
expert tensor one expert slab at a time. Peak memory therefore does not grow with model size --
only with the widest row block or the largest single expert slab.

Each adapted tensor also yields a :class:`TensorDelta` (did it change; how much of the delta did
rounding swallow) for the no-op guard, measured on the values actually written.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from weightstore.export._checkpoint import CONFIG_FILE, FactorReader
from weightstore.export._ops import MergeOp
from weightstore.export._plan import MERGED_INDEX, ExportPlan, MergedTensor
from weightstore.export._results import TensorDelta
from weightstore.export._safetensors import FdCache, StreamWriter, read_into

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)`` -- called after every output tensor."""

# fp32 elements per row block (16 MB): large enough that B[rows] @ A runs at full matmul speed,
# small enough to stay cache-friendly and keep peak memory tiny next to any shard.
BLOCK_ELEMENTS = 4 << 20
SAFETENSORS_METADATA = {"format": "pt"}
# Rounding statistics look at every 8th row of a block (see _Accumulator.observe).
STATS_STRIDE = 8  # transformers refuses shards without format=pt


class _Accumulator:
    """Per-tensor statistics for the no-op guard."""

    def __init__(self) -> None:
        self.changed = False
        self.exact_sq = 0.0  # ||delta||^2 from the factors, exact (no fp32 absorption)
        self.fp32_sq = 0.0  # ||(W + delta)_fp32 - W||^2: the delta as it survived fp32 accumulation
        self.cast_sq = 0.0  # ||(W + delta)_fp32 - cast(W + delta)||^2: what rounding to the base dtype took

    def add_op(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """``||scale * B @ A||_F^2 = scale^2 <A A^T, B^T B>``: r x r work instead of out x in."""
        a64, b64 = a.double(), b.double()
        self.exact_sq += scale * scale * float(((a64 @ a64.T) * (b64.T @ b64)).sum())

    def observe(self, merged32: torch.Tensor, written: torch.Tensor, base: torch.Tensor) -> None:
        """``merged32`` = base + delta in fp32; ``written`` = it cast to the base dtype; ``base`` = original.

        The norms are estimated on every ``STATS_STRIDE``-th row (scaled up): they feed a warning
        threshold, and measuring every element would cost more than the merge itself.
        """
        if not self.changed and not torch.equal(written, base):
            self.changed = True
        stride = STATS_STRIDE if merged32.shape[0] >= 8 * STATS_STRIDE else 1
        m, w, b = merged32[::stride], written[::stride], base[::stride]
        weight = merged32.shape[0] / m.shape[0]
        self.cast_sq += weight * float(torch.sub(m, w.float()).square_().sum())
        self.fp32_sq += weight * float(torch.sub(m, b.float()).square_().sum())

    def result(self, name: str) -> TensorDelta:
        # lost = delta - (written - base) = (merged32 - written) + (what fp32 itself absorbed). The
        # second part only matters when the delta is near fp32 resolution of W; estimating it as a
        # difference of squares is noise otherwise, so it is only counted when it is large.
        absorbed_sq = self.exact_sq - self.fp32_sq if self.fp32_sq < 0.25 * self.exact_sq else 0.0
        lost = min(math.sqrt(self.cast_sq + absorbed_sq), math.sqrt(self.exact_sq))
        return TensorDelta(name, self.changed, math.sqrt(self.exact_sq), lost)


def _dense_fast_path(t: MergedTensor) -> bool:
    op = t.ops[0] if len(t.ops) == 1 else None
    return (op is not None and op.expert is None and not op.transposed and op.rows.step == 1
            and op.rows.start == 0 and op.rows.count == t.source.shape[0] and len(t.source.shape) == 2)


def _merge_dense(t: MergedTensor, fd: int, writer: StreamWriter, factors: FactorReader, scale: float,
                 acc: _Accumulator) -> None:
    """``W + scale * B @ A`` for a whole 2-D tensor, a block of rows at a time."""
    info, op = t.source, t.ops[0]
    dtype = info.torch_dtype
    out_dim, in_dim = info.shape
    a = factors.fp32(op.a)
    b = factors.fp32(op.b)
    acc.add_op(a, b, scale)
    rows_per_block = max(1, BLOCK_ELEMENTS // max(in_dim, 1))
    row_bytes = in_dim * info.itemsize
    raw = torch.empty(min(rows_per_block, out_dim) * row_bytes, dtype=torch.uint8)
    for r0 in range(0, out_dim, rows_per_block):
        n = min(rows_per_block, out_dim - r0)
        chunk = raw[: n * row_bytes]
        read_into(fd, info.offset + r0 * row_bytes, chunk)
        base = chunk.view(dtype).view(n, in_dim)
        merged32 = torch.addmm(base.float(), b[r0 : r0 + n], a, alpha=scale)
        written = merged32.to(dtype)
        acc.observe(merged32, written, base)
        writer.write(written)


def _apply_ops(view: torch.Tensor, ops: list[MergeOp], factors: FactorReader, scale: float,
               acc: _Accumulator) -> torch.Tensor:
    """Merge ``ops`` into one 2-D stored view (``(out, in)``, or ``(in, out)`` when transposed)."""
    transposed = ops[0].transposed
    base = view.T if transposed else view
    merged32 = base.float()  # a contiguous fp32 copy in (out, in) orientation
    for op in ops:
        a, b = factors.fp32(op.a), factors.fp32(op.b)
        acc.add_op(a, b, scale)
        merged32[op.rows.slice].addmm_(b, a, alpha=scale)
    written = merged32.to(view.dtype)
    acc.observe(merged32, written, base)
    return written.T.contiguous() if transposed else written


def _merge_general(t: MergedTensor, fd: int, writer: StreamWriter, factors: FactorReader, scale: float,
                   acc: _Accumulator) -> None:
    """Experts and sliced targets: one 2-D slab (a whole 2-D tensor, or one expert) at a time."""
    info = t.source
    dtype = info.torch_dtype
    if len(info.shape) == 2:
        slabs, slab_shape = 1, info.shape
    else:
        slabs, slab_shape = info.shape[0], info.shape[1:]
    slab_bytes = math.prod(slab_shape) * info.itemsize
    by_slab: dict[int, list[MergeOp]] = {}
    for op in t.ops:
        by_slab.setdefault(0 if op.expert is None else op.expert, []).append(op)
    raw = torch.empty(slab_bytes, dtype=torch.uint8)
    for s in range(slabs):
        read_into(fd, info.offset + s * slab_bytes, raw)
        ops = by_slab.get(s)
        if not ops:
            writer.write(raw)
            continue
        view = raw.view(dtype).view(*slab_shape)
        writer.write(_apply_ops(view, ops, factors, scale, acc))


def write_merged(plan: ExportPlan, out: Path, progress: Progress | None = None) -> list[TensorDelta]:
    """Write the merged model described by ``plan`` into the (empty, existing) directory ``out``."""
    by_name = {t.name: t for t in plan.merged}
    total = plan.output_bytes
    done = 0
    deltas: list[TensorDelta] = []
    with FdCache() as fds, FactorReader(plan.adapter) as factors:
        for shard in plan.shards:
            writer = StreamWriter(out / shard.file, shard.entries, SAFETENSORS_METADATA)
            try:
                for entry in shard.entries:
                    t = by_name[entry.name]
                    writer.begin(entry.name)
                    fd = fds.get(t.source.file)
                    if not t.ops:
                        writer.copy(fd, t.source.offset, t.source.nbytes)
                    else:
                        acc = _Accumulator()
                        merge = _merge_dense if _dense_fast_path(t) else _merge_general
                        merge(t, fd, writer, factors, plan.scale, acc)
                        factors.clear()
                        deltas.append(acc.result(t.name))
                    done += entry.nbytes
                    if progress is not None:
                        progress(done, total)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    _write_side_files(plan, out)
    return deltas


def _write_side_files(plan: ExportPlan, out: Path) -> None:
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.output_bytes},
            "weight_map": {e.name: s.file for s in plan.shards for e in sorted(s.entries, key=lambda e: e.name)},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (out / MERGED_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    root = plan.base.root
    for name in plan.copy_files:
        if name == CONFIG_FILE and plan.config_overrides:
            config = dict(plan.base.config)
            config.update(plan.config_overrides)
            (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(root / name, out / name)
