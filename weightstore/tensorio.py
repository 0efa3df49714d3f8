"""Deterministic checkpoint files: LoRA weights and optimizer state as safetensors.

Determinism is what makes dedup work: the weights file of a full-state checkpoint and the sampler
checkpoint of the same step are byte-identical (sorted keys, fixed metadata), so they are stored
once. Optimizer state keeps every tensor bit-exact; non-tensor values (param groups, python
scalars) ride in the header metadata as tagged JSON so tuples come back as tuples.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load

WEIGHTS_METADATA = {"format": "pt", "producer": "weightstore"}
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def st_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a byte-stable header: the library's own writer keeps metadata in a
    hash map whose order changes from call to call, which would defeat dedup."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors does
    return b"".join([len(raw).to_bytes(8, "little"), raw, *chunks])


OPTIMIZER_FORMAT = "weightstore.optimizer.v1"


def weights_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    tensors = {k: weights[k].detach().to("cpu").contiguous() for k in sorted(weights)}
    return bytes(st_save(tensors, metadata=dict(WEIGHTS_METADATA)))


def load_weights(data: bytes) -> dict[str, torch.Tensor]:
    return dict(st_load(data))


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store optimizer value of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_decode(k): _decode(v) for k, v in value["__dict__"]}
        if "__float__" in value:
            return float(value["__float__"])
    return value


def optimizer_bytes(state_dict: dict[str, Any], *, param_names: list[str] | None = None) -> bytes:
    """Serialise ``optimizer.state_dict()``: tensors as ``state.<param index>.<name>``; the rest
    (param groups, non-tensor per-param values) as JSON in the header metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in state_dict.get("state", {}).items():
        for name, value in per_param.items():
            key = f"state.{idx}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().to("cpu").contiguous()
            else:
                scalars[key] = _encode(value)
    metadata = {
        "format": OPTIMIZER_FORMAT,
        "param_groups": json.dumps(_encode(state_dict.get("param_groups", [])), sort_keys=True),
        "scalars": json.dumps(scalars, sort_keys=True),
        "param_names": json.dumps(param_names or []),
    }
    return bytes(st_save({k: tensors[k] for k in sorted(tensors)}, metadata=metadata))


def load_optimizer(data: bytes) -> dict[str, Any]:
    """The inverse of ``optimizer_bytes``: a dict ``optimizer.load_state_dict`` accepts."""
    metadata = _metadata(data)
    tensors = st_load(data)
    if metadata.get("format") != OPTIMIZER_FORMAT:
        raise ValueError("not a weightstore optimizer file")
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = tensor
    for key, value in json.loads(metadata.get("scalars", "{}")).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = _decode(value)
    groups = _decode(json.loads(metadata.get("param_groups", "[]")))
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}) or {})


def optimizer_param_names(data: bytes) -> list[str]:
    return list(json.loads(_metadata(data).get("param_names", "[]")))
