"""Scheduler <-> expert cache: the experts the next step is expected to need,
and which experts are resident.

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

Three blocks, each written by one side and read by the other:

* the plan (scheduler -> cache): a uint64 sequence number, one byte per
  expert;
* residency (cache -> scheduler, once per step): a uint64 sequence number,
  a float64 (the measured milliseconds to load one expert across all
  layers, 0 until measured), one byte per expert (1: every layer's page of
  it is resident). The scheduler's cost model charges a step for the
  experts it would open that are not resident.
* routes (model -> scheduler, once per forward, with the scheduler's
  ``route_source: "model"``): a uint64 sequence number, a uint32 count, then
  that many int64 KV-cache slots, int32 positions and uint8 experts: the
  route the model computed for the last token of each sequence it ran,
  keyed by the slot that token's keys and values were written to and its
  position. A slot names one (request, position) within a step, and the
  scheduler can compute it from its own block tables, so no request ids
  need to cross; the position guards against a slot reused by another
  request since (docs/scheduling.md, "Routes ahead").

Then the writer's process start time: a reader ignores a file whose
owner is gone (an engine that died without removing it, its pid reused
since), and a new writer removes such files.

Each block is a seqlock: the writer bumps its sequence number to odd before
writing and to even after; a reader retries while it is odd or changed, so
it never sees a half-written block. Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import weakref
from pathlib import Path

MAX_EXPERTS = 1024
MAX_ROUTES = 8192  # sequences per forward whose last route is published (more are dropped)
_PLAN = 0  # u64 seq, flags
_RESIDENCY = 8 + MAX_EXPERTS  # u64 seq, f64 load ms, flags
_ROUTES = _RESIDENCY + 16 + MAX_EXPERTS  # u64 seq, u32 count, i64 slots[], i32 positions[], u8 routes[]
_OWNER = _ROUTES + 16 + 13 * MAX_ROUTES  # u64: the writer process's start time
_SIZE = _OWNER + 8


def plan_path(pid: int) -> Path:
    return _folder() / f"vllm_readme_plan_{pid}"


def _folder() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which
    tells a live writer from a later process that reused a dead one's pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, started: int) -> bool:
    return started != 0 and process_start_time(pid) == started


def remove_stale_plans() -> None:
    """Files left by engines that died without closing their writer."""
    for path in _folder().glob("vllm_readme_plan_*"):
        try:
            pid = int(path.name.rsplit("_", 1)[1])
            with open(path, "rb") as f:
                f.seek(_OWNER)
                raw = f.read(8)
            started = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            if not _owner_alive(pid, started):
                path.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue


class _Seqlock:
    """A block of a shared buffer behind a uint64 sequence number: odd while
    its writer writes, even after; a reader retries until it reads the same
    even number before and after."""

    def __init__(self, offset: int):
        self.offset = offset
        self.seq = 0

    def _write(self, buf, fill) -> None:
        self.seq += 1
        struct.pack_into("<Q", buf, self.offset, 2 * self.seq - 1)  # odd: writing
        fill()
        struct.pack_into("<Q", buf, self.offset, 2 * self.seq)

    def _read(self, buf, fetch, since: int = 0):
        """(sequence number, ``fetch()``) once a write newer than ``since`` is
        complete, or None when there is none."""
        for _ in range(100):
            (before,) = struct.unpack_from("<Q", buf, self.offset)
            if before // 2 <= since:
                return None
            if before % 2:
                continue
            got = fetch()
            (after,) = struct.unpack_from("<Q", buf, self.offset)
            if after == before:
                return before // 2, got
        return None


class _Block(_Seqlock):
    """A sequence number, an optional float, one byte per expert."""

    def __init__(self, offset: int, with_value: bool):
        super().__init__(offset)
        self.flags_at = offset + (16 if with_value else 8)

    def write(self, buf, experts, value: float | None = None) -> None:
        flags = bytearray(MAX_EXPERTS)
        for expert in experts:
            if 0 <= expert < MAX_EXPERTS:
                flags[expert] = 1

        def fill():
            if value is not None:
                struct.pack_into("<d", buf, self.offset + 8, value)
            buf[self.flags_at : self.flags_at + MAX_EXPERTS] = bytes(flags)

        self._write(buf, fill)

    def read(self, buf, num_experts: int) -> tuple[int, frozenset[int], float] | None:
        """(sequence number, experts, value), or None when nothing was written."""

        def fetch():
            (value,) = struct.unpack_from("<d", buf, self.offset + 8)
            return value, bytes(buf[self.flags_at : self.flags_at + num_experts])

        read = self._read(buf, fetch)
        if read is None:
            return None
        seq, (value, flags) = read
        return seq, frozenset(i for i, flag in enumerate(flags) if flag), value


class _RoutesBlock(_Seqlock):
    """The routes block: (slot, position, expert) triples."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.slots_at = offset + 16
        self.positions_at = self.slots_at + 8 * MAX_ROUTES
        self.routes_at = self.positions_at + 4 * MAX_ROUTES

    def write(self, buf, slots: bytes, positions: bytes, routes: bytes) -> None:
        """``slots``: little-endian int64s; ``positions``: int32s; ``routes``:
        one byte each."""
        count = min(len(routes), len(slots) // 8, len(positions) // 4, MAX_ROUTES)

        def fill():
            struct.pack_into("<I", buf, self.offset + 8, count)
            buf[self.slots_at : self.slots_at + 8 * count] = slots[: 8 * count]
            buf[self.positions_at : self.positions_at + 4 * count] = positions[: 4 * count]
            buf[self.routes_at : self.routes_at + count] = routes[:count]

        self._write(buf, fill)

    def read(self, buf, since: int) -> tuple[int, tuple[int, ...], tuple[int, ...], bytes] | None:
        """(sequence number, slots, positions, routes) when newer than
        ``since``, else None."""

        def fetch():
            (count,) = struct.unpack_from("<I", buf, self.offset + 8)
            count = min(count, MAX_ROUTES)
            return (
                struct.unpack_from(f"<{count}q", buf, self.slots_at),
                struct.unpack_from(f"<{count}i", buf, self.positions_at),
                bytes(buf[self.routes_at : self.routes_at + count]),
            )

        read = self._read(buf, fetch, since)
        return None if read is None else (read[0], *read[1])


class PlanWriter:
    """Owned by the scheduler, which writes the plan and reads residency;
    the file is removed when it closes."""

    def __init__(self, num_experts: int = MAX_EXPERTS):
        remove_stale_plans()
        pid = os.getpid()
        self.path = plan_path(pid)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # a stale file of our pid: reset
        try:
            os.ftruncate(fd, _SIZE)
            self.buf = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        struct.pack_into("<Q", self.buf, _OWNER, process_start_time(pid) or 0)
        # Removed on close(), and also when the writer is collected or the
        # process exits without closing it (an in-process engine torn down
        # without its scheduler's shutdown()).
        self._finalizer = weakref.finalize(self, _remove, self.buf, self.path)
        self.num_experts = num_experts
        self.plan = _Block(_PLAN, with_value=False)
        self.residency_block = _Block(_RESIDENCY, with_value=True)
        self.routes_block = _RoutesBlock(_ROUTES)
        self.routes_seen = 0

    def publish(self, experts) -> None:
        self.plan.write(self.buf, experts)

    def residency(self) -> tuple[frozenset[int], float] | None:
        """The cache's latest (resident experts, ms to load one expert), or
        None before its first step."""
        read = self.residency_block.read(self.buf, self.num_experts)
        return None if read is None else (read[1], read[2])

    def model_routes(self) -> tuple[tuple[int, ...], tuple[int, ...], bytes] | None:
        """The model's routes published since the last call: (KV slots,
        positions, experts), or None when nothing new arrived."""
        read = self.routes_block.read(self.buf, self.routes_seen)
        if read is None:
            return None
        self.routes_seen = read[0]
        return read[1:]

    def close(self) -> None:
        self._finalizer()


def _remove(buf: mmap.mmap, path: Path) -> None:
    buf.close()
    path.unlink(missing_ok=True)


class PlanReader:
    """Opened in the worker: by the expert cache, which reads the plan and
    writes residency, and by the model's route publisher, which writes the
    routes; ``read()`` is None until a plan exists."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.buf = None
        self.last_seq = 0
        self.plan = _Block(_PLAN, with_value=False)
        self.residency = _Block(_RESIDENCY, with_value=True)
        self.routes = _RoutesBlock(_ROUTES)

    def _open(self) -> bool:
        for pid in (os.getpid(), os.getppid()):
            try:
                fd = os.open(plan_path(pid), os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                buf = mmap.mmap(fd, _SIZE)
            except ValueError:  # shorter than this layout: another version's, or stale
                continue
            finally:
                os.close(fd)
            if not _owner_alive(pid, struct.unpack_from("<Q", buf, _OWNER)[0]):
                buf.close()  # a dead engine's file under a pid reused since
                continue
            self.buf = buf
            return True
        return False

    def read(self) -> frozenset[int] | None:
        if not self.attach():
            return None
        read = self.plan.read(self.buf, self.num_experts)
        if read is None:
            return None
        self.last_seq = read[0]
        return read[1]

    def publish_residency(self, experts, load_ms: float) -> None:
        """No-op until ``read()`` has found the scheduler's file (none without
        an expert-aware scheduler): the cache reads before it publishes in
        every step, so trying to open it here too would only repeat failed
        opens on the hot path."""
        if self.buf is not None:
            self.residency.write(self.buf, experts, load_ms)

    def attach(self) -> bool:
        """Whether the scheduler's file is open (opening it if it now exists)."""
        return self.buf is not None or self._open()

    def publish_routes(self, slots: bytes, positions: bytes, routes: bytes) -> bool:
        """The model's routes of the step it just ran (see the module doc);
        False while the scheduler's file does not exist (yet)."""
        if not self.attach():
            return False
        self.routes.write(self.buf, slots, positions, routes)
        return True

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
