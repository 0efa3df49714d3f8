"""Rank entry points for the DCP tests (spawned by ``torch.multiprocessing``; importable by name)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

from weightstore.integrations.dcp import WeightstoreStorageReader, WeightstoreStorageWriter

ROWS, COLS = 48, 20


def full_state() -> dict[str, Any]:
    """The whole training state, the same in every process: model weights and Adam-like state."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(ROWS, COLS, generator=g)
    return {
        "model": {"w": w, "b": torch.arange(COLS, dtype=torch.bfloat16), "steps": torch.tensor(12)},
        "optim": {
            "exp_avg": torch.randn(ROWS, COLS, generator=g),
            "exp_avg_sq": torch.rand(ROWS, COLS, generator=g, dtype=torch.float64),
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": ["w", "b"]}],
            "step": 12,
        },
    }


def sharded(state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This rank's row-shards of the 2-D tensors as DTensors (``Shard(0)`` on a 1-D CPU mesh, as
    FSDP2 holds parameters and optimizer state); everything else replicated as is."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))

    def shard(t: torch.Tensor) -> Any:
        rows = t.shape[0] // world
        return DTensor.from_local(t[rank * rows : (rank + 1) * rows].clone(), mesh, [Shard(0)], run_check=False)

    out: dict[str, Any] = {}
    for key, sub in state.items():
        out[key] = {k: shard(v) if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in sub.items()}
    return out


def zeros_like_state(state: dict[str, Any]) -> dict[str, Any]:
    """A load target of the same structure with every value different: zero tensors, zero scalars,
    placeholder param groups."""
    got = {k: {kk: torch.zeros_like(vv) for kk, vv in sub.items() if isinstance(vv, torch.Tensor)} for k, sub in state.items()}
    got["optim"]["param_groups"] = [{"lr": 0.0, "betas": (0.0, 0.0), "params": []}]
    got["optim"]["step"] = 0
    return got


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


def save_ranks(rank: int, world: int, port: int, url: str, key: str, run_id: str, out: str) -> None:
    """Save the state sharded over ``world`` ranks twice: ``step1`` with ``dcp.save``, then the same
    state as ``step2`` with ``dcp.async_save``; record what each rank sent."""
    _init(rank, world, port)
    try:
        state = sharded(full_state(), rank, world)
        w1 = WeightstoreStorageWriter(url=url, api_key=key, run_id=run_id, name="step1", transfer="presigned")
        dcp.save(state, storage_writer=w1)
        w2 = WeightstoreStorageWriter(url=url, api_key=key, run_id=run_id, name="step2", transfer="presigned")
        fut = dcp.async_save(state, storage_writer=w2)
        fut.result()
        report = {"rank": rank, "sent1": w1.bytes_sent, "sent2": w2.bytes_sent, "path1": w1.tinker_path}
        # async_save ran on a copy of the writer (it was pickled or deep-copied): the result is in the store
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def load_ranks(rank: int, world: int, port: int, url: str, key: str, paths: list[str], out: str) -> None:
    """Load each of ``paths`` sharded over ``world`` ranks; record, per path, whether every value this
    rank got is bit-identical to what was saved, and the bytes it fetched."""
    _init(rank, world, port)
    try:
        want = sharded(full_state(), rank, world)
        result: dict[str, Any] = {}
        for path in paths:
            got = sharded(zeros_like_state(full_state()), rank, world)
            reader = WeightstoreStorageReader(url=url, api_key=key, path=path)
            dcp.load(got, storage_reader=reader)
            equal: dict[str, bool] = {}
            for k in ("model", "optim"):
                for kk, v in want[k].items():
                    g = got[k][kk]
                    if isinstance(v, torch.Tensor):
                        a = v.to_local() if hasattr(v, "to_local") else v
                        b = g.to_local() if hasattr(g, "to_local") else g
                        equal[f"{k}.{kk}"] = a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)
                    else:
                        equal[f"{k}.{kk}"] = bool(v == g)
            result[path] = {"equal": equal, "fetched": reader.bytes_fetched}
        Path(out, f"load{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class DyingWriter(WeightstoreStorageWriter):
    """Rank ``die_rank`` sends its file, then its process dies (``os._exit``) before DCP gathers results."""

    die_rank = 1

    def write_data(self, plan: SavePlan, planner: SavePlanner):  # type: ignore[no-untyped-def]
        fut = super().write_data(plan, planner)
        if dist.get_rank() == self.die_rank:
            os._exit(3)
        return fut


def crash_ranks(rank: int, world: int, port: int, url: str, key: str, run_id: str) -> None:
    _init(rank, world, port)
    state = sharded(full_state(), rank, world)
    dcp.save(state, storage_writer=DyingWriter(url=url, api_key=key, run_id=run_id, name="crash", transfer="presigned"))
    dist.destroy_process_group()


def process_async_ranks(rank: int, world: int, port: int, url: str, key: str, run_id: str, out: str) -> None:
    """``dcp.async_save`` with ``AsyncCheckpointerType.PROCESS``: DCP pickles the writer into a
    spawned checkpoint process per rank (its own gloo group), which runs the whole save there."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    _init(rank, world, port)
    try:
        state = sharded(full_state(), rank, world)
        w = WeightstoreStorageWriter(url=url, api_key=key, run_id=run_id, name="proc", transfer="presigned")
        fut = dcp.async_save(state, storage_writer=w, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        fut.result()
        Path(out, f"proc{rank}.json").write_text(json.dumps({"rank": rank, "local_writer_path": w.tinker_path}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
