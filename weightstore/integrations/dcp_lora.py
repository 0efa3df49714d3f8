"""LoRA adapters saved as DCP checkpoints, exported like Tinker ones (issue 14, part 2).

A DCP checkpoint (layout ``dcp``: ``formats.check_dcp_file_set``) is exportable when it holds a
LoRA adapter the export library can read as a Tinker adapter:

- ``adapter_config.json``, saved alongside by ``WeightstoreStorageWriter(..., adapter_config={...})``
  (PEFT's file: ``r``, ``lora_alpha``, optionally ``target_modules``, ``base_model_name_or_path``;
  validated at commit like any adapter config). It is where ``lora_alpha`` comes from: the scale
  ``alpha / r`` cannot be inferred from tensors. Without it the export is refused at submission.
- adapter tensors named as PEFT names a ``PeftModel``'s parameters, which is also Tinker's naming:
  ``[PREFIX]base_model.model.<module>.lora_A[.<adapter>].weight`` and ``lora_B`` likewise, where
  ``PREFIX`` is where the trainer put the model in its state dict (``model.`` for
  ``{"model": peft_model.state_dict(), "optim": ...}``; DCP joins nested keys with dots) and
  ``<adapter>`` PEFT's adapter name (``default``). One prefix and one adapter name per checkpoint.
  Every other key (base weights, optimizer state, counters) is ignored and never read.

Refused with ``InvalidRequest`` (permanent, 400-class; on the export job: ``failed`` with that
code, never retried): no such LoRA keys, LoRA keys in another naming (outside
``base_model.model.``, embedding or DoRA factors), several prefixes or adapter names, a module
with one half only; the export library then checks shapes against ``r`` as for any adapter.

Reading: only ``.metadata`` (unpickled with ``integrations.dcp``'s allow-list: it is the tenant's
bytes on a shared worker), ``adapter_config.json`` and the data files that hold LoRA tensors are
downloaded; those tensors are read with ``dcp.load(no_dist=True)`` and DCP's ``FileSystemReader``
(tensors through ``torch.load(weights_only=True)``), whatever the number of ranks that saved them
(DCP reassembles shards). They are written as a Tinker adapter directory
(``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A|B.weight`` keys plus the
config) and the unchanged export path runs on it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weightstore.errors import InvalidRequest
from weightstore.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DCP_METADATA

__all__ = ["LORA_KEY", "adapter_from_dcp", "check_exportable", "lora_keys"]

LORA_KEY = re.compile(r"^(?P<prefix>.*?)base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
"""A LoRA factor in PEFT's / Tinker's naming under one state-dict prefix (module doc)."""
UNSUPPORTED = re.compile(r"\.lora_(embedding_[AB]|magnitude_vector)(\.|$)")
TINKER_KEY = "base_model.model.{module}.lora_{half}.weight"


def check_exportable(paths: Sequence[str]) -> None:
    """Refuse at submission a DCP checkpoint that cannot hold an exportable adapter (no config)."""
    if ADAPTER_CONFIG not in paths:
        raise InvalidRequest(
            f"this DCP checkpoint has no {ADAPTER_CONFIG}, so it is not an exportable LoRA adapter: save the adapter "
            "with WeightstoreStorageWriter(..., adapter_config={'r': R, 'lora_alpha': ALPHA, ...})"
        )


def lora_keys(fqns: Sequence[str]) -> dict[str, str]:
    """Stored FQN → Tinker key of every LoRA factor (module doc); refuses what it cannot map."""
    found: dict[str, str] = {}
    prefixes: set[str] = set()
    adapters: set[str | None] = set()
    halves: dict[str, set[str]] = {}
    for fqn in fqns:
        if UNSUPPORTED.search(fqn):
            raise InvalidRequest(f"DCP checkpoint: {fqn} is an embedding or DoRA factor, which the export does not support")
        m = LORA_KEY.match(fqn)
        if m is None:
            if re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", fqn):
                raise InvalidRequest(
                    f"DCP checkpoint: LoRA tensor {fqn} is not named [PREFIX]base_model.model.<module>.lora_A|lora_B"
                    "[.<adapter>].weight (PEFT's and Tinker's naming)"
                )
            continue
        prefixes.add(m["prefix"])
        adapters.add(m["adapter"])
        found[fqn] = TINKER_KEY.format(module=m["module"], half=m["half"])
        halves.setdefault(m["module"], set()).add(m["half"])
    if not found:
        raise InvalidRequest(
            "DCP checkpoint holds no LoRA adapter tensors (expected keys like "
            "[PREFIX]base_model.model.<module>.lora_A[.<adapter>].weight): only LoRA adapters export"
        )
    if len(prefixes) > 1 or len(adapters) > 1:
        raise InvalidRequest(
            f"DCP checkpoint holds LoRA tensors under several prefixes or adapter names ({sorted(prefixes)}, "
            f"{sorted(a or '' for a in adapters)}); an export takes exactly one adapter"
        )
    if lone := sorted(m for m, h in halves.items() if h != {"A", "B"}):
        raise InvalidRequest(f"DCP checkpoint: module {lone[0]} has only one of lora_A and lora_B")
    return found


def adapter_from_dcp(fetch: Callable[[Sequence[str], Path], None], files: Sequence[str], work: Path, out: Path) -> None:
    """Write the Tinker adapter directory ``out`` from the DCP checkpoint whose file names are
    ``files``; ``fetch(names, dir)`` downloads (and verifies) those of its files into ``dir``.
    Only the metadata, the config and the data files holding LoRA tensors are fetched."""
    import torch
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from weightstore import tensorio
    from weightstore.integrations.dcp import load_metadata

    check_exportable(files)
    work.mkdir(parents=True, exist_ok=True)
    fetch([DCP_METADATA, ADAPTER_CONFIG], work)
    metadata = load_metadata((work / DCP_METADATA).read_bytes())
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    keys = lora_keys(sorted(tensors))
    wanted = {info.relative_path for idx, info in (metadata.storage_data or {}).items() if idx.fqn in keys}
    if missing := sorted(wanted - set(files)):
        raise InvalidRequest(f"DCP checkpoint: its metadata names {missing[0]}, which the checkpoint lacks")
    fetch(sorted(wanted), work)

    class Reader(FileSystemReader):
        """DCP's own reader, but ``.metadata`` through the allow-list (never a plain ``pickle.load``)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            md = load_metadata((work / DCP_METADATA).read_bytes())
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    state = {fqn: torch.empty(tuple(tensors[fqn].size), dtype=tensors[fqn].properties.dtype or torch.float32) for fqn in keys}
    dcp_load(state, storage_reader=Reader(work), no_dist=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_WEIGHTS).write_bytes(tensorio.weights_bytes({keys[fqn]: t for fqn, t in state.items()}))
    shutil.copyfile(work / ADAPTER_CONFIG, out / ADAPTER_CONFIG)  # validated at commit, parsed again by the export
