"""Hugging Face Hub coordinates of base models, runs and checkpoints, and the look-ups of the Hub read side.

Behind ``HF_ENDPOINT=<weightstore>`` (issue 15, part 1).

The mapping (one table, also the README's):

| what                                              | repo_id                 | revision                     | subfolder  |
|---------------------------------------------------|-------------------------|------------------------------|------------|
| base model ``org/name``                           | ``org/name``            | ``main``                     |            |
| base model ``name`` (one segment)                 | ``base/name``           | ``main``                     |            |
| run ``{tenant}:{rest}``, ``rest`` a valid part    | ``{tenant}/{rest}``     | ``main``: every checkpoint   |            |
| any other run id (``{uuid}:train:0``, ...)        | ``{tenant}/{slug}-{h}`` | ``main``: every checkpoint   |            |
| checkpoint ``tinker://RUN/SEG/NAME``              | the run's repo          | ``SEG/NAME``: its files      |            |
| the same checkpoint, inside the run's ``main``    | the run's repo          | ``main``                     | ``SEG/NAME`` |
| pushed folder, kind ``files`` (``hubwrite``)      | the run's repo          | ``files/NAME``               | ``NAME``   |

``SEG`` is the Tinker path segment (``weights``, ``sampler_weights``, ``external_weights`` for PEFT
exports, ``merged_weights`` for merged exports), so a checkpoint's Hub coordinates read like its
``tinker://`` path. ``slug`` is the run id (less its ``{tenant}:`` prefix) with every character outside
``[A-Za-z0-9_.-]`` (the ``:``) turned into ``.``, repeated ``.``/``-`` collapsed, cut to 80 characters; ``h``
is the first 10 hex digits of the run id's sha256, which makes the name unique and deterministic. A ``rest`` that is
already a valid name part is used verbatim (readable repo ids for named runs); ids outside the
tenant's ``{tenant}:`` namespace always get the hashed form, so two runs never share a repo name.

Hence, with ``HF_ENDPOINT`` set: (a) ``PeftModel.from_pretrained(base, repo, revision="sampler_weights/step-100")``
or ``(..., subfolder="sampler_weights/step-100")`` loads a sampler checkpoint or (``external_weights/...``)
a PEFT export; (b) ``AutoModelForCausalLM.from_pretrained(repo, revision="merged_weights/NAME")`` loads a
merged export and ``from_pretrained("org/name")`` a base model; (c) the run's ``main`` holds one
subdirectory per checkpoint, each with its ``adapter_config.json``, which is the layout vLLM's Hub LoRA
resolver scans (the LoRA name is ``sampler_weights/NAME``).

Commit ids (the Hub's ``sha``, 40 hex): a checkpoint's is ``sha1("checkpoint\\0" + checkpoint id)``,
fixed for its life (a checkpoint's files never change; an overwrite is a new checkpoint id). A run's
``main`` is ``sha1`` of the ids of the checkpoints the caller sees, so it moves when one is added,
deleted or expires: a ``main`` commit id is answered only while it is current (a client racing a
new save gets ``RevisionNotFound`` and retries). A base model's is ``sha1`` of its manifest.

Visibility is the native API's: the caller's own runs show every visible checkpoint; another
tenant's run shows only its *published* visible checkpoints, and a run with none is missing exactly
like a run that does not exist (``RepoNotFound``; foreign = missing). Base models are readable by
every authenticated key, as in ``/v1/base-models``. Base models are looked up first: they are
registered by admins, so a tenant cannot shadow ``org/name`` with a run of a tenant called ``org``.

Blob etags: every file is served as an LFS file whose oid is the blob's sha256 (weightstore's content
address is exactly the Hub's LFS etag); the git oid is the sha1 of the LFS pointer file.

Write side: ``weightstore.hubwrite`` (``create_repo("tenant/x")`` names the run ``{tenant}:x``; a
commit to ``main`` with paths ``SEG/NAME/...`` commits one checkpoint per folder).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from threading import Lock

from sqlmodel import Session, col, select

from weightstore import basemodels, checkpoints
from weightstore.auth import Principal
from weightstore.errors import NotFound
from weightstore.models import BaseModel, Blob, BlobState, Checkpoint, CheckpointFile, TrainingRun
from weightstore.names import KIND_BY_SEGMENT, SEGMENT_BY_KIND

REPO_PART_RE = re.compile(r"^[\w\-.]{1,96}$", re.ASCII)
MAIN = "main"
BASE_NAMESPACE = "base"
"""Namespace of one-segment base-model names (``tiny`` → ``base/tiny``)."""
SLUG_MAX = 80
"""Room for ``-`` + 10 hex digits within the Hub's 96-character limit."""
HASH_DIGITS = 10
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n"


class RepoNotFound(NotFound):
    """No repo by that id that the caller may read (missing and foreign answer the same)."""

    code = "repo_not_found"


class RevisionNotFound(NotFound):
    code = "revision_not_found"


class EntryNotFound(NotFound):
    """A file or folder that the revision does not hold (transformers probes optional files)."""

    code = "entry_not_found"


# --- names -----------------------------------------------------------------------------------------


def is_repo_part(part: str) -> bool:
    """The Hub's rule for the namespace and the name: ``[\\w\\-.]{1,96}``, no ``--`` or ``..``, no
    leading/trailing ``-``/``.``, no ``.git`` suffix."""
    return (
        bool(REPO_PART_RE.match(part))
        and "--" not in part
        and ".." not in part
        and part[0] not in "-."
        and part[-1] not in "-."
        and not part.endswith(".git")
    )


def split_repo_id(repo_id: str) -> tuple[str, str]:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(is_repo_part(p) for p in parts):
        raise RepoNotFound(f"repository {repo_id[:200]!r} not found")
    return parts[0], parts[1]


def run_repo_name(run_id: str, tenant_id: str) -> str:
    """The repo name (second part) of a run; deterministic, unique within the tenant (module doc)."""
    prefix = f"{tenant_id}:"
    rest = run_id[len(prefix) :] if run_id.startswith(prefix) else run_id
    if rest is not run_id and is_repo_part(rest):
        return rest
    slug = re.sub(r"[^A-Za-z0-9_.-]", ".", rest)
    slug = re.sub(r"[.-]*\.[.-]*", ".", slug)  # any run of '.'/'-' holding a '.' → '.'
    slug = re.sub(r"-{2,}", "-", slug)[:SLUG_MAX].strip(".-") or "run"
    return f"{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:HASH_DIGITS]}"


def run_repo_id(run_id: str, tenant_id: str) -> str:
    return f"{tenant_id}/{run_repo_name(run_id, tenant_id)}"


def base_repo_id(name: str) -> str | None:
    """A base model's repo id, or None when its name has no Hub form (three or more segments)."""
    parts = name.split("/")
    if len(parts) == 1 and is_repo_part(name):
        return f"{BASE_NAMESPACE}/{name}"
    if len(parts) == 2 and all(is_repo_part(p) for p in parts):
        return name
    return None


def checkpoint_revision(kind: str, name: str) -> str:
    return f"{SEGMENT_BY_KIND[kind]}/{name}"


FILES_KIND = "files"
ROOT_FOLDER = "root"
"""The ``files`` checkpoint that holds the files pushed to the root of ``main`` (``weightstore.hubwrite``)."""


def main_folder(kind: str, name: str) -> str:
    """Where a checkpoint's files sit in the run's ``main``: ``SEG/NAME/``; a pushed folder (kind
    ``files``) where it was pushed, ``NAME/``, and ``files/root`` at the root: ``main`` then looks
    exactly like what a Trainer pushed (``config.json``, ``model.safetensors``, ``last-checkpoint/``)."""
    if kind == FILES_KIND:
        return "" if name == ROOT_FOLDER else f"{name}/"
    return checkpoint_revision(kind, name) + "/"


@dataclass(frozen=True)
class HubCoordinates:
    """Where a checkpoint is on the Hub surface."""

    repo_id: str
    revision: str
    """The checkpoint's own revision (``SEG/NAME``): its files at the root."""
    subfolder: str
    """The same files inside the run's ``main`` (the vLLM resolver layout); ``""`` for the root."""


def coordinates(ckpt: Checkpoint) -> HubCoordinates:
    rev = checkpoint_revision(ckpt.kind, ckpt.name)
    sub = main_folder(ckpt.kind, ckpt.name).rstrip("/")
    return HubCoordinates(repo_id=run_repo_id(ckpt.run_id, ckpt.tenant_id), revision=rev, subfolder=sub)


# --- commit ids --------------------------------------------------------------------------------------


def _sha1(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode(), usedforsecurity=False).hexdigest()


def checkpoint_commit(ckpt: Checkpoint) -> str:
    return _sha1("checkpoint", ckpt.id)


def tree_oid(commit: str, path: str) -> str:
    """A folder's oid: stable for one commit and path (nothing reads it but equality)."""
    return _sha1("tree", commit, path)


def lfs_pointer(sha256: str, size: int) -> bytes:
    return LFS_POINTER.format(sha=sha256, size=size).encode()


def git_oid(sha256: str, size: int) -> str:
    """The git blob id of the file's LFS pointer (what the Hub lists as a large file's ``oid``)."""
    pointer = lfs_pointer(sha256, size)
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer, usedforsecurity=False).hexdigest()


# --- look-ups ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Snapshot:
    """One revision of one repo as the caller sees it."""

    repo_id: str
    commit: str
    files: tuple[HubFile, ...]
    last_modified: datetime
    private: bool
    """False for base models and published checkpoints, true for the caller's own."""

    def file(self, path: str) -> HubFile:
        for f in self.files:
            if f.path == path:
                return f
        raise EntryNotFound(f"{path[:300]!r} not found in {self.repo_id}")


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    base: str | None = None
    run: TrainingRun | None = None
    owner_view: bool = False


_NAME_CACHE: OrderedDict[tuple[str, str], str] = OrderedDict()
_NAME_CACHE_LOCK = Lock()
_NAME_CACHE_SIZE = 4096


def _find_run(session: Session, tenant_id: str, name: str) -> TrainingRun | None:
    """The live run of ``tenant_id`` whose repo name is ``name``. Verbatim names are one primary-key
    read; hashed names are remembered after one scan of the tenant's run ids (the mapping is a
    pure function, so a cached answer is re-checked, never trusted)."""
    candidates = [f"{tenant_id}:{name}"]
    with _NAME_CACHE_LOCK:
        cached = _NAME_CACHE.get((tenant_id, name))
    if cached is not None:
        candidates.insert(0, cached)
    for run_id in candidates:
        run = session.get(TrainingRun, run_id)
        if run is not None and run.tenant_id == tenant_id and run_repo_name(run.id, tenant_id) == name:
            return run if run.deleted_at is None else None
    if not re.search(rf"-[0-9a-f]{{{HASH_DIGITS}}}$", name):
        return None
    ids = session.exec(select(TrainingRun.id).where(TrainingRun.tenant_id == tenant_id)).all()
    for run_id in ids:
        if run_repo_name(run_id, tenant_id) == name:
            with _NAME_CACHE_LOCK:
                _NAME_CACHE[(tenant_id, name)] = run_id
                while len(_NAME_CACHE) > _NAME_CACHE_SIZE:
                    _NAME_CACHE.popitem(last=False)
            run = session.get(TrainingRun, run_id)
            return run if run is not None and run.deleted_at is None else None
    return None


find_run = _find_run
"""Public name for the write side (``weightstore.hubwrite``): the run behind ``tenant/name``."""


def _find_repo(session: Session, principal: Principal, repo_id: str) -> _Repo:
    namespace, name = split_repo_id(repo_id)
    base_name = name if namespace == BASE_NAMESPACE else repo_id
    if session.get(BaseModel, base_name) is not None:
        return _Repo(repo_id, base=base_name)
    run = _find_run(session, namespace, name)
    if run is None:
        raise RepoNotFound(f"repository {repo_id!r} not found")
    return _Repo(repo_id, run=run, owner_view=run.tenant_id == principal.tenant_id)


def _visible_checkpoints(session: Session, repo: _Repo, now: datetime) -> list[Checkpoint]:
    assert repo.run is not None
    q = select(Checkpoint).where(Checkpoint.run_id == repo.run.id, checkpoints.visible_clause(now))
    if not repo.owner_view:
        q = q.where(col(Checkpoint.public))
    return list(session.exec(q.order_by(col(Checkpoint.kind), col(Checkpoint.name))).all())


def _files(session: Session, ckpt: Checkpoint, prefix: str = "") -> list[HubFile]:
    return [HubFile(prefix + f.path, f.size_bytes, f.sha256) for f in checkpoints.files_of(session, ckpt)]


def _main_files(session: Session, visible: list[Checkpoint]) -> tuple[HubFile, ...]:
    """Every file of ``visible`` under its ``SEG/NAME/`` folder, in one query (a run may hold thousands)."""
    folder = {c.id: main_folder(c.kind, c.name) for c in visible}
    rows = session.exec(select(CheckpointFile).where(col(CheckpointFile.checkpoint_id).in_(list(folder)))).all()
    return tuple(sorted((HubFile(folder[f.checkpoint_id] + f.path, f.size_bytes, f.sha256) for f in rows), key=lambda f: f.path))


def snapshot(session: Session, principal: Principal, repo_id: str, revision: str, *, now: datetime) -> Snapshot:
    """The files of ``repo_id`` at ``revision`` (``main``, ``SEG/NAME`` or a commit id) that the caller
    may read. Raises ``RepoNotFound`` (missing or foreign), then ``RevisionNotFound``."""
    repo = _find_repo(session, principal, repo_id)
    if repo.base is not None:
        base = basemodels.get(session, repo.base)
        rows = basemodels.files_of(session, repo.base)
        base_files = tuple(HubFile(f.path, f.size_bytes, f.sha256) for f in rows)
        commit = _sha1("base", repo.base, *(f"{f.path}:{f.sha256}" for f in base_files))
        if revision not in (MAIN, commit):
            raise RevisionNotFound(f"revision {revision[:120]!r} not found in {repo_id}")
        return Snapshot(repo_id, commit, base_files, base.created_at, private=False)
    visible = _visible_checkpoints(session, repo, now)
    if not visible and not repo.owner_view:
        raise RepoNotFound(f"repository {repo_id!r} not found")
    main_commit = _sha1("main", *sorted(c.id for c in visible))
    latest = max((c.created_at for c in visible), default=repo.run.created_at if repo.run else now)
    if revision in (MAIN, main_commit):
        return Snapshot(repo_id, main_commit, _main_files(session, visible), latest, private=repo.owner_view)
    for c in visible:
        if revision in (checkpoint_revision(c.kind, c.name), checkpoint_commit(c)):
            return Snapshot(repo_id, checkpoint_commit(c), tuple(_files(session, c)), c.created_at, private=not c.public)
    raise RevisionNotFound(f"revision {revision[:120]!r} not found in {repo_id}")


def split_revision_path(rest: str) -> tuple[str, str]:
    """Split ``REV/PATH`` where ``REV`` is ``main``, a commit id or ``SEG/NAME`` (module doc).
    The Hub's clients send a ``/`` in a revision as ``%2F``; either form is accepted."""
    parts = rest.split("/")
    if parts[0] in KIND_BY_SEGMENT and len(parts) >= 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return parts[0], "/".join(parts[1:])


def live_file(session: Session, snap: Snapshot, path: str) -> HubFile:
    """The file at ``path``, only if its blob is live (S8: no URL to unverified or collected bytes)."""
    f = snap.file(path)
    blob = session.get(Blob, f.sha256)
    if blob is None or blob.state != BlobState.live:
        raise EntryNotFound(f"{path!r} in {snap.repo_id} is being collected")
    return f
