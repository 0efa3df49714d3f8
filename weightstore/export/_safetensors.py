"""Header-only safetensors reading and streaming safetensors writing for the export engine.

The export never materialises a whole checkpoint, and not even a whole shard: it reads each
tensor's *header entry* to plan, then moves bytes tensor by tensor (or row block by row block).

- Reading: headers are parsed and validated by :func:`weightstore.formats.parse_safetensors_header`
  (one validator for uploads and exports). Tensor bytes are read with ``os.preadv`` straight into a
  preallocated torch buffer: no mmap, so untouched pages of a shard never count towards the
  process's resident set, and no intermediate ``bytes`` object.
- Copying: untouched tensors move file-to-file with ``os.copy_file_range`` (the kernel copies; the
  bytes never enter user space), which is what "copied byte-for-byte" means here.
- Writing: the output header is computed from the plan *before* any data exists (all shapes and
  dtypes are known), so every tensor's offset is known and blocks are written in place by
  position (from several threads at once); a shard is never held in memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weightstore.errors import ExportFailed, IntegrityError, InvalidFormat
from weightstore.formats import DTYPE_SIZES, parse_safetensors_header
from weightstore.hashing import sha256_file

# safetensors itself refuses headers above 100 MB; a header that large is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000

# Dtypes the merge arithmetic understands (LoRA deltas are added in fp32, then cast back).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

# Reads and copies move at most this much per system call: large enough to amortise the call,
# small enough that a signal or a short read never stalls on gigabytes.
_IO_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk, from its file's header alone."""

    name: str
    """Tensor name as stored in the file."""
    file: Path
    """The safetensors file holding it."""
    dtype: str
    """safetensors dtype string (``BF16``, ``F32``, ...)."""
    shape: tuple[int, ...]
    """Tensor shape."""
    offset: int
    """Absolute byte offset of the first data byte in ``file``."""
    nbytes: int
    """Length of the tensor's data in bytes."""

    @property
    def itemsize(self) -> int:
        return int(DTYPE_SIZES[self.dtype])

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return TORCH_DTYPES[self.dtype]
        except KeyError:
            raise InvalidFormat(
                f"{self.file.name}: tensor {self.name!r} has dtype {self.dtype}, which cannot be merged",
                tensor=self.name,
                dtype=self.dtype,
            ) from None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; return its tensors (in data order) and metadata."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:

            def read_range(start: int, length: int) -> bytes:
                fh.seek(start)
                return fh.read(length)

            header = parse_safetensors_header(read_range, size, max_header=MAX_HEADER_BYTES, name=path.name)
            header_len = int.from_bytes(read_range(0, 8), "little")
    except FileNotFoundError:
        raise InvalidFormat(f"missing safetensors file {path.name}", file=str(path)) from None
    except OSError as exc:
        raise ExportFailed(f"cannot read {path}: {exc}", file=str(path)) from exc
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    tensors: dict[str, TensorInfo] = {}
    for name, info in entries:
        begin, end = info["data_offsets"]
        tensors[name] = TensorInfo(
            name=name,
            file=path,
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
            offset=data_start + begin,
            nbytes=end - begin,
        )
    return tensors, dict(metadata)


def check_sha256(root: Path, names: Iterable[str], expected: Mapping[str, str], *, what: str) -> None:
    """Hash every file in ``names`` (relative to ``root``) against ``expected``.

    A file without an expected hash is an error, not a pass: the caller promised a complete map.
    """
    for name in names:
        want = expected.get(name)
        if want is None:
            raise IntegrityError(f"{what}: no expected sha256 given for {name}", file=name)
        got = sha256_file(root / name)
        if got != want.lower():
            raise IntegrityError(
                f"{what}: {name} is corrupt (sha256 {got[:16]}..., expected {want[:16]}...)",
                file=name,
                expected=want,
                actual=got,
            )


def read_into(fd: int, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous uint8 tensor ``out`` from ``fd`` at ``offset`` (no intermediate copy)."""
    view = out.numpy().data.cast("B")
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done : done + _IO_CHUNK]], offset + done)
        if n <= 0:
            raise IntegrityError(f"unexpected end of file reading {total} bytes at offset {offset}")
        done += n


def read_tensor(fd: int, info: TensorInfo, *, start: int = 0, nbytes: int | None = None) -> torch.Tensor:
    """Read ``nbytes`` of a tensor's data starting ``start`` bytes into it, as a flat uint8 tensor."""
    count = info.nbytes - start if nbytes is None else nbytes
    buf = torch.empty(count, dtype=torch.uint8)
    read_into(fd, info.offset + start, buf)
    return buf


def pwrite_all(fd: int, data: torch.Tensor, offset: int) -> int:
    """Write a contiguous tensor's raw bytes at ``offset`` of ``fd``; return the byte count."""
    view = data.contiguous().view(torch.uint8).reshape(-1).numpy().data.cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _IO_CHUNK], offset + done)
    return done


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``.

    ``copy_file_range`` keeps the bytes in the kernel; filesystems or kernels that refuse it
    (cross-device on old kernels, some FUSE mounts) fall back to a user-space pread/pwrite loop.
    Explicit offsets on both sides make it safe to run from several threads at once.
    """
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src_fd, dst_fd, min(_IO_CHUNK, count - done), src_offset + done, dst_offset + done)
            if n == 0:
                raise IntegrityError(f"unexpected end of file copying {count} bytes at offset {src_offset}")
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    buf = torch.empty(min(_IO_CHUNK, count - done), dtype=torch.uint8)
    while done < count:
        part = buf[: min(len(buf), count - done)]
        read_into(src_fd, src_offset + done, part)
        pwrite_all(dst_fd, part, dst_offset + done)
        done += len(part)


@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output file, as its header will describe it."""

    name: str
    """Tensor name."""
    dtype: str
    """safetensors dtype string."""
    shape: tuple[int, ...]
    """Tensor shape."""

    @property
    def nbytes(self) -> int:
        return math.ceil(math.prod(self.shape) * DTYPE_SIZES[self.dtype])


def order_for_alignment(entries: Sequence[OutEntry]) -> list[OutEntry]:
    """Stable-sort entries by element size, largest first.

    safetensors offsets are relative to an 8-byte-aligned data start; with wider dtypes first every
    tensor starts on a multiple of its own element size (a tensor's byte length is always a multiple
    of its element size), so zero-copy loaders never see a misaligned fp32 after an odd bf16.
    """
    return sorted(entries, key=lambda e: -DTYPE_SIZES[e.dtype])


def build_header(entries: Sequence[OutEntry], metadata: Mapping[str, str]) -> bytes:
    """The length prefix plus JSON header for ``entries`` laid out contiguously in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """One output safetensors file whose layout was fixed in advance, written by position.

    The header (and hence every tensor's offset) comes from the plan, so tensors -- or row blocks
    of them -- can be written in any order and from several threads (``pwrite``,
    ``copy_file_range`` with explicit offsets). The caller reports each written span through
    :meth:`account`; :meth:`close` refuses a file whose data bytes do not add up, turning any
    plan/producer mismatch into an error instead of a file with holes.
    """

    def __init__(self, path: Path, entries: Sequence[OutEntry], metadata: Mapping[str, str]) -> None:
        self.path = path
        header = build_header(entries, metadata)
        self._offsets: dict[str, int] = {}
        offset = len(header)
        for entry in entries:
            self._offsets[entry.name] = offset
            offset += entry.nbytes
        self.size = offset
        self._expected = offset - len(header)
        self._written = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pwrite_all(self.fd, torch.frombuffer(bytearray(header), dtype=torch.uint8), 0)
            os.ftruncate(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise

    def offset(self, name: str) -> int:
        """Absolute file offset of tensor ``name``'s first data byte."""
        return self._offsets[name]

    def account(self, nbytes: int) -> None:
        self._written += nbytes

    def close(self) -> None:
        try:
            if self._written != self._expected:
                raise ExportFailed(
                    f"internal: {self.path.name} got {self._written} data bytes, its header describes {self._expected}"
                )
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        os.close(self.fd)


class FdCache:
    """Read-only file descriptors, opened once per source file for the duration of an export."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def get(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise InvalidFormat(f"missing file {path.name}", file=str(path)) from None
            self._fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FdCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
