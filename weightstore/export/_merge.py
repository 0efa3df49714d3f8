"""The merge loop: every output byte written in place, block by block, LoRA deltas folded in on the way.

Memory is bounded by a few *row blocks*, not by a shard or even a tensor: untouched tensors move
file-to-file in the kernel; a dense adapted tensor is read, merged and written a block of rows at a
time (``W[rows] + scale * B[rows] @ A``, accumulated in fp32, cast back to the base dtype); a 3-D
expert tensor one expert slab at a time. Peak memory therefore does not grow with model size --
only with the widest row block or the largest single expert slab. Blocks run on a few threads
(see :class:`_Pipeline`); output positions are fixed by the plan, so no block waits for another.

Each adapted tensor also yields a :class:`TensorDelta` (did it change; how much of the delta did
rounding swallow) for the no-op guard, measured on the values actually written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from weightstore.export import _safetensors
from weightstore.export._checkpoint import CONFIG_FILE, FactorReader
from weightstore.export._ops import MergeOp
from weightstore.export._plan import MERGED_INDEX, ExportPlan, MergedTensor
from weightstore.export._results import TensorDelta
from weightstore.export._safetensors import FdCache, ShardWriter, TensorInfo, pwrite_all, read_into

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)`` -- called after every output tensor."""

# fp32 elements per row block (2 MB): big enough that B[rows] @ A runs at full matmul speed,
# small enough to stay in cache and keep peak memory tiny next to any shard.
BLOCK_ELEMENTS = 512 << 10
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses shards without format=pt
# Rounding statistics look at every 8th row of a block (see _Accumulator.observe).
STATS_STRIDE = 8


class _Workspace:
    """Flat buffers reused for every block of every tensor.

    Fresh multi-megabyte allocations are returned to the OS on free and page-fault back in on the
    next block -- in a VM that costs more than the arithmetic itself (measured: ``x.clone()`` runs
    at 1 GB/s, ``y.copy_(x)`` into a warm buffer at 8 GB/s). So the loop only ever copies into
    buffers that grow to the largest block once and stay.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, BLOCK_ELEMENTS), dtype=dtype)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


@dataclass(frozen=True)
class _BlockStats:
    """Rounding statistics of one block (computed in a worker, summed by the caller)."""

    changed: bool
    cast_sq: float
    fp32_sq: float


def _observe(merged32: torch.Tensor, written: torch.Tensor, base: torch.Tensor, ws: _Workspace) -> _BlockStats:
    """``merged32`` = base + delta in fp32; ``written`` = it cast to the base dtype; ``base`` = original.

    The norms are estimated on every ``STATS_STRIDE``-th row (scaled up): they feed a warning
    threshold, and measuring every element would cost as much as the merge itself. ``changed`` is
    exact.
    """
    stride = STATS_STRIDE if merged32.shape[0] >= 8 * STATS_STRIDE else 1
    m = merged32[::stride]
    weight = merged32.shape[0] / m.shape[0]
    tmp = ws.get("stats", torch.float32, tuple(m.shape))
    tmp.copy_(written[::stride]).sub_(m)
    cast_sq = weight * float(torch.linalg.vector_norm(tmp)) ** 2
    tmp.copy_(base[::stride]).sub_(m)
    fp32_sq = weight * float(torch.linalg.vector_norm(tmp)) ** 2
    return _BlockStats(not torch.equal(written, base), cast_sq, fp32_sq)


class _Accumulator:
    """Per-tensor statistics for the no-op guard."""

    def __init__(self) -> None:
        self.changed = False
        self.exact_sq = 0.0  # ||delta||^2 from the factors, exact (no fp32 absorption)
        self.fp32_sq = 0.0  # ||(W + delta)_fp32 - W||^2: the delta as it survived fp32 accumulation
        self.cast_sq = 0.0  # ||(W + delta)_fp32 - cast(W + delta)||^2: what rounding to the base dtype took

    def add_op(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """``||scale * B @ A||_F^2 = scale^2 <A A^T, B^T B>``: r x r work instead of out x in."""
        # fp32 is plenty for a warning statistic, and an all-zero factor still gives exactly zero
        self.exact_sq += scale * scale * float(((a @ a.T) * (b.T @ b)).sum(dtype=torch.float64))

    def add_block(self, stats: _BlockStats) -> None:
        self.changed |= stats.changed
        self.cast_sq += stats.cast_sq
        self.fp32_sq += stats.fp32_sq

    def result(self, name: str) -> TensorDelta:
        # lost = delta - (written - base) = (merged32 - written) + (what fp32 itself absorbed). The
        # second part only matters when the delta is near fp32 resolution of W; estimating it as a
        # difference of squares is noise otherwise, so it is only counted when it is large.
        absorbed_sq = self.exact_sq - self.fp32_sq if self.fp32_sq < 0.25 * self.exact_sq else 0.0
        lost = min(math.sqrt(self.cast_sq + absorbed_sq), math.sqrt(self.exact_sq))
        return TensorDelta(name, self.changed, math.sqrt(self.exact_sq), lost)


def _dense_fast_path(t: MergedTensor) -> bool:
    op = t.ops[0] if len(t.ops) == 1 else None
    return (
        op is not None
        and op.expert is None
        and not op.transposed
        and op.rows.step == 1
        and op.rows.start == 0
        and op.rows.count == t.source.shape[0]
        and len(t.source.shape) == 2
    )


# What a task reports back: data bytes written, and rounding statistics for adapted blocks.
TaskResult = tuple[int, _BlockStats | None]
# Untouched tensors are copied in pieces of this size, so a huge embedding overlaps with merging.
COPY_CHUNK = 64 << 20


def _copy_task(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int, ws: _Workspace | None) -> TaskResult:
    _safetensors.copy_range(src_fd, src_offset, dst_fd, dst_offset, count)
    return count, None


def _dense_block(
    fd: int,
    info: TensorInfo,
    r0: int,
    n: int,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dst_fd: int,
    dst_offset: int,
    ws: _Workspace | None,
) -> TaskResult:
    """Rows ``r0:r0+n`` of a dense tensor: read, ``W + scale * B[rows] @ A`` in fp32, cast back, write."""
    assert ws is not None
    dtype = info.torch_dtype
    in_dim = info.shape[1]
    row_bytes = in_dim * info.itemsize
    raw = ws.get("raw", torch.uint8, (n * row_bytes,))
    read_into(fd, info.offset + r0 * row_bytes, raw)
    base = raw.view(dtype).view(n, in_dim)
    merged32 = ws.get("fp32", torch.float32, (n, in_dim))
    merged32.copy_(base).addmm_(b[r0 : r0 + n], a, alpha=scale)
    written = ws.get("out", dtype, (n, in_dim))
    written.copy_(merged32)
    stats = _observe(merged32, written, base, ws)
    return pwrite_all(dst_fd, written, dst_offset + r0 * row_bytes), stats


def _slab_block(
    fd: int,
    info: TensorInfo,
    slab: int,
    ops: list[tuple[MergeOp, torch.Tensor, torch.Tensor]],
    scale: float,
    dst_fd: int,
    dst_offset: int,
    ws: _Workspace | None,
) -> TaskResult:
    """One 2-D slab (a whole 2-D tensor, or one expert of a 3-D one) with its ops, possibly transposed."""
    assert ws is not None
    dtype = info.torch_dtype
    slab_shape = info.shape if len(info.shape) == 2 else info.shape[1:]
    slab_bytes = math.prod(slab_shape) * info.itemsize
    raw = ws.get("raw", torch.uint8, (slab_bytes,))
    read_into(fd, info.offset + slab * slab_bytes, raw)
    at = dst_offset + slab * slab_bytes
    if not ops:
        return pwrite_all(dst_fd, raw, at), None
    view = raw.view(dtype).view(*slab_shape)
    transposed = ops[0][0].transposed
    base = view.T if transposed else view
    merged32 = ws.get("fp32", torch.float32, tuple(base.shape))
    merged32.copy_(base)  # contiguous fp32 in (out, in) orientation, whatever the storage
    for op, a, b in ops:
        merged32[op.rows.slice].addmm_(b, a, alpha=scale)
    written = ws.get("out", dtype, tuple(base.shape))
    written.copy_(merged32)
    stats = _observe(merged32, written, base, ws)
    if transposed:
        written = ws.get("out_t", dtype, tuple(view.shape)).copy_(written.T)
    return pwrite_all(dst_fd, written, at), stats


@dataclass
class _Task:
    """One unit of work, in output order."""

    run: Callable[[_Workspace | None], TaskResult]
    needs_workspace: bool
    writer: ShardWriter
    tensor: int  # index into the tensor bookkeeping of this export
    last: bool  # the tensor's final task: its statistics are complete once this one is


class _Pipeline:
    """Runs tasks on a few worker threads; results are collected in submission order.

    Every output byte has a known position (see ``ShardWriter``), so workers read, merge and
    write their block independently. torch's own intra-op parallelism is switched to one thread
    for the duration: its OpenMP teams spin at barriers, and on a shared 2-core machine a
    descheduled team member turned a 0.5 s merge into 5 s of spinning (measured). Independent
    blocks on plain threads (torch releases the GIL) degrade gracefully instead. Each in-flight
    merge task owns a :class:`_Workspace`, so memory stays at ``workers + 1`` blocks.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="merge") if workers > 1 else None
        self.spaces = [_Workspace() for _ in range(workers + 1)]

    def run(self, tasks: Iterator[_Task], done: Callable[[_Task, TaskResult], None]) -> None:
        free = list(self.spaces)
        pending: deque[tuple[_Task, Future[TaskResult], _Workspace | None]] = deque()
        max_in_flight = self.workers + 1

        def drain_one() -> None:
            task, future, ws = pending.popleft()
            result = future.result()
            if ws is not None:
                free.append(ws)
            done(task, result)

        try:
            for task in tasks:
                while len(pending) >= max_in_flight or (task.needs_workspace and not free):
                    drain_one()
                ws = free.pop() if task.needs_workspace else None
                if self.pool is None:
                    future: Future[TaskResult] = Future()
                    future.set_result(task.run(ws))
                else:
                    future = self.pool.submit(task.run, ws)
                pending.append((task, future, ws))
            while pending:
                drain_one()
        finally:
            for _, future, _ in pending:  # on error: let in-flight tasks finish before files close
                if not future.cancel():
                    future.exception()
            if self.pool is not None:
                self.pool.shutdown(wait=True)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_workers() -> int:
    """Worker threads for the merge: one per core, at most 4 (beyond that memory bandwidth binds)."""
    return max(1, min(4, os.cpu_count() or 1))


def _tasks(
    plan: ExportPlan,
    writers: dict[str, ShardWriter],
    fds: FdCache,
    factors: FactorReader,
    accs: list[_Accumulator],
    tensors: list[MergedTensor],
) -> Iterator[_Task]:
    """Every task of the export, shard by shard and tensor by tensor (runs on the calling thread)."""
    by_name = {t.name: t for t in plan.merged}
    scale = plan.scale
    for shard in plan.shards:
        writer = writers[shard.file]
        for entry in shard.entries:
            t = by_name[entry.name]
            index = len(tensors)
            tensors.append(t)
            accs.append(_Accumulator())
            info, src_fd, dst = t.source, fds.get(t.source.file), writer.offset(entry.name)
            runs: list[tuple[Callable[[_Workspace | None], TaskResult], bool]] = []
            if not t.ops:
                for start in range(0, max(info.nbytes, 1), COPY_CHUNK):
                    n = min(COPY_CHUNK, info.nbytes - start)
                    runs.append((partial(_copy_task, src_fd, info.offset + start, writer.fd, dst + start, n), False))
            elif _dense_fast_path(t):
                op = t.ops[0]
                a, b = factors.fp32(op.a), factors.fp32(op.b)
                accs[index].add_op(a, b, scale)
                rows = max(1, BLOCK_ELEMENTS // max(info.shape[1], 1))
                runs = [
                    (partial(_dense_block, src_fd, info, r0, min(rows, info.shape[0] - r0), a, b, scale, writer.fd, dst), True)
                    for r0 in range(0, info.shape[0], rows)
                ]
            else:
                by_slab: dict[int, list[tuple[MergeOp, torch.Tensor, torch.Tensor]]] = {}
                for op in t.ops:  # factors are read here, on the calling thread
                    a, b = factors.fp32(op.a), factors.fp32(op.b)
                    accs[index].add_op(a, b, scale)
                    by_slab.setdefault(0 if op.expert is None else op.expert, []).append((op, a, b))
                slabs = 1 if len(info.shape) == 2 else info.shape[0]
                runs = [
                    (partial(_slab_block, src_fd, info, s, by_slab.get(s, []), scale, writer.fd, dst), True) for s in range(slabs)
                ]
            factors.clear()
            for i, (run, needs_ws) in enumerate(runs):
                yield _Task(run, needs_ws, writer, index, i == len(runs) - 1)


def write_merged(plan: ExportPlan, out: Path, progress: Progress | None = None, workers: int | None = None) -> list[TensorDelta]:
    """Write the merged model described by ``plan`` into the (empty, existing) directory ``out``."""
    workers = workers or default_workers()
    writers: dict[str, ShardWriter] = {}
    tensors: list[MergedTensor] = []
    accs: list[_Accumulator] = []
    deltas: list[TensorDelta] = []
    done_bytes = 0

    def done(task: _Task, result: TaskResult) -> None:
        nonlocal done_bytes
        nbytes, stats = result
        task.writer.account(nbytes)
        if stats is not None:
            accs[task.tensor].add_block(stats)
        if task.last:
            t = tensors[task.tensor]
            if t.ops:
                deltas.append(accs[task.tensor].result(t.name))
            done_bytes += t.entry.nbytes
            if progress is not None:
                progress(done_bytes, plan.output_bytes)

    try:
        for shard in plan.shards:
            writers[shard.file] = ShardWriter(out / shard.file, shard.entries, SAFETENSORS_METADATA)
        with FdCache() as fds, FactorReader(plan.adapter) as factors, _torch_threads(1 if workers > 1 else None):
            _Pipeline(workers).run(_tasks(plan, writers, fds, factors, accs, tensors), done)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    _write_side_files(plan, out)
    return deltas


def _write_side_files(plan: ExportPlan, out: Path) -> None:
    if len(plan.shards) > 1:
        weight_map = {e.name: s.file for s in plan.shards for e in s.entries}
        index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / MERGED_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    root = plan.base.root
    for name in plan.copy_files:
        if name == CONFIG_FILE and plan.config_overrides:
            config = dict(plan.base.config)
            config.update(plan.config_overrides)
            (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(root / name, out / name)
