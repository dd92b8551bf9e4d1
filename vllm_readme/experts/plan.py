"""Scheduler -> expert cache: the experts the next step is expected to need.

The expert-aware scheduler knows every candidate request's latest route
when it schedules a step; the expert cache needs that future for Belady and
for prefetching the next step's first layer. They run in different
processes under ``vllm serve`` (the engine core and its worker; vLLM's CPU
platform always uses the multi-process executor), and in one process in an
in-process engine. A small memory-mapped file in ``/dev/shm`` carries the
plan either way: the scheduler creates it under a name derived from its
process id, the cache opens it by its own or its parent's process id.
(Not ``multiprocessing.shared_memory``: its resource tracker, shared by
forked children, unlinks or double-counts blocks a child opens.)

Layout: a uint64 sequence number, then one byte per expert. The writer
bumps the sequence number to odd before writing and to even after; a
reader retries while it is odd or changed (a seqlock), so it never sees a
half-written plan. Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

MAX_EXPERTS = 1024
_HEADER = 8
_SIZE = _HEADER + MAX_EXPERTS


def plan_path(pid: int) -> Path:
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return folder / f"vllm_readme_plan_{pid}"


class PlanWriter:
    """Owned by the scheduler; the file is removed when it closes."""

    def __init__(self, pid: int | None = None):
        self.path = plan_path(os.getpid() if pid is None else pid)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # a stale file of our pid: reset
        try:
            os.ftruncate(fd, _SIZE)
            self.buf = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self.seq = 0

    def publish(self, experts) -> None:
        self.seq += 1
        struct.pack_into("<Q", self.buf, 0, 2 * self.seq - 1)  # odd: writing
        flags = bytearray(MAX_EXPERTS)
        for expert in experts:
            if 0 <= expert < MAX_EXPERTS:
                flags[expert] = 1
        self.buf[_HEADER:_SIZE] = bytes(flags)
        struct.pack_into("<Q", self.buf, 0, 2 * self.seq)

    def close(self) -> None:
        self.buf.close()
        self.path.unlink(missing_ok=True)


class PlanReader:
    """Opened by the expert cache; ``read()`` is None until a plan exists."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.buf = None
        self.last_seq = 0

    def _open(self) -> bool:
        for pid in (os.getpid(), os.getppid()):
            try:
                fd = os.open(plan_path(pid), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                self.buf = mmap.mmap(fd, _SIZE, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            return True
        return False

    def read(self) -> frozenset[int] | None:
        if self.buf is None and not self._open():
            return None
        buf = self.buf
        for _ in range(100):
            (before,) = struct.unpack_from("<Q", buf, 0)
            if before == 0:
                return None
            if before % 2:
                continue
            flags = bytes(buf[_HEADER : _HEADER + self.num_experts])
            (after,) = struct.unpack_from("<Q", buf, 0)
            if after == before:
                self.last_seq = before // 2
                return frozenset(i for i, flag in enumerate(flags) if flag)
        return None

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
