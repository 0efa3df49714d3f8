"""File formats: what a checkpoint must contain and how each file is validated before commit.

Validation reads only what it needs (safetensors: the 8-byte length and the JSON header), through a
``read_range(start, length)`` callable, so it works the same on a local file and on an S3 object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from weightstore.errors import InvalidFormat, InvalidRequest

ReadRange = Callable[[int, int], bytes]

# Bytes per element for every dtype safetensors defines. Anything else is refused.
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"

# Files each kind must contain. Extra files are allowed (validated by their extension).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "sampler": (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "training": (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_STATE),
    "external": (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "merged": ("config.json",),
}


def check_file_set(kind: str, paths: Sequence[str]) -> None:
    if len(set(paths)) != len(paths):
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        raise InvalidRequest(f"duplicate file names: {', '.join(dupes)}", files=dupes)
    missing = [f for f in REQUIRED_FILES.get(kind, ()) if f not in paths]
    if missing:
        raise InvalidFormat(f"a {kind} checkpoint must contain {', '.join(missing)}", missing=missing)


def parse_safetensors_header(read_range: ReadRange, file_size: int, *, max_header: int, name: str = "file") -> dict[str, Any]:
    """Validate a safetensors file's structure from its header alone.

    Checks: the length prefix fits the file and the cap; the header is a JSON object; every tensor
    has a known dtype, a non-negative integer shape and offsets whose length equals
    ``numel * itemsize``; the tensors' byte ranges neither overlap nor leave gaps, and together
    cover the data section exactly. Returns the parsed header.
    """
    if file_size < 8:
        raise InvalidFormat(f"{name}: truncated safetensors file ({file_size} bytes)", file=name)
    n = int.from_bytes(read_range(0, 8), "little")
    if n > max_header:
        raise InvalidFormat(f"{name}: safetensors header of {n} bytes exceeds the {max_header}-byte cap", file=name)
    if 8 + n > file_size:
        raise InvalidFormat(f"{name}: header length {n} runs past the end of the file", file=name)
    try:
        header = json.loads(read_range(8, n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidFormat(f"{name}: safetensors header is not valid JSON", file=name) from exc
    if not isinstance(header, dict):
        raise InvalidFormat(f"{name}: safetensors header is not a JSON object", file=name)
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InvalidFormat(f"{name}: __metadata__ must map strings to strings", file=name)
    data_len = file_size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InvalidFormat(f"{name}: tensor {key!r} has no description", file=name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise InvalidFormat(f"{name}: tensor {key!r} has unknown dtype {dtype!r}", file=name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidFormat(f"{name}: tensor {key!r} has an invalid shape", file=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidFormat(f"{name}: tensor {key!r} has invalid data_offsets", file=name)
        begin, end = offsets
        expected = math.ceil(math.prod(shape) * DTYPE_SIZES[dtype])
        if begin < 0 or end < begin or end - begin != expected:
            raise InvalidFormat(f"{name}: tensor {key!r} spans {end - begin} bytes, its shape needs {expected}", file=name)
        spans.append((begin, end, key))
    spans.sort()
    cursor = 0
    for begin, end, key in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise InvalidFormat(f"{name}: tensor {key!r} {what}", file=name)
        cursor = end
    if cursor != data_len:
        raise InvalidFormat(f"{name}: tensors cover {cursor} bytes but the data section has {data_len}", file=name)
    return header


def parse_json_file(data: bytes, *, name: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidFormat(f"{name}: not valid JSON", file=name) from exc


def check_adapter_config(cfg: Any, *, name: str = ADAPTER_CONFIG) -> dict[str, Any]:
    """The fields every consumer of a Tinker/PEFT adapter needs: a positive int ``r`` and a
    positive ``lora_alpha``; ``target_modules`` if present is a string or list of strings."""
    if not isinstance(cfg, dict):
        raise InvalidFormat(f"{name}: must be a JSON object", file=name)
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidFormat(f"{name}: 'r' must be a positive integer", file=name)
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise InvalidFormat(f"{name}: 'lora_alpha' must be a positive number", file=name)
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise InvalidFormat(f"{name}: 'target_modules' must be a string or a list of strings", file=name)
    return cfg


def validate_file(path: str, size: int, read_range: ReadRange, *, max_header: int, max_json: int) -> Mapping[str, Any] | None:
    """Validate one file by its name. Returns the parsed header/JSON where there is one."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf.endswith(".safetensors"):
        return parse_safetensors_header(read_range, size, max_header=max_header, name=path)
    if leaf.endswith(".json"):
        if size > max_json:
            raise InvalidFormat(f"{path}: JSON file of {size} bytes exceeds the {max_json}-byte cap", file=path)
        parsed = parse_json_file(read_range(0, size), name=path)
        if leaf == ADAPTER_CONFIG:
            check_adapter_config(parsed, name=path)
        return parsed if isinstance(parsed, dict) else None
    return None
