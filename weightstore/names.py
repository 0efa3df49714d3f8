"""Names, ids and ``tinker://`` paths: validated once, at the boundary.

Charsets (documented in the README):
- checkpoint name: ``[A-Za-z0-9._-]``, 1..128 characters (configurable), not ``.`` or ``..``;
  no ``/`` because Tinker paths split on it;
- run id: ``[A-Za-z0-9._:-]``, 1..200 characters (Tinker run ids contain ``:``), starting with a
  letter or digit, so every accepted id is addressable: ``.`` and ``..`` would be removed from a URL
  path as dot segments, and an id starting with ``-`` reads as an option on a command line;
- tenant: ``[a-z0-9][a-z0-9_-]``, 1..64 characters, not shaped like a UUID (a tenant's run-id
  namespace ``{tenant}:...`` must never overlap the server-minted ``{uuid}:train:{n}`` ids, see
  ``weightstore.runs``);
- file path inside a checkpoint: relative, ``/``-separated segments of ``[A-Za-z0-9._-]``,
  no empty, ``.`` or ``..`` segment, no leading ``/`` or backslash, at most 255 characters.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from weightstore.errors import InvalidName, InvalidPath, InvalidRequest

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# tinker path segment <-> checkpoint kind (Tinker's three, plus our native merged-model kind)
SEGMENT_BY_KIND = {
    "training": "weights",
    "sampler": "sampler_weights",
    "external": "external_weights",
    "merged": "merged_weights",
    "files": "files",  # a folder pushed through the Hub that is no Tinker checkpoint (weightstore.hubwrite)
}
KIND_BY_SEGMENT = {v: k for k, v in SEGMENT_BY_KIND.items()}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def check_name(name: str, *, max_length: int = 128) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName("name must be a non-empty string")
    if "/" in name:
        raise InvalidName(f"name {name!r} must not contain '/'")
    if len(name) > max_length:
        raise InvalidName(f"name is longer than {max_length} characters")
    if name in {".", ".."} or not NAME_RE.match(name):
        raise InvalidName(f"name {name!r} may only contain letters, digits, '.', '_' and '-'")
    return name


def check_run_id(run_id: str) -> str:
    """The one run-id check (creation and every ``tinker://`` path). Every id it accepts round-trips
    through ``TinkerPath``, the Tinker SDK's path parser and a URL path segment."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise InvalidName(
            f"run id {str(run_id)[:220]!r} must start with a letter or digit and contain only letters, digits, "
            "'.', '_', ':' and '-' (max 200)"
        )
    return run_id


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_RE.match(name):
        raise InvalidName(f"tenant {name!r} must be lowercase letters, digits, '_' or '-' (max 64)")
    if UUID_RE.match(name):
        raise InvalidName(f"tenant {name!r} must not be shaped like a UUID (server-minted run ids start with one)")
    return name


def check_file_path(path: str) -> str:
    """A relative path inside a checkpoint. Refuses traversal, absolute paths and odd characters."""
    if not isinstance(path, str) or not path or len(path) > 255:
        raise InvalidPath("file path must be 1..255 characters")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise InvalidPath(f"file path {path!r} must be relative and use '/'")
    for seg in path.split("/"):
        if seg in {"", ".", ".."} or not SEGMENT_RE.match(seg):
            raise InvalidPath(f"file path {path!r} has an invalid segment {seg!r}")
    return path


def check_sha256(value: str) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise InvalidRequest(f"sha256 must be 64 lowercase hex characters, got {str(value)[:80]!r}")
    return value


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    @property
    def segment(self) -> str:
        return SEGMENT_BY_KIND[self.kind]

    @property
    def checkpoint_id(self) -> str:
        return f"{self.segment}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"

    @classmethod
    def parse(cls, value: str) -> TinkerPath:
        """Same grammar as the Tinker SDK: ``tinker://RUN/SEGMENT/NAME``, exactly three parts."""
        if not isinstance(value, str) or not value.startswith("tinker://"):
            raise InvalidPath(f"invalid tinker path {value!r}: must start with tinker://")
        parts = value[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in KIND_BY_SEGMENT:
            raise InvalidPath(
                f"invalid tinker path {value!r}: expected tinker://RUN/(weights|sampler_weights|external_weights)/NAME"
            )
        run_id = check_run_id(parts[0])
        return cls(run_id, KIND_BY_SEGMENT[parts[1]], check_name(parts[2], max_length=255))

    @classmethod
    def from_checkpoint_id(cls, run_id: str, checkpoint_id: str) -> TinkerPath:
        return cls.parse(f"tinker://{run_id}/{checkpoint_id}")
