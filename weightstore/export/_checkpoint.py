"""The two inputs of an export, opened header-only: a Hugging Face base model and a Tinker adapter.

Opening validates everything that can be validated without reading tensor data: the files exist,
match their expected sha256 (when the caller knows it), their safetensors headers are sound, the
index agrees with the shards, and the adapter's keys pair up into LoRA modules of the declared rank.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightstore.errors import InvalidFormat, InvalidRequest
from weightstore.export._ops import FactorRef
from weightstore.export._safetensors import TensorInfo, check_sha256, read_header, read_tensor

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Files that hold weights in some format; everything else at the top level of a base model
# (config, tokenizer, generation config, chat template, license) is copied into a merged export.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = re.compile(r".*\.(safetensors|bin)\.index\.json$")

# Tinker writes PEFT-style keys under this prefix (reference §6.3).
TINKER_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")


def _load_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidFormat(f"{what}: {path.name} is missing", file=path.name) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidFormat(f"{what}: {path.name} is not valid JSON", file=path.name) from exc
    if not isinstance(data, dict):
        raise InvalidFormat(f"{what}: {path.name} is not a JSON object", file=path.name)
    return data


@dataclass(frozen=True)
class BaseCheckpoint:
    """A base model in Hugging Face layout, opened header-only."""

    root: Path
    """The model directory."""
    config: Mapping[str, Any]
    """Parsed ``config.json``."""
    tensors: Mapping[str, TensorInfo]
    """Every weight tensor, shard by shard in file order, each in data order."""
    shard_files: tuple[str, ...]
    """Safetensors files holding the weights, relative to ``root``."""
    aux_files: tuple[str, ...]
    """Non-weight files (config, tokenizer, generation config, ...) to copy into a merged model."""

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def ties_embeddings(self) -> bool:
        """Whether the output head reuses the input embeddings.

        True when the config says so (transformers then ignores any stored ``lm_head.weight``) or
        when there is no ``lm_head.weight`` to load at all.
        """
        tied = self.config.get("tie_word_embeddings")
        return bool(tied) or "lm_head.weight" not in self.tensors


def open_base(base_dir: Path, *, expected_sha256: Mapping[str, str] | None = None) -> BaseCheckpoint:
    """Open a base model directory: config, weight index, shard headers, auxiliary files."""
    root = Path(base_dir)
    if not root.is_dir():
        raise InvalidRequest(f"base model directory {root} does not exist", path=str(root))
    index_path = root / INDEX_FILE
    if index_path.exists():
        if expected_sha256 is not None:
            check_sha256(root, [INDEX_FILE], expected_sha256, what="base model")
        index = _load_json(index_path, what="base model")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidFormat(f"base model: {INDEX_FILE} has no weight_map", file=INDEX_FILE)
        shard_files = tuple(sorted(set(map(str, weight_map.values()))))
        for name in shard_files:
            if "/" in name or name.startswith("."):
                raise InvalidFormat(f"base model: index names an unsafe shard path {name!r}", file=INDEX_FILE)
        missing = [f for f in shard_files if not (root / f).is_file()]
        if missing:
            raise InvalidFormat(
                f"base model is incomplete: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing",
                missing=missing,
            )
    elif (root / SINGLE_FILE).is_file():
        weight_map = None
        shard_files = (SINGLE_FILE,)
    else:
        weight_map = None
        shard_files = tuple(sorted(p.name for p in root.glob("*.safetensors")))
        if not shard_files:
            raise InvalidFormat(f"base model {root} has no safetensors weights (only safetensors is supported)")

    if expected_sha256 is not None:
        check_sha256(root, [CONFIG_FILE, *shard_files], expected_sha256, what="base model")
    config = _load_json(root / CONFIG_FILE, what="base model")

    tensors: dict[str, TensorInfo] = {}
    for shard in shard_files:
        shard_tensors, _ = read_header(root / shard)
        for name, info in shard_tensors.items():
            if name in tensors:
                raise InvalidFormat(
                    f"base model: tensor {name} appears in both {tensors[name].file.name} and {shard}", tensor=name
                )
            if weight_map is not None and weight_map.get(name) != shard:
                raise InvalidFormat(
                    f"base model: shard {shard} holds {name}, which {INDEX_FILE} places in "
                    f"{weight_map.get(name, 'no shard')} (corrupt shard or stale index)",
                    tensor=name,
                    shard=shard,
                )
            tensors[name] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise InvalidFormat(
                f"base model: {len(absent)} tensor(s) listed in {INDEX_FILE} are not in their shards "
                f"(first: {absent[0]} in {weight_map[absent[0]]}; corrupt shard or stale index)",
                tensors=absent[:20],
            )

    aux = tuple(
        sorted(
            p.name
            for p in root.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and not p.name.endswith(_WEIGHT_SUFFIXES)
            and not _WEIGHT_INDEXES.match(p.name)
        )
    )
    return BaseCheckpoint(root=root, config=config, tensors=tensors, shard_files=shard_files, aux_files=aux)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a Tinker adapter: its two factors, header-only."""

    path: str
    """Tinker module path without the ``base_model.model.`` prefix, e.g. ``model.layers.0.mlp.experts.w1``."""
    a: TensorInfo
    """``lora_A``: ``(r, in)``, or ``(1|E, r, in)`` for experts."""
    b: TensorInfo
    """``lora_B``: ``(out, r)``, or ``(E|1, out, r)`` for experts."""

    @property
    def is_empty(self) -> bool:
        """Placeholder modules (zero elements) that some Tinker families emit; they carry nothing."""
        return 0 in self.a.shape and 0 in self.b.shape


@dataclass(frozen=True)
class TinkerAdapter:
    """A raw Tinker LoRA checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    root: Path
    """The adapter directory."""
    weights_file: Path
    """Its ``adapter_model.safetensors``."""
    config: Mapping[str, Any]
    """Parsed ``adapter_config.json``."""
    rank: int
    """LoRA rank ``r``."""
    alpha: float
    """``lora_alpha``."""
    modules: Mapping[str, LoraModule]
    """Adapted modules by Tinker path, sorted."""

    @property
    def scale(self) -> float:
        """The LoRA scaling ``lora_alpha / r`` (Tinker and PEFT's default, non-rsLoRA formula)."""
        return self.alpha / self.rank

    @property
    def base_model_name(self) -> str | None:
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None


def open_adapter(adapter_dir: Path, *, expected_sha256: Mapping[str, str] | None = None) -> TinkerAdapter:
    """Open a Tinker adapter directory and pair its keys into LoRA modules."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise InvalidRequest(f"adapter directory {root} does not exist", path=str(root))
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InvalidFormat(
            f"adapter: {ADAPTER_WEIGHTS} is missing (only safetensors adapters are supported)", file=ADAPTER_WEIGHTS
        )
    if expected_sha256 is not None:
        check_sha256(root, [ADAPTER_CONFIG, ADAPTER_WEIGHTS], expected_sha256, what="adapter")
    config = _load_json(root / ADAPTER_CONFIG, what="adapter")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InvalidFormat(f"adapter: r must be a positive integer, got {rank!r}", file=ADAPTER_CONFIG)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise InvalidFormat(f"adapter: lora_alpha must be a positive number, got {alpha!r}", file=ADAPTER_CONFIG)
    # Per-module ranks/alphas or rsLoRA would change the scaling; refusing beats merging wrongly.
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InvalidRequest("adapter: use_rslora, rank_pattern and alpha_pattern are not supported")

    tensors, _ = read_header(weights)
    halves: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None or not key.startswith(TINKER_PREFIX):
            raise InvalidFormat(
                f"adapter: unexpected key {key!r} (expected {TINKER_PREFIX}<module>.lora_A|lora_B.weight)", key=key
            )
        module = m["module"].removeprefix(TINKER_PREFIX)
        halves.setdefault(module, {})[m["half"]] = info
    modules: dict[str, LoraModule] = {}
    for path in sorted(halves):
        pair = halves[path]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidFormat(f"adapter: module {path} has no {missing}", module=path)
        module = LoraModule(path=path, a=pair["A"], b=pair["B"])
        if module.is_empty:
            modules[path] = module
            continue
        a, b = module.a.shape, module.b.shape
        if len(a) not in (2, 3) or len(b) != len(a):
            raise InvalidFormat(f"adapter: module {path} has lora_A {a} and lora_B {b}; expected 2-D or 3-D pairs", module=path)
        if a[-2] != rank or b[-1] != rank:
            raise InvalidFormat(f"adapter: module {path} has lora_A {a} and lora_B {b}, inconsistent with r={rank}", module=path)
        for info in (module.a, module.b):
            _ = info.torch_dtype  # raises InvalidFormat for non-float factors
        modules[path] = module
    if not modules:
        raise InvalidFormat("adapter: no LoRA weights found", file=ADAPTER_WEIGHTS)
    return TinkerAdapter(root=root, weights_file=weights, config=config, rank=rank, alpha=float(alpha), modules=modules)


class FactorReader:
    """Lazy access to adapter factors as 2-D matrices (one expert sliced out of 3-D factors).

    Factors are read with ``pread`` (like base tensors, see ``_safetensors``), one expert's slice
    at a time, instead of memory-mapping the adapter: mapped pages that have been touched count
    towards the resident set until unmapped, and a large MoE adapter would then sit in memory whole
    (it grows with the model). Shared factors (the size-1 side of Tinker's shared-outer layout) are
    cached until :meth:`clear`, since every expert of a tensor reuses them.
    """

    def __init__(self, adapter: TinkerAdapter) -> None:
        self._infos = {i.name: i for m in adapter.modules.values() for i in (m.a, m.b)}
        self._fd = os.open(adapter.weights_file, os.O_RDONLY)
        self._cache: dict[tuple[str, int | None], torch.Tensor] = {}

    def raw(self, ref: FactorRef) -> torch.Tensor:
        """The factor in its stored dtype (2-D; 3-D when a whole 3-D factor is asked for)."""
        info = self._infos[ref.key]
        if ref.index is None:
            return read_tensor(self._fd, info).view(info.torch_dtype).view(info.shape)
        slab_shape = info.shape[1:]
        slab_bytes = math.prod(slab_shape) * info.itemsize
        data = read_tensor(self._fd, info, start=ref.index * slab_bytes, nbytes=slab_bytes)
        return data.view(info.torch_dtype).view(slab_shape)

    def fp32(self, ref: FactorRef) -> torch.Tensor:
        key = (ref.key, ref.index)
        t = self._cache.get(key)
        if t is None:
            t = self.raw(ref).to(torch.float32).contiguous()
            self._cache[key] = t
        return t

    def clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.clear()
        os.close(self._fd)

    def __enter__(self) -> FactorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
