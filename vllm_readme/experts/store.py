# SPDX-License-Identifier: Apache-2.0
"""Where experts that are not in the pool live (docs/expert_cache.md).

* ``PageFileStore`` (``backing_store: disk``, the default on CPU): every page
  in the kernel's layout in one file written at start-up, page by page from
  the checkpoint (the model then never holds every expert), or from the
  weights vLLM loaded; a load is one ``O_DIRECT`` read, straight into the
  pool's slot where the page is a whole number of blocks (``read_into``),
  else into a buffer and a copy.
* ``DiskExpertStore`` (``backing_store: checkpoint``): the checkpoint's own
  safetensors files, read one page
  (the gate, up and down rows of one expert of one layer) at a time with the
  page cache bypassed (``O_DIRECT``), so the process's resident experts
  really are the pool. A file system that refuses O_DIRECT (tmpfs) is read
  normally and its pages dropped after each read (``POSIX_FADV_DONTNEED``);
  the log says which.
* ``MemoryExpertStore``: every page kept in host memory, already in the
  kernel's layout (on a GPU: pinned, so copies run on a copy stream).

Both hand out one page as the three checkpoint projections; packing them
into the kernel's layout is kernels.py's (``pack_expert_page``).

Every file a store reads is opened once, at start-up, and read through that
descriptor: a file renamed over or deleted while serving is still the one
the engine opened; one rewritten in place (its size or mtime changed) is
refused (``StoreFileChanged``) rather than read at offsets of the old one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_readme.configuration_readme import ReadMEConfigError
from vllm_readme.options import WHERE

logger = logging.getLogger(f"vllm.{__name__}")

_ALIGN = 4096  # O_DIRECT: offsets, sizes and buffers aligned to the logical block (4 KiB covers common disks)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_RAM_FILE_SYSTEMS = ("tmpfs", "ramfs")


class StoreFileChanged(OSError):
    """A file a store reads changed in place since the engine opened it: its
    bytes are no longer the weights the engine loaded."""


@dataclass(frozen=True)
class FileIdentity:
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileIdentity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def safetensors_index(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors files, from their headers
    (8-byte little-endian length, then JSON; offsets after the header)."""
    index: dict[str, StoredTensor] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ReadMEConfigError(f"{folder}: no .safetensors file; the disk expert store reads experts from one.")
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if meta["dtype"] not in _DTYPES:
                continue  # never an expert weight of ours
            index[name] = StoredTensor(
                path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + length + begin, end - begin
            )
    return index


class DirectReader:
    """Reads byte ranges with O_DIRECT into an aligned buffer (one per
    thread: the prefetch thread and the model's thread read at once).

    Each file is opened once (``open``, at start-up) and its identity
    recorded; every read checks that the open file still has that size and
    mtime, and notes (once) when its path names another file now (unless
    opened with ``watch_name=False``: a file whose name its owner removes)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self.opened: dict[Path, FileIdentity] = {}
        self._unwatched_names: set[Path] = set()  # gone on purpose, or already reported
        self._lock = threading.Lock()
        self._local = threading.local()
        self.direct = True

    def open(self, path: Path, watch_name: bool = True) -> int:
        with self._lock:
            if not watch_name:
                self._unwatched_names.add(path)
            if path not in self._fds:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                    self.direct = self.direct and hasattr(os, "O_DIRECT")
                except OSError:  # e.g. tmpfs: EINVAL
                    fd = os.open(path, os.O_RDONLY)
                    self.direct = False
                self._fds[path] = fd
                self.opened[path] = FileIdentity.of(os.fstat(fd))
            return self._fds[path]

    def checked_fd(self, path: Path) -> int:
        """The open descriptor of ``path``, after checking that the file is
        still the one opened (StoreFileChanged if it was rewritten)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self.open(path)
        opened, now = self.opened[path], FileIdentity.of(os.fstat(fd))
        if (now.size, now.mtime_ns) != (opened.size, opened.mtime_ns):
            raise StoreFileChanged(
                f"{path} was rewritten in place while the engine served from it (size {opened.size} -> {now.size} "
                f"bytes, mtime changed: {opened.mtime_ns != now.mtime_ns}); its offsets no longer hold the weights "
                "the engine loaded. Restart the engine after changing a checkpoint, and replace files by writing a "
                "new one and renaming it over the old (an engine keeps reading the file it opened)."
            )
        if path not in self._unwatched_names:
            try:
                moved = FileIdentity.of(os.stat(path)).inode != opened.inode
            except FileNotFoundError:
                moved = True
            if moved:
                self._unwatched_names.add(path)
                logger.warning(
                    "expert cache: %s was replaced or deleted while serving; the engine keeps reading the file it "
                    "opened at start-up (the weights it loaded) until it restarts",
                    path,
                )
        return fd

    def read(self, path: Path, offset: int, nbytes: int) -> memoryview:
        fd = self.checked_fd(path)
        start = offset - offset % _ALIGN
        end = -(-(offset + nbytes) // _ALIGN) * _ALIGN
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < end - start:
            buf = self._local.buf = mmap.mmap(-1, end - start)  # page-aligned
        view = memoryview(buf)[: end - start]
        got = os.preadv(fd, [view], start)
        if got < offset + nbytes - start:
            raise OSError(f"{path}: short read at {offset} ({got} of {end - start} bytes)")
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        return view[offset - start : offset - start + nbytes]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        self.close()


class DiskExpertStore:
    """Pages read from the checkpoint: ``model.layers.{i}.mlp.experts.
    {gate,up,down}_proj``, stacked ``[E, ...]`` (README, "Checkpoint
    format"), sliced to this tensor-parallel rank's channels. Under pipeline
    parallelism a stage's pages are its own layers': page layer ``j`` is the
    checkpoint's layer ``first_layer + j``."""

    kind = "checkpoint"

    def __init__(
        self,
        folder: Path,
        num_layers: int,
        num_experts: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        first_layer: int = 0,
    ):
        index = safetensors_index(folder)
        self.tensors: dict[tuple[int, str], StoredTensor] = {}
        for layer in range(num_layers):
            for projection in PROJECTIONS:
                name = f"model.layers.{first_layer + layer}.mlp.experts.{projection}"
                if name not in index:
                    raise ReadMEConfigError(f"{folder}: {name} is not in the checkpoint; the expert store needs it.")
                stored = index[name]
                if stored.shape[0] != num_experts:
                    raise ReadMEConfigError(f"{folder}: {name} holds {stored.shape[0]} experts, config {num_experts}.")
                self.tensors[layer, projection] = stored
        self.reader = DirectReader()
        for path in sorted({stored.path for stored in self.tensors.values()}):
            self.reader.open(path)  # now: a later rename over it or deletion does not change what is read
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.bytes_read = 0

    @property
    def direct(self) -> bool:
        return self.reader.direct

    def page_nbytes(self) -> int:
        return sum(self.tensors[0, p].nbytes // self.tensors[0, p].shape[0] for p in PROJECTIONS)

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) of this rank."""
        out = []
        for projection in PROJECTIONS:
            stored = self.tensors[layer, projection]
            per_expert = stored.nbytes // stored.shape[0]
            raw = self.reader.read(stored.path, stored.offset + expert * per_expert, per_expert)
            self.bytes_read += per_expert
            tensor = torch.frombuffer(raw, dtype=stored.dtype).reshape(stored.shape[1:]).clone()
            out.append(tensor)
        gate, up, down = out
        if self.tp_size > 1:
            rows = gate.shape[0] // self.tp_size
            part = slice(self.tp_rank * rows, (self.tp_rank + 1) * rows)
            gate, up, down = gate[part], up[part], down[:, part].contiguous()
        return gate, up, down

    def close(self) -> None:
        self.reader.close()


class MemoryExpertStore:
    """Every page kept in host memory in the kernel's layout: ``w13 [L, E,
    ...]``, ``w2 [L, E, ...]`` (pinned on a GPU)."""

    kind = "memory"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.bytes_read = 0

    def packed(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.bytes_read += self.w13[layer, expert].nbytes + self.w2[layer, expert].nbytes
        return self.w13[layer, expert], self.w2[layer, expert]

    def close(self) -> None:
        pass


class PageFileStore:
    """Every page already in the kernel's layout and dtype, one aligned
    record per page in a file written at start-up from the weights vLLM
    loaded (so it always matches them): a load is one ``O_DIRECT`` read and
    a copy, with no conversion or packing (docs/expert_cache.md, "Files").

    The file lives in ``folder`` (``page_dir``; by default
    ``default_page_dir()``) under a name that marks it partial
    (``expert-pages-<pid>-*.partial``) while it is written. Its writer opens
    it for reading and takes a shared ``flock`` on it before the first byte
    is written, and unlinks it once written or on any failure: a finished
    page file has no name, so it disappears with the engine however the
    engine ends. Only a writer killed mid-write leaves its partial file; the
    kernel drops a dead process's lock, and the next start in that folder
    removes every partial file nobody holds (a lock, unlike a pid, also
    tells apart engines in containers that share the folder)."""

    kind = "disk"

    def __init__(
        self,
        page: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        num_layers: int,
        num_experts: int,
        folder: Path | str | None = None,
    ):
        """``page(layer, expert)``: that page's ``(w13, w2)`` in the kernel's
        layout (``from_layers`` for weights already in memory; the expert
        cache passes pages read and packed from the checkpoint when the
        model never held them all). Written one page at a time."""
        self.folder = Path(folder).expanduser() if folder else default_page_dir()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReadMEConfigError(
                f"expert cache: cannot create the page-file folder {self.folder} ({exc}). Choose a writable folder on "
                f'disk with {WHERE}.page_dir (or VLLM_README_PAGE_DIR), or use "backing_store": "checkpoint" '
                "(no page file)."
            ) from exc
        remove_leftover_page_files(self.folder)
        self.num_experts = num_experts
        w13, w2 = page(0, 0)
        self.w13_shape, self.w2_shape = tuple(w13.shape), tuple(w2.shape)
        self.dtype = w13.dtype
        self.w13_nbytes, self.w2_nbytes = w13.nbytes, w2.nbytes
        self.record = -(-(self.w13_nbytes + self.w2_nbytes) // _ALIGN) * _ALIGN
        self.nbytes = self.record * num_layers * num_experts
        self.file_system = file_system_type(self.folder)
        _check_free_space(self.folder, self.nbytes)
        logger.info(
            "expert cache: writing the page file (%.1f MiB) in %s (%s)",
            self.nbytes / 2**20,
            self.folder,
            self.file_system or "file system unknown",
        )
        if self.file_system in _RAM_FILE_SYSTEMS:
            logger.warning(
                "expert cache: the page-file folder %s is on %s, i.e. in memory: the whole expert set (%.1f MiB) "
                'sits in RAM next to the pool. Give a folder on disk with %s.page_dir, or "backing_store": '
                '"checkpoint" to read the checkpoint instead.',
                self.folder,
                self.file_system,
                self.nbytes / 2**20,
                WHERE,
            )
        # Created under a name the cleaners of other engines pass over while
        # it is young, locked, then given its .partial name: a .partial file
        # is always held by its writer while the writer lives.
        fd, name = tempfile.mkstemp(prefix=f"expert-pages-{os.getpid()}-", suffix=_CREATING, dir=self.folder)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.path = Path(name[: -len(_CREATING)] + ".partial")
        os.rename(name, self.path)
        self.reader = DirectReader()
        try:
            # Held first: whatever happens to the name from now on, the
            # engine reads the file it wrote.
            fcntl.flock(self.reader.open(self.path, watch_name=False), fcntl.LOCK_SH)
            with os.fdopen(fd, "wb") as f:
                pad = bytes(self.record - self.w13_nbytes - self.w2_nbytes)
                for layer in range(num_layers):
                    for expert in range(num_experts):
                        if (layer, expert) != (0, 0):
                            w13, w2 = page(layer, expert)
                        f.write(_raw_bytes(w13))
                        f.write(_raw_bytes(w2))
                        f.write(pad)
                f.flush()
                os.fsync(f.fileno())
                if hasattr(os, "posix_fadvise"):  # the reads bypass the page cache: do not keep a copy there
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self.reader.opened[self.path] = FileIdentity.of(os.fstat(self.reader.open(self.path)))
        except OSError as exc:
            self.reader.close()
            raise ReadMEConfigError(
                f"expert cache: writing the page file ({self.nbytes} bytes) in {self.folder} failed: {exc}. Free "
                f"space there, choose another folder on disk with {WHERE}.page_dir (or VLLM_README_PAGE_DIR), or use "
                '"backing_store": "checkpoint" (no page file).'
            ) from exc
        finally:
            self.path.unlink(missing_ok=True)  # written (and open) or failed: the name goes either way
        self.bytes_read = 0

    @property
    def direct(self) -> bool:
        return self.reader.direct

    @classmethod
    def from_layers(
        cls, w13_layers: list[torch.Tensor], w2_layers: list[torch.Tensor], folder: Path | None = None
    ) -> PageFileStore:
        """From every layer's ``[E, ...]`` weights, as vLLM loaded them."""
        return cls(
            lambda layer, expert: (w13_layers[layer][expert], w2_layers[layer][expert]),
            len(w13_layers),
            w13_layers[0].shape[0],
            folder,
        )

    def reads_into(self, w13_slot: torch.Tensor, w2_slot: torch.Tensor) -> bool:
        """Whether a page can be read straight into slots like these: one
        record is exactly the two parts, each a whole number of aligned
        blocks, and the slots start on block boundaries (O_DIRECT)."""
        parts = (self.w13_nbytes, self.w2_nbytes)
        return (
            self.record == sum(parts)
            and all(n % _ALIGN == 0 for n in parts)
            and (w13_slot.nbytes, w2_slot.nbytes) == parts
            and all(t.is_contiguous() and t.data_ptr() % _ALIGN == 0 for t in (w13_slot, w2_slot))
        )

    def read_into(self, layer: int, expert: int, buffers: tuple[memoryview, memoryview]) -> None:
        """One page read into ``buffers`` (its w13 and w2 slot memory; see
        reads_into) with one ``preadv``."""
        offset = (layer * self.num_experts + expert) * self.record
        fd = self.reader.checked_fd(self.path)
        got = os.preadv(fd, buffers, offset)
        if got != self.record:
            raise OSError(f"{self.path}: short read of page ({layer}, {expert}): {got} of {self.record} bytes")
        if not self.reader.direct and hasattr(os, "posix_fadvise"):  # no O_DIRECT here: drop the cached copy
            os.posix_fadvise(fd, offset, self.record, os.POSIX_FADV_DONTNEED)
        self.bytes_read += self.record

    def packed(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views into this thread's read buffer: copy them before the next read."""
        raw = self.reader.read(self.path, (layer * self.num_experts + expert) * self.record, self.record)
        self.bytes_read += self.record
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        w13 = flat[: self.w13_nbytes].view(self.dtype).view(self.w13_shape)
        w2 = flat[self.w13_nbytes : self.w13_nbytes + self.w2_nbytes].view(self.dtype).view(self.w2_shape)
        return w13, w2

    def close(self) -> None:
        self.reader.close()


_CREATING = ".creating"  # a page file's name from creation until its writer holds it
_CREATING_GRACE_S = 60.0


def default_page_dir() -> Path:
    """``$XDG_CACHE_HOME/vllm_readme`` (``~/.cache/vllm_readme``): a
    user's cache on disk, where O_DIRECT works, unlike the temp folder,
    which is often tmpfs (memory)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm_readme"


def remove_leftover_page_files(folder: Path) -> list[Path]:
    """Partial page files in ``folder`` that no process holds (their writer
    was killed mid-write), removed; a live writer's file is left alone.
    Returns what was removed."""
    removed = []
    young = time.time() - _CREATING_GRACE_S
    for path in [*Path(folder).glob("expert-pages-*.partial"), *Path(folder).glob(f"expert-pages-*{_CREATING}")]:
        try:
            if path.suffix == _CREATING and path.stat().st_mtime > young:
                continue  # an engine may be between creating and locking it
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only while no writer holds it
            path.unlink()
        except OSError:  # held by a live writer, gone meanwhile, or not ours to remove
            continue
        finally:
            os.close(fd)
        removed.append(path)
        logger.info("expert cache: removed %s, left by an engine that stopped while writing it", path)
    return removed


def file_system_type(folder: Path) -> str | None:
    """The type of the file system holding ``folder`` (``/proc/mounts``,
    the longest mount point above it); None where that cannot be read."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(folder)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _check_free_space(folder: Path, nbytes: int) -> None:
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes:
        raise ReadMEConfigError(
            f"expert cache: the page file needs {nbytes} bytes ({nbytes / 2**30:.2f} GiB) in {folder}, which has "
            f"{free} bytes free. Free space there, choose another folder with {WHERE}.page_dir (or "
            'VLLM_README_PAGE_DIR), or use "backing_store": "checkpoint" (no page file).'
        )


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()
