"""Deterministic checkpoint files: LoRA weights and optimizer state as safetensors.

Determinism is what makes dedup work: the weights file of a full-state checkpoint and the sampler
checkpoint of the same step are byte-identical (sorted keys, fixed metadata), so they are stored
once. Optimizer state keeps every tensor bit-exact; non-tensor values (param groups, python
scalars) ride in the header metadata as tagged JSON so tuples come back as tuples. Sorting is for
keys only: lists whose positions mean something (``param_names``: the name of optimizer parameter
``i``) keep their order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
PARAM_NAMES_ORDER = "optimizer_index"
"""Marks ``param_names`` lists written in optimizer index order (issue 11); older ones were sorted."""


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


def optimizer_bytes(state_dict: dict[str, Any], *, param_names: Sequence[str] | None = None) -> bytes:
    """Serialise ``optimizer.state_dict()``: tensors as ``state.<param index>.<name>``; the rest
    (param groups, non-tensor per-param values) as JSON in the header metadata.

    ``param_names[i]`` must name optimizer parameter ``i`` (``optimizer_param_names_for`` derives
    it); a list of another length is refused. It is written in that order, never sorted: unlike the
    tensor keys (sorted for byte-stable files), its positions carry the meaning."""
    names = list(param_names or [])
    count = sum(len(group.get("params", [])) for group in state_dict.get("param_groups", []))
    if names and len(names) != count:
        raise ValueError(f"param_names has {len(names)} names for {count} optimizer parameters")
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
        "param_names": json.dumps(names),
        "param_names_order": PARAM_NAMES_ORDER,
    }
    return bytes(st_save({k: tensors[k] for k in sorted(tensors)}, metadata=metadata))


def load_optimizer(data: bytes | Any, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The inverse of ``optimizer_bytes``: a dict ``optimizer.load_state_dict`` accepts.
    ``tensors``: the file's tensors already built (on the same buffer, by ``loader``)."""
    metadata = _metadata(data)
    tensors = st_load(bytes(data)) if tensors is None else tensors
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
    """Name of each optimizer parameter by index (``[i]`` names ``state[i]``); ``[]`` when unknown.

    Files written before issue 11 carry ``param_names`` without ``param_names_order``: that list is
    the weight names sorted as text (``layers.10`` before ``layers.2``), a set and not a mapping, so
    it is not returned as one. For them, and for files saved without names, the names come from the
    param groups when the optimizer was built from ``named_parameters()`` (torch >= 2.6), else ``[]``.
    The optimizer state itself never depended on this list: ``load_optimizer`` restores by index."""
    metadata = _metadata(data)
    names = list(json.loads(metadata.get("param_names", "[]")))
    if names and metadata.get("param_names_order") == PARAM_NAMES_ORDER:
        return names
    return _names_from_param_groups(_decode(json.loads(metadata.get("param_groups", "[]")))) or []


def _names_from_param_groups(groups: list[dict[str, Any]]) -> list[str] | None:
    """Names an optimizer built from ``named_parameters()`` keeps beside each group's indices."""
    by_index: dict[int, str] = {}
    for group in groups:
        names, indices = group.get("param_names"), group.get("params", [])
        if not isinstance(names, list | tuple) or len(names) != len(indices):
            return None
        by_index.update(zip(indices, names, strict=True))
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return [str(by_index[i]) for i in range(len(by_index))]


def optimizer_param_names_for(
    optimizer: torch.optim.Optimizer | dict[str, Any],
    *,
    model: torch.nn.Module | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """``names[i]`` = the name of optimizer parameter ``i``, in the order torch numbers them in
    ``state_dict()`` (``param_groups[*]["params"]``, group after group); ``[]`` when not known.

    Sources, most trusted first: names the optimizer keeps itself (built from
    ``named_parameters()``); ``model.named_parameters()`` matched by identity (a parameter of the
    optimizer missing from ``model`` is an error); ``weights`` whose tensors are the parameters or
    views of their storage (``model.state_dict()``, a PEFT state dict), matched by storage, and
    used only if every parameter matches. Values are never compared: copies, and LoRA B matrices
    that all start at zero, could not be told apart. A partial or guessed list would be worse than
    none: whoever remaps state by these names would silently get the wrong tensors."""
    state_dict = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    named = _names_from_param_groups(list(state_dict.get("param_groups", [])))
    if named is not None or isinstance(optimizer, dict):
        return named or []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if model is not None:
        by_id = {id(p): name for name, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"optimizer parameters {missing[:5]} are not parameters of the model given")
        return [by_id[id(p)] for p in params]
    if weights is None:
        return []
    by_storage: dict[tuple[Any, ...], str] = {}
    for name, tensor in weights.items():  # first name wins for tied weights, as in named_parameters()
        by_storage.setdefault(_storage_key(tensor), name)
    names = [by_storage.get(_storage_key(p)) for p in params]
    return [] if None in names else [n for n in names if n is not None]


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same memory: a parameter and its ``detach()`` view share it.
    Tensors without storage to compare (empty, meta) get a key of their own."""
    try:
        if t.numel():
            return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    except (RuntimeError, NotImplementedError):  # meta or wrapper tensors without a plain storage
        pass
    return ("no-storage", id(t))
