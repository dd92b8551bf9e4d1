# SPDX-License-Identifier: Apache-2.0
"""Scheduler <-> expert cache: the experts the next step is expected to need,
and which experts are resident.

The expert-aware scheduler knows every candidate request's latest route
when it schedules a step; the expert cache needs that future for Belady and
for prefetching the next step's first layer. They run in different
processes under ``vllm serve`` (the engine core and its workers; vLLM's CPU
platform always uses the multi-process executor), and in one process in an
in-process engine. A small memory-mapped file carries the plan either way
(in ``/dev/shm``, or ``VLLM_README_PLAN_DIR``). (Not
``multiprocessing.shared_memory``: its resource tracker, shared by forked
children, unlinks or double-counts blocks a child opens.)

The file is named after the engine, not a process: vLLM's
``vllm_config.instance_id``, which the engine core and every worker hold
(the config is pickled to them; vLLM names its own shared host memory with
it). A process id is not unique across pid namespaces that share
``/dev/shm`` (containers with ``--ipc=host``), and the workers' pids differ
from the scheduler's. The writer publishes its file under that name with
``link()``, which fails when the name exists, so two engines never share
one buffer: the second runs without a plan.

A writer holds a shared ``flock`` on its file for its lifetime; the kernel
drops it when the process ends, however it ends. A starting writer removes
files nobody holds (engines that died without closing), and a reader only
attaches to a held file. The lock is taken before the name is published, so
a starting engine never removes the file of another one starting at the
same time. Files of another user are left alone. Once every reader the
engine starts has the file open (each marks its own byte), the writer
unlinks the name: the mapping lives on in every process that has it, and
nothing is left behind however the engine ends (an engine core killed
before its scheduler shut down included).

Three blocks, each with exactly one writer:

* the plan (scheduler -> cache): a uint64 sequence number, one byte per
  expert;
* residency (cache -> scheduler, once per step): a uint64 sequence number,
  a float64 (the measured milliseconds to load one expert across all
  layers, 0 until measured), one byte per expert (1: every layer's page of
  it is resident). The scheduler's cost model charges a step for the
  experts it would open that are not resident. Under tensor parallelism
  every rank's cache decides the same; tensor-parallel rank 0 writes.
* routes (model -> scheduler, once per forward, with the scheduler's
  ``route_source: "model"``, written by rank 0's model): a uint64 sequence
  number, a uint32 count, then that many int64 KV-cache slots, int32
  positions and uint8 experts: the route the model computed for the last
  token of each sequence it ran, keyed by the slot that token's keys and
  values were written to and its position. A slot names one (request,
  position) within a step, and the scheduler can compute it from its own
  block tables, so no request ids need to cross; the position guards
  against a slot reused by another request since (docs/scheduling.md,
  "Routes ahead").

Each block is a seqlock: the writer bumps its sequence number to odd before
writing and to even after; a reader retries while it is odd or changed, so
it never sees a half-written block.

The plan only orders requests and chooses evictions: when the file cannot
be made (no permission, the name taken, no space, no folder) the scheduler
logs one line and schedules as vLLM does, and the cache runs without a
plan. Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import tempfile
import time
import uuid
import weakref
from pathlib import Path

from vllm_readme import envs

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger tree: its handler and level apply

MAX_EXPERTS = 1024
MAX_ROUTES = 8192  # sequences per forward whose last route is published (more are dropped)
_PLAN = 0  # u64 seq, flags
_RESIDENCY = 8 + MAX_EXPERTS  # u64 seq, f64 load ms, flags
_ROUTES = _RESIDENCY + 16 + MAX_EXPERTS  # u64 seq, u32 count, i64 slots[], i32 positions[], u8 routes[]
_ATTACHED = _ROUTES + 16 + 13 * MAX_ROUTES  # u8 per reader: 1 once it has the file open
MAX_READERS = 256
_SIZE = _ATTACHED + MAX_READERS
_PREFIX = "vllm_readme_plan_"
_DRAFT_GRACE_S = 60.0  # a draft older than this whose writer holds no lock was left by a killed one

# The engine id of writers and readers not given one (benchmarks, tests): one
# per process, inherited by forked children.
PROCESS_ENGINE_ID = f"local-{uuid.uuid4().hex}"

CACHE_READER, ROUTES_READER = 0, 1  # the expert cache (every rank), the route publisher (rank 0)


def reader_slot(role: int, rank: int) -> int:
    return 2 * rank + role


def expected_readers(workers: int, caches: bool, routes: bool) -> list[int]:
    """The readers an engine's workers open: an expert cache on every worker
    (each tensor-parallel rank of each pipeline stage) with an expert pool,
    the route publisher on worker 0 (the first stage, where the router runs)
    with ``route_source: "model"``."""
    slots = [reader_slot(CACHE_READER, rank) for rank in range(workers)] if caches else []
    return slots + ([reader_slot(ROUTES_READER, 0)] if routes else [])


def engine_id_of(vllm_config) -> str:
    """The name an engine's scheduler and workers give its plan file:
    vLLM's ``instance_id``, which every process of the engine holds. Under
    data parallelism each rank is an engine of its own (its scheduler, its
    workers, its cache); vLLM's Ray launcher tells them apart by adding
    ``_dp{rank}`` to the id, its multiprocessing launcher gives them all the
    same one, so the rank is added here when it is not there yet."""
    engine_id = vllm_config.instance_id
    parallel = vllm_config.parallel_config
    if parallel.data_parallel_size > 1 and not engine_id.endswith(f"_dp{parallel.data_parallel_rank}"):
        engine_id = f"{engine_id}_dp{parallel.data_parallel_rank}"
    return engine_id


def plan_folder() -> Path:
    chosen = envs.VLLM_README_PLAN_DIR
    if chosen:
        return Path(chosen)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def plan_path(engine_id: str) -> Path:
    return plan_folder() / f"{_PREFIX}{engine_id.replace('/', '_')}"


def _held(fd: int) -> bool:
    """Whether a live writer holds the file open behind ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def remove_stale_plans() -> None:
    """Remove the files of engines that ended without closing their writer,
    and drafts of writers killed while making theirs (a draft is unlocked
    for an instant after its creation: only old ones are candidates)."""
    try:
        folder = plan_folder()
        young = time.time() - _DRAFT_GRACE_S
        drafts = [path for path in folder.glob(f".{_PREFIX}*") if _modified_before(path, young)]
        paths = [*folder.glob(f"{_PREFIX}*"), *drafts]
    except OSError:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            if not _held(fd):
                path.unlink(missing_ok=True)
        except OSError:  # not ours to remove (another user's, in a sticky folder)
            pass
        finally:
            os.close(fd)


def _modified_before(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime < when
    except OSError:  # gone meanwhile
        return False


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
    """Owned by the scheduler, which writes the plan and reads residency and
    routes; the file is removed when it closes. ``create`` is how an engine
    makes one: it returns None, after one log line, when the file cannot be
    made."""

    def __init__(self, num_experts: int = MAX_EXPERTS, engine_id: str = PROCESS_ENGINE_ID, readers=()):
        """``readers``: the slots (``expected_readers``) whose opening ends
        the name's use; none: the name stays until ``close``."""
        remove_stale_plans()
        self.path = plan_path(engine_id)
        # Made under a name no cleaner looks at, locked, sized, then published
        # under the engine's name (link() refuses a name that exists).
        draft = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # Pages allocated now: a full tmpfs fails here, not with SIGBUS at
            # a later write through the mapping.
            os.posix_fallocate(fd, 0, _SIZE)
            buf = mmap.mmap(fd, _SIZE)
            try:
                os.link(draft, self.path)
            except BaseException:
                buf.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        finally:
            draft.unlink(missing_ok=True)
        self.buf = buf
        # Removed on close(), and also when the writer is collected or the
        # process exits without closing it (an in-process engine torn down
        # without its scheduler's shutdown()).
        self._finalizer = weakref.finalize(self, _remove, self.buf, fd, self.path)
        self.num_experts = num_experts
        self.plan = _Block(_PLAN, with_value=False)
        self.residency_block = _Block(_RESIDENCY, with_value=True)
        self.routes_block = _RoutesBlock(_ROUTES)
        self.routes_seen = 0
        self.awaited_readers = sorted({slot for slot in readers if 0 <= slot < MAX_READERS}) or None

    @classmethod
    def create(cls, num_experts: int, engine_id: str, readers=()) -> PlanWriter | None:
        try:
            return cls(num_experts, engine_id, readers)
        except OSError as error:
            why = "another file has its name" if error.errno == errno.EEXIST else error.strerror or str(error)
            logger.warning(
                "Read-ME: cannot create the plan file %s (%s); the expert-aware scheduler schedules as vLLM does "
                "and the expert cache runs without its plan. Set VLLM_README_PLAN_DIR to a folder this user can "
                "write to (and remove stale vllm_readme_plan_* files) to restore them.",
                plan_path(engine_id),
                why,
            )
            return None

    def publish(self, experts) -> None:
        self.plan.write(self.buf, experts)
        if self.awaited_readers is not None:
            self._unlink_once_opened()

    def _unlink_once_opened(self) -> None:
        if all(self.buf[_ATTACHED + slot] for slot in self.awaited_readers):
            self.path.unlink(missing_ok=True)
            self.awaited_readers = None

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


def _remove(buf: mmap.mmap, fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)  # before the lock goes with the descriptor
    buf.close()
    os.close(fd)


class PlanReader:
    """Opened in the worker: by the expert cache, which reads the plan and
    writes residency, and by the model's route publisher, which writes the
    routes; ``read()`` is None until a plan exists. Only the first
    tensor-parallel rank's readers write their blocks (every rank computes
    the same), so each block has one writer.

    ``role`` and ``rank`` (the tensor-parallel rank) name this reader's
    byte, which tells the writer it has opened the file."""

    def __init__(self, num_experts: int, engine_id: str = PROCESS_ENGINE_ID, rank: int = 0, role: int = CACHE_READER):
        self.num_experts = num_experts
        self.engine_id = engine_id
        self.writes = rank == 0
        self.slot = reader_slot(role, rank)
        self.buf = None
        self.unusable = False  # the engine's name holds no live writer's file: stop looking
        self.last_seq = 0
        self.plan = _Block(_PLAN, with_value=False)
        self.residency = _Block(_RESIDENCY, with_value=True)
        self.routes = _RoutesBlock(_ROUTES)

    def _open(self) -> bool:
        if self.unusable:
            return False
        path = plan_path(self.engine_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # not created yet, or no expert-aware scheduler
        except OSError as error:
            # The writer failed on the same folder or name and logged why.
            logger.debug("Read-ME: no plan file (%s: %s)", path, error)
            self.unusable = True
            return False
        try:
            if not _held(fd):
                # A dead engine's file under this engine's name: this engine's
                # writer could not create its own (it logged why).
                self.unusable = True
                return False
            self.buf = mmap.mmap(fd, _SIZE)
            if self.slot < MAX_READERS:
                self.buf[_ATTACHED + self.slot] = 1
        except (OSError, ValueError):  # shorter than this layout: not a writer's of this version
            self.unusable = True
            return False
        finally:
            os.close(fd)
        return True

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
        if self.buf is not None and self.writes:
            self.residency.write(self.buf, experts, load_ms)

    def attach(self) -> bool:
        """Whether the scheduler's file is open (opening it if it now exists)."""
        return self.buf is not None or self._open()

    def publish_routes(self, slots: bytes, positions: bytes, routes: bytes) -> bool:
        """The model's routes of the step it just ran (see the module doc);
        False while the scheduler's file does not exist (yet), and on a
        reader that does not write."""
        if not self.writes or not self.attach():
            return False
        self.routes.write(self.buf, slots, positions, routes)
        return True

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
            self.buf = None
