"""Write a PEFT LoRA adapter: ``adapter_config.json`` plus ``adapter_model.safetensors``.

Tensors are the Tinker factors, unscaled (PEFT applies ``lora_alpha / r`` itself), assembled by the
plan's blocks: a plain copy for dense modules, one expert's slice for per-expert modules, or the
block-diagonal, expert-packed layout of PEFT's ``target_parameters`` (see ``_gpt_oss``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from weightstore.export._checkpoint import FactorReader
from weightstore.export._plan import PEFT_CONFIG, ExportPlan
from weightstore.export._profile import PeftTensorSpec
from weightstore.export._safetensors import TORCH_DTYPES, ShardWriter, pwrite_all

PEFT_METADATA = {"format": "pt"}


def assemble(spec: PeftTensorSpec, factors: FactorReader) -> torch.Tensor:
    """Build one PEFT tensor from its blocks (regions no block covers stay zero)."""
    out = torch.zeros(spec.shape, dtype=TORCH_DTYPES[spec.dtype])
    for block in spec.blocks:
        out[block.rows.slice, block.cols.slice] = factors.raw(block.source).to(out.dtype)
    return out


def write_peft(plan: ExportPlan, out: Path, progress: Callable[[int, int], None] | None = None) -> None:
    """Write the PEFT adapter described by ``plan`` into the (empty, existing) directory ``out``."""
    specs = {s.name: s for s in plan.peft}
    (shard,) = plan.shards
    total, done = shard.nbytes, 0
    with FactorReader(plan.adapter) as factors:
        writer = ShardWriter(out / shard.file, shard.entries, PEFT_METADATA)
        try:
            for entry in shard.entries:
                writer.account(pwrite_all(writer.fd, assemble(specs[entry.name], factors), writer.offset(entry.name)))
                done += entry.nbytes
                if progress is not None:
                    progress(done, total)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    (out / PEFT_CONFIG).write_text(json.dumps(plan.peft_config, indent=2, sort_keys=True) + "\n")
