"""PyTorch Distributed Checkpoint (DCP) storage on weightstore (issue 14, part 2).

``dcp.save(state, storage_writer=WeightstoreStorageWriter(url=..., api_key=..., run_id=..., name=...))``
commits one full-state checkpoint ``tinker://RUN/weights/NAME`` whose files are DCP's own layout
(``formats.check_dcp_file_set``): a pickled ``.metadata`` and ``__{rank}_{n}.distcp`` data files
(``FILE_BYTES`` each), in the format ``FileSystemWriter`` writes, so a downloaded checkpoint is a directory that
``FileSystemReader`` loads too. ``dcp.load(state, storage_reader=WeightstoreStorageReader(url=...,
api_key=..., path="tinker://..."))`` loads it on any number of ranks (DCP reshards).

The protocol, mapped onto the upload protocol (``weightstore.uploads``):

1. coordinator, ``prepare_global_plan``: declares ONE upload (``layout="dcp"``, no files yet) and
   sends each rank the upload id and its file prefix in ``SavePlan.storage_data`` (DCP's own
   channel for coordinator decisions; no extra collective).
2. every rank, ``write_data``: serialises its items into local files (tensors with
   ``torch.save``, bytes as given), hashing as it writes; adds those files to the upload
   (``POST /v1/uploads/{id}/files``) and sends only what the tenant does not hold (``present``:
   unchanged shards move 0 bytes), by presigned PUT or through the service.
3. coordinator, ``finish``: adds ``.metadata`` and commits with ``expect_files`` = every file the
   metadata names. The commit is the only step that makes anything visible, and it refuses a file
   set that differs (a rank that never added its file). A save killed anywhere leaves an open upload
   that nobody can see; its lease lapses and the collector reclaims its blobs.

Reads (``read_data``): each rank fetches only the byte ranges its plan needs. Where the blob has
chunk digests (``loader``), the chunks covering those ranges are fetched and each is verified
against its recorded sha256 before any byte reaches ``torch.load``: every byte read is verified,
and at most one chunk on each side of a range is read beyond it. A file without chunk digests yet
(sent by presigned PUT and not backfilled: the files request that the reader makes starts the
backfill) cannot have a partial range verified, so it is fetched whole and checked against its
sha256 (``VerifiedLoader``): correctness over bytes saved; ``bytes_fetched`` tells which happened.

Layout: the checkpoint answers ``layout: "dcp"`` (``formats.checkpoint_layout``) and is listed,
expired, billed and collected like any other. A LoRA adapter saved with ``adapter_config=`` (an
``adapter_config.json`` committed alongside) exports to PEFT or a merged model
(``weightstore.integrations.dcp_lora``). Tinker's ``load_state`` and ``Client.load_state`` refuse a
DCP checkpoint (400 ``invalid_request``): it is not Tinker full state; load it with ``dcp.load``.

Trust: DCP's metadata is a pickle and DCP's default planner ``torch.load``s non-tensor items with
``weights_only=False``. The metadata is unpickled here with an allow-list of DCP's own classes;
the non-tensor items are DCP's business, exactly as with ``FileSystemReader``: load only
checkpoints whose writers you trust (your tenant's, or a publisher's you trust).

Picklable by design (``dcp.async_save`` ships the writer to a thread or process): the writer and
reader hold only strings and numbers until a save/load runs; clients are made per call and dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import os
import pickle
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from weightstore.client import Client, _LeaseKeeper
from weightstore.errors import IntegrityError, InvalidFormat, NotFound
from weightstore.formats import ADAPTER_CONFIG, DCP_METADATA
from weightstore.loader import FileSpec
from weightstore.names import TinkerPath

__all__ = ["WeightstoreStorageReader", "WeightstoreStorageWriter"]

DATA_FILE = "{prefix}{n}.distcp"
"""Each rank writes ``__{rank}_{n}.distcp``, as ``FileSystemWriter`` names its files."""
FILE_BYTES = 256 * 1024 * 1024
"""A rank starts a new data file once the current one holds this many bytes: files are sent in
parallel (one 1 GiB PUT is one stream, and one checksum on the store), and dedup works per file, so
the unchanged part of a rank's state (a frozen layer's weights and moments) moves nothing even
when the rest changed. Items are never split: a larger tensor makes a larger file."""


@dataclasses.dataclass(frozen=True)
class _RankData:
    """What the coordinator tells each rank (``SavePlan.storage_data``)."""

    upload_id: str
    prefix: str


def _client(url: str | None, api_key: str | None, transfer: str) -> Client:
    # No progress bars from ranks, no on-disk hash cache (files are fresh temp files).
    return Client(url, api_key, transfer=transfer, progress=False, hash_cache=False)


def _send(client: Client, upload_id: str, files: dict[str, tuple[int, str, bytes | Path]]) -> int:
    """Add ``files`` (path -> size, sha256, bytes or local path) to the upload and send what the
    service does not hold; returns the bytes sent."""
    answers = client.add_upload_files(upload_id, {p: (size, sha) for p, (size, sha, _) in files.items()})
    return client.send_upload_files(upload_id, answers, {p: src for p, (_, _, src) in files.items()})


def _done(results: list[WriteResult]) -> Future[list[WriteResult]]:
    fut: Future[list[WriteResult]] = Future()
    fut.set_result(results)
    return fut


class WeightstoreStorageWriter(StorageWriter):
    """DCP ``StorageWriter`` committing a full-state checkpoint ``tinker://RUN/weights/NAME`` (module doc).

    ``adapter_config`` (a PEFT ``adapter_config.json``: ``r``, ``lora_alpha``, optionally
    ``target_modules``) is saved alongside when the state holds LoRA adapter tensors: it makes the
    checkpoint exportable to a PEFT adapter or a merged model (``weightstore.integrations.dcp_lora``).

    After ``dcp.save`` returns, ``tinker_path`` holds the committed path on the coordinator and
    ``bytes_sent`` the bytes this rank sent (0 for an unchanged shard)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        run_id: str,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
        transfer: str = "auto",
        file_bytes: int = FILE_BYTES,
        adapter_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.url, self.api_key, self.run_id, self.name, self.file_bytes = url, api_key, run_id, name, file_bytes
        self.adapter_config = dict(adapter_config) if adapter_config is not None else None
        self.ttl_seconds, self.overwrite, self.user_metadata, self.transfer = ttl_seconds, overwrite, user_metadata, transfer
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self.upload_id: str | None = None
        self.tinker_path: str | None = None
        self.bytes_sent = 0
        self._lease: _LeaseKeeper | None = None  # coordinator only, between planning and finish
        self._lease_client: Client | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lease"] = state["_lease_client"] = None  # threads and sockets do not travel
        return state

    # --- protocol ---------------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._close_unfinished()
        if checkpoint_id:
            path = TinkerPath.parse(str(checkpoint_id))
            if path.kind != "training":
                raise ValueError(f"{checkpoint_id}: a DCP checkpoint is full state (tinker://RUN/weights/NAME)")
            self.run_id, self.name = path.run_id, path.name
        self.save_id, self.upload_id, self.tinker_path, self.bytes_sent = uuid.uuid4().hex, None, None, 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Every save (DCP calls ``reset`` only when given a ``checkpoint_id``): fresh per-save state."""
        self._close_unfinished()
        self.is_coordinator = is_coordinator
        self.save_id, self.upload_id, self.tinker_path, self.bytes_sent = uuid.uuid4().hex, None, None, 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: declare the one upload every rank adds its file to."""
        client = _client(self.url, self.api_key, self.transfer)
        ans = client.declare_upload(
            self.run_id,
            "training",
            self.name,
            layout="dcp",
            ttl_seconds=self.ttl_seconds,
            overwrite=self.overwrite,
            user_metadata=self.user_metadata,
        )
        self.upload_id = ans["upload_id"]
        self._lease_client, self._lease = client, _LeaseKeeper(client, ans["upload_id"], ans.get("lease_seconds") or 0)
        self._lease.start()  # ranks may take longer than one lease to serialise and send
        return [dataclasses.replace(p, storage_data=_RankData(ans["upload_id"], f"__{i}_")) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Serialise this rank's items into files of about ``file_bytes`` each (hashing as it
        writes); each finished file is added to the upload and sent (what the tenant does not hold)
        while the next one is serialised."""
        rank: _RankData = plan.storage_data
        results: list[WriteResult] = []
        # Bytes items first, then tensors, in plan order: the same state makes the same files.
        ordered = [i for i in plan.items if i.type == WriteItemType.BYTE_IO]
        ordered += [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
        if not ordered:
            self.bytes_sent = 0
            return _done(results)
        with (
            tempfile.TemporaryDirectory(prefix="weightstore-dcp-") as tmp,
            _client(self.url, self.api_key, self.transfer) as client,
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="dcp-send") as senders,
        ):
            files: dict[str, tuple[int, str, bytes | Path]] = {}
            sending: list[ConcurrentFuture[int]] = []
            f: BinaryIO | None = None
            name, h, size = "", hashlib.sha256(), 0

            def close() -> None:
                if f is not None:
                    f.close()
                    files[name] = (size, h.hexdigest(), Path(tmp) / name)
                    sending.append(senders.submit(_send, client, rank.upload_id, {name: files[name]}))

            for item in ordered:
                if f is None or size >= self.file_bytes:
                    close()
                    name, h, size = DATA_FILE.format(prefix=rank.prefix, n=len(files)), hashlib.sha256(), 0
                    f = open(Path(tmp) / name, "wb")  # noqa: SIM115 - closed by close() as the next file starts
                payload = _serialise(item, planner.resolve_data(item))
                f.write(payload)
                h.update(payload)
                results.append(WriteResult(item.index, len(payload), _StorageInfo(name, size, len(payload))))
                size += len(payload)
            close()
            self.bytes_sent = sum(done.result() for done in sending)
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: add ``.metadata``, then commit once, expecting exactly the files it names."""
        if self.upload_id is None:
            raise RuntimeError("finish before prepare_global_plan: this writer declared no upload")
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        metadata.storage_meta = self.storage_meta()
        blob = pickle.dumps(metadata)
        extra = {DCP_METADATA: blob}
        if self.adapter_config is not None:  # what makes a LoRA adapter's DCP checkpoint exportable (dcp_lora)
            extra[ADAPTER_CONFIG] = json.dumps(self.adapter_config, sort_keys=True).encode()
        expect = sorted({r.storage_data.relative_path for rank in results for r in rank} | set(extra))
        client = self._lease_client or _client(self.url, self.api_key, self.transfer)
        try:
            self.bytes_sent += _send(
                client, self.upload_id, {p: (len(b), hashlib.sha256(b).hexdigest(), b) for p, b in extra.items()}
            )
            self.tinker_path = str(client.commit_upload(self.upload_id, expect_files=expect)["tinker_path"])
        except BaseException:
            client.abort_upload(self.upload_id)
            raise
        finally:
            if self._lease is not None:
                self._lease.stop()
            client.close()
            self._lease = self._lease_client = None

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(TinkerPath(self.run_id, "training", self.name)), save_id=self.save_id)

    def _close_unfinished(self) -> None:
        """A save that failed on some rank never reaches ``finish`` (DCP raises first): its upload
        is still open and this coordinator still renews it. The next save through this writer (or
        ``close``) stops renewing and aborts it, so its blobs are not pinned until the upload's
        absolute expiry."""
        if self._lease is not None and self._lease_client is not None and self.upload_id is not None:
            self._lease.stop()
            self._lease_client.abort_upload(self.upload_id)
            self._lease_client.close()
        self._lease = self._lease_client = None

    def close(self) -> None:
        """Abort a save that did not finish (see ``_close_unfinished``); harmless otherwise."""
        self._close_unfinished()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return str(checkpoint_id).startswith("tinker://")


def _serialise(item: WriteItem, data: Any) -> bytes:
    """One item's bytes, as ``FileSystemWriter`` stores them (``torch.save`` of a CPU tensor that
    owns exactly its bytes, so a view never drags its whole base storage into the file)."""
    if item.type == WriteItemType.BYTE_IO:
        return bytes(data.getbuffer())
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


# --- reading ------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``Metadata`` and nothing else: DCP's own classes, torch's dtype/layout/
    memory-format constants and ``torch.Size``, and a few plain containers."""

    PLAIN = {
        ("collections", "OrderedDict"),
        ("copyreg", "_reconstructor"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "object"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by its name
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.PLAIN:
            return super().find_class(module, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if module == "torch" and "." not in name:
            found = getattr(torch, name, None)
            if isinstance(found, torch.dtype | torch.layout | torch.memory_format) or found is torch.Size:
                return found
        raise InvalidFormat(f"{DCP_METADATA}: refusing to unpickle {module}.{name} (not part of DCP metadata)")


def load_metadata(data: bytes | mmap.mmap) -> Metadata:
    md = _MetadataUnpickler(io.BytesIO(bytes(data))).load()
    if not isinstance(md, Metadata):
        raise InvalidFormat(f"{DCP_METADATA}: not a DCP Metadata ({type(md).__name__})")
    return md


class WeightstoreStorageReader(StorageReader):
    """DCP ``StorageReader`` of a DCP checkpoint in weightstore (module doc). ``bytes_fetched``:
    what this rank fetched, ``ranged`` whether every file it read was read in verified chunks."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, *, path: str | None = None, connections: int = 8
    ) -> None:
        super().__init__()
        self.url, self.api_key, self.path, self.connections = url, api_key, path, connections
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self.load_id = uuid.uuid4().hex
        self.bytes_fetched = 0
        self.ranged = True

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = str(checkpoint_id)
        self.storage_data, self.load_id, self.bytes_fetched, self.ranged = {}, uuid.uuid4().hex, 0, True

    def _files(self, client: Client) -> dict[str, FileSpec]:
        if not self.path:
            raise ValueError("WeightstoreStorageReader needs path='tinker://RUN/weights/NAME'")
        return {f["path"]: FileSpec.from_answer(f) for f in client.file_urls(self.path)["files"]}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise NotFound("weightstore DCP checkpoints have one global .metadata, no per-rank metadata")
        with _client(self.url, self.api_key, "auto") as client:
            files = self._files(client)
            if DCP_METADATA not in files:
                raise NotFound(f"{self.path} is not a DCP checkpoint (it has no {DCP_METADATA})")
            md = load_metadata(client.loader.load_bytes(files[DCP_METADATA]))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        if per_file:
            with _client(self.url, self.api_key, "auto") as client:
                client.loader.connections = self.connections
                files = self._files(client)
                for rel in per_file:
                    if rel not in files:
                        raise IntegrityError(f"{self.path}: its metadata names {rel}, which the checkpoint lacks")
                stored = self.storage_data
                work = [
                    (rel, items, [(stored[i.storage_index].offset, stored[i.storage_index].length) for i in items])
                    for rel, items in per_file.items()
                ]
                # One file ahead: the next file's ranges are fetched and verified while this one's items
                # are deserialised (at most two files' buffers at once; ranks roll files every 256 MiB).
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcp-prefetch") as prefetch:
                    pending = prefetch.submit(self._fetch, client, files[work[0][0]], work[0][2])
                    for n, (_rel, items, spans) in enumerate(work):
                        buf = pending.result()
                        if n + 1 < len(work):
                            nxt = work[n + 1]
                            pending = prefetch.submit(self._fetch, client, files[nxt[0]], nxt[2])
                        for item, (offset, length) in zip(items, spans, strict=True):
                            _apply(planner, item, io.BytesIO(buf[offset : offset + length]))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _fetch(self, client: Client, spec: FileSpec, spans: list[tuple[int, int]]) -> mmap.mmap:
        """A buffer of the file's size (an anonymous mapping: untouched pages cost nothing) in which
        every byte of ``spans`` is filled and verified (module doc)."""
        if not spec.chunked:
            self.ranged = False
            self.bytes_fetched += spec.size
            return client.loader.load_bytes(spec)
        todo = sorted(set(_chunks_covering(spans, spec.chunk_size or 0, spec.size)))
        buf = mmap.mmap(-1, max(1, spec.size))
        view = memoryview(buf)
        try:
            client.loader.fill(spec, view[: spec.size], todo=todo)
        finally:
            view.release()
        self.bytes_fetched += sum(end - start for start, end in todo)
        return buf

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return str(checkpoint_id).startswith("tinker://")


def _chunks_covering(spans: list[tuple[int, int]], chunk: int, size: int) -> Iterator[tuple[int, int]]:
    for offset, length in spans:
        for first in range(offset // chunk * chunk, offset + length, chunk):
            yield first, min(first + chunk, size)


def _apply(planner: LoadPlanner, item: ReadItem, data: io.BytesIO) -> None:
    """Hand one item's verified bytes to the planner, as ``FileSystemReader`` does."""
    if item.type == LoadItemType.BYTE_IO:
        planner.load_bytes(item, data)
        return
    from torch.distributed._shard._utils import narrow_tensor_by_index

    tensor = narrow_tensor_by_index(torch.load(data, map_location="cpu", weights_only=True), item.storage_offsets, item.lengths)
    target = planner.resolve_tensor(item).detach()
    if target.size() != tensor.size():
        raise IntegrityError(f"{item.storage_index.fqn}: stored shard is {tuple(tensor.size())}, wanted {tuple(target.size())}")
    target.copy_(tensor)
    planner.commit_tensor(item, target)
