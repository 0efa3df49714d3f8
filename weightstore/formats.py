"""File formats: what a checkpoint must contain and how each file is validated before commit.

Validation reads only what it needs (safetensors: the 8-byte length and the JSON header), through a
``read_range(start, length)`` callable, so it works the same on a local file and on an S3 object.

Every JSON document the service parses from outside — request bodies (``weightstore_api.limits``),
safetensors headers, ``adapter_config.json`` and any other ``*.json`` in a checkpoint — goes through
``parse_json``: bounded size and nesting depth (checked without recursion, before parsing), finite
numbers only, and every failure an ``InvalidRequest`` (never ``RecursionError``/``ValueError``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate, repeat
from operator import sub
from typing import Any, NoReturn

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

# Files each kind must contain. Other extra files are allowed (validated by their extension).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "sampler": (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "training": (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_STATE),
    "external": (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "merged": ("config.json",),
}

# Files a kind must not contain: optimizer state makes a checkpoint a full-state one. A sampler
# checkpoint carrying it would be billed for bytes no sampler reads (README review, stop 17: `upload
# --kind sampler` of a full-state directory kept the optimizer silently).
FORBIDDEN_FILES: dict[str, tuple[str, ...]] = {
    "sampler": (OPTIMIZER_STATE,),
    "external": (OPTIMIZER_STATE,),
}

KIND_LABELS: dict[str, str] = {
    "training": "full-state checkpoint (--kind state; tinker://RUN/weights/NAME)",
    "sampler": "sampler checkpoint (--kind sampler; tinker://RUN/sampler_weights/NAME)",
    "external": "PEFT export (tinker://RUN/external_weights/NAME)",
    "merged": "merged-model export (tinker://RUN/merged_weights/NAME)",
}
"""How messages name a kind: by what users type (the CLI's ``--kind state``, the ``weights/`` path
segment), never by the catalog's internal ``training`` (issue 12, part 5 found "training" confuses)."""


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, f"{kind} checkpoint")


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects any parsed JSON may have. Real documents stay far below it
(safetensors header 3, adapter_config.json 2-3, tokenizer.json ~6); Python's parser recurses once
per level and dies with ``RecursionError`` near 1000, and so would anything walking the result."""

# Depth scan tables: brackets map to 2 (open) / 0 (close), every other byte is deleted; minus 1 each
# and a running sum gives the depth after every bracket, all in C loops.
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(data: bytes) -> int:
    """Deepest array/object nesting of a JSON text, by a linear scan that never recurses.

    Escapes are removed first (``\\\\`` then ``\\"``: JSON pairs backslashes left to right, and so does
    ``bytes.replace``), so every remaining quote delimits a string; brackets inside strings are dropped
    with them. For invalid JSON the count may be off, but such text is refused by the parser anyway.
    """
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    brackets = outside_strings.translate(_BRACKET_STEP, _NOT_BRACKETS)
    return max(accumulate(map(sub, brackets, repeat(1))), default=0)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf without complaint
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(
    data: bytes | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    name: str | None = None,
    error: type[InvalidRequest] = InvalidRequest,
) -> Any:
    """Parse one JSON document from outside, within limits. Refuses, as ``error`` (with ``file=name``
    when a file is named): more than ``max_bytes``, invalid UTF-8, nesting deeper than ``max_depth``,
    ``NaN``/``Infinity`` literals and numbers that overflow a float, integers past Python's digit limit,
    and anything else that is not JSON. Never raises ``RecursionError``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    what = name or "JSON document"
    details: dict[str, Any] = {"file": name} if name else {}
    if len(raw) > max_bytes:
        raise error(f"{what}: JSON of {len(raw)} bytes exceeds the {max_bytes}-byte cap", **details)
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{what}: nested deeper than {max_depth} levels", **details)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not valid JSON ({exc.msg} at byte {exc.pos})", **details) from exc
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not valid UTF-8", **details) from exc
    except (ValueError, RecursionError) as exc:  # our hooks, int digit limit; recursion only if the scan was fooled
        raise error(f"{what}: not valid JSON ({str(exc)[:120]})", **details) from exc


USER_METADATA_MAX_ENTRIES = 64
USER_METADATA_MAX_KEY_CHARS = 256
USER_METADATA_MAX_BYTES = 16 * 1024
"""Bound on a ``user_metadata`` mapping (keys plus values, UTF-8; non-string values as JSON): labels
such as ``{"renderer_name": "qwen3"}``, not a document store. Every row that holds one is read back
on list pages, so an unbounded mapping would make every listing of a run or checkpoint expensive."""


def check_user_metadata(meta: Mapping[str, Any] | None, *, strings_only: bool = True) -> None:
    """The one rule for ``user_metadata`` on every route that takes it (runs, uploads, Tinker
    sessions and loads): a mapping of at most ``USER_METADATA_MAX_ENTRIES`` entries, keys of 1..
    ``USER_METADATA_MAX_KEY_CHARS`` characters, ``USER_METADATA_MAX_BYTES`` in all; string values
    unless ``strings_only`` is false (Tinker's ``create_session`` types its values ``Any``)."""
    if meta is None:
        return
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise InvalidRequest("user_metadata must be an object with string keys")
    if strings_only and not all(isinstance(v, str) for v in meta.values()):
        raise InvalidRequest("user_metadata must map strings to strings")
    if len(meta) > USER_METADATA_MAX_ENTRIES:
        raise InvalidRequest(f"user_metadata has {len(meta)} entries; at most {USER_METADATA_MAX_ENTRIES} are allowed")
    if any(not 1 <= len(k) <= USER_METADATA_MAX_KEY_CHARS for k in meta):
        raise InvalidRequest(f"user_metadata keys must be 1..{USER_METADATA_MAX_KEY_CHARS} characters")
    size = sum(
        len(k.encode()) + len(v.encode() if isinstance(v, str) else json.dumps(v, allow_nan=False).encode())
        for k, v in meta.items()
    )
    if size > USER_METADATA_MAX_BYTES:
        raise InvalidRequest(f"user_metadata holds {size} bytes; at most {USER_METADATA_MAX_BYTES} are allowed")


# --- layouts ----------------------------------------------------------------------------------
# A checkpoint's file set follows one layout, recognised from the names alone (no catalog column):
# "tinker" (adapter_model.safetensors + adapter_config.json [+ optimizer.safetensors], the kinds'
# REQUIRED_FILES) or "dcp" (PyTorch Distributed Checkpoint, issue 14 part 2): one pickled
# ``.metadata`` plus per-rank ``__{rank}_{n}.distcp`` data files, and only a LoRA adapter's
# ``adapter_config.json`` besides (DCP_EXTRA_FILES), full state only. Answers name the layout
# (``checkpoint_layout``), with the single-layout kinds' own (``KIND_LAYOUTS``).
DCP_METADATA = ".metadata"
DCP_DATA = re.compile(r"__(0|[1-9][0-9]{0,5})_(0|[1-9][0-9]{0,5})\.distcp")
"""Data file names as ``FileSystemWriter`` and ``weightstore.integrations.dcp`` write them: a
downloaded DCP checkpoint is a directory ``dcp.load`` reads with ``FileSystemReader``."""
LAYOUTS = ("tinker", "dcp")
DCP_EXTRA_FILES = (ADAPTER_CONFIG,)
"""The one non-DCP file a DCP checkpoint may hold: the LoRA ``adapter_config.json`` (rank, alpha,
target modules) that makes a DCP checkpoint of adapter tensors exportable (``integrations.dcp_lora``).
``FileSystemReader`` ignores it in a downloaded directory."""


KIND_LAYOUTS = {"external": "peft", "merged": "hf", "files": "files"}
"""Layouts of the kinds that have only one: a PEFT adapter export, a merged Hugging Face model, a
Hub folder. ``sampler`` and ``training`` checkpoints are ``tinker`` or (full state only) ``dcp``."""


def checkpoint_layout(kind: str, paths: Iterable[str]) -> str:
    """The ``layout`` answered for a committed checkpoint of ``kind`` holding ``paths``: its kind's
    own layout, else ``dcp`` when it holds DCP's ``.metadata`` (a commit admits that name only in a
    DCP file set), else ``tinker``."""
    if kind in KIND_LAYOUTS:
        return KIND_LAYOUTS[kind]
    return "dcp" if DCP_METADATA in set(paths) else "tinker"


def is_dcp_file(path: str) -> bool:
    return path == DCP_METADATA or DCP_DATA.fullmatch(path) is not None


def layout_of(paths: Sequence[str]) -> str:
    """``dcp`` when any file is a DCP file (the rest must then be too: ``check_file_set``), else ``tinker``."""
    return "dcp" if any(is_dcp_file(p) for p in paths) else "tinker"


def check_dcp_file_set(kind: str, paths: Sequence[str], *, complete: bool = True) -> None:
    """A DCP checkpoint: full state only, DCP file names only, and (``complete``: at commit) its
    ``.metadata``. While ranks are still adding their files (``complete=False``) the metadata,
    written last by the coordinator, may be missing."""
    if kind != "training":
        raise InvalidFormat(f"a DCP checkpoint is a {kind_label('training')}, not a {kind_label(kind)}")
    other = sorted(p for p in paths if not is_dcp_file(p) and p not in DCP_EXTRA_FILES)
    if other:
        raise InvalidFormat(
            f"a DCP checkpoint holds only {DCP_METADATA}, __RANK_N.distcp files and (a LoRA adapter's) "
            f"{ADAPTER_CONFIG}, not {', '.join(other[:5])}",
            files=other[:20],
        )
    if complete and DCP_METADATA not in paths:
        raise InvalidFormat(f"a DCP checkpoint must contain {DCP_METADATA}", missing=[DCP_METADATA])


def check_file_set(kind: str, paths: Sequence[str], *, layout: str | None = None, complete: bool = True) -> None:
    """The file set of a checkpoint of ``kind`` in ``layout`` (default: recognised from the names)."""
    if len(set(paths)) != len(paths):
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        raise InvalidRequest(f"duplicate file names: {', '.join(dupes)}", files=dupes)
    if (layout or layout_of(paths)) == "dcp":
        check_dcp_file_set(kind, paths, complete=complete)
        return
    missing = [f for f in REQUIRED_FILES.get(kind, ()) if f not in paths]
    if missing:
        raise InvalidFormat(f"a {kind_label(kind)} must contain {', '.join(missing)}", missing=missing)
    extra = [f for f in FORBIDDEN_FILES.get(kind, ()) if f in paths]
    if extra:
        raise InvalidFormat(
            f"a {kind_label(kind)} holds weights only: {', '.join(extra)} belongs in a {kind_label('training')}",
            forbidden=extra,
        )


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
    header = parse_json(read_range(8, n), max_bytes=max_header, name=f"{name}: safetensors header", error=InvalidFormat)
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


def parse_json_file(data: bytes, *, name: str, max_bytes: int) -> Any:
    """A JSON file of a checkpoint: ``parse_json`` with the file's name, refused as ``InvalidFormat``."""
    return parse_json(data, max_bytes=max_bytes, name=name, error=InvalidFormat)


def check_adapter_config(cfg: Any, *, name: str = ADAPTER_CONFIG) -> dict[str, Any]:
    """The fields every consumer of a Tinker/PEFT adapter needs: a positive int ``r`` and a
    positive ``lora_alpha``; ``target_modules`` if present is a string or list of strings."""
    if not isinstance(cfg, dict):
        raise InvalidFormat(f"{name}: must be a JSON object", file=name)
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidFormat(f"{name}: 'r' must be a positive integer", file=name)
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not (alpha > 0 and math.isfinite(alpha)):
        raise InvalidFormat(f"{name}: 'lora_alpha' must be a positive finite number", file=name)
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise InvalidFormat(f"{name}: 'target_modules' must be a string or a list of strings", file=name)
    return cfg


def validate_file(path: str, size: int, read_range: ReadRange, *, max_header: int, max_json: int) -> Mapping[str, Any] | None:
    """Validate one file by its name. Returns the parsed header/JSON where there is one."""
    leaf = path.rsplit("/", 1)[-1]
    if path == DCP_METADATA:
        # A pickle: never unpickled by the service. Its size is bounded like any JSON metadata file;
        # readers unpickle it with an allow-list (weightstore.integrations.dcp).
        if not 0 < size <= max_json:
            raise InvalidFormat(f"{path}: DCP metadata of {size} bytes is outside 1..{max_json}", file=path)
        if read_range(0, 1) != b"\x80":
            raise InvalidFormat(f"{path}: not a pickled DCP Metadata (no pickle protocol header)", file=path)
        return None
    if leaf.endswith(".safetensors"):
        return parse_safetensors_header(read_range, size, max_header=max_header, name=path)
    if leaf.endswith(".json"):
        if size > max_json:
            raise InvalidFormat(f"{path}: JSON file of {size} bytes exceeds the {max_json}-byte cap", file=path)
        parsed = parse_json_file(read_range(0, size), name=path, max_bytes=max_json)
        if leaf == ADAPTER_CONFIG:
            check_adapter_config(parsed, name=path)
        return parsed if isinstance(parsed, dict) else None
    return None
