# SPDX-License-Identifier: Apache-2.0
"""Reading expert pages into the expert cache's slots (paper §4.3;
docs/expert_cache.md): the pool's memory, the backing store and the second
source of a page the store fails to read, loads on demand and on the
prefetch thread.

The pool is ``w13 [P, 2Ip, H]`` and ``w2 [P, H, Ip]`` in the CPU grouped
GEMM's layout, allocated once. On a CPU it lies in page-aligned memory, so a
read from the page file lands straight in its slot. On a GPU the pages come
from pinned host memory, copied asynchronously on a copy stream that first
waits for the kernels that may read the slot's old page.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from vllm_readme.configuration_readme import ReadMEConfigError
from vllm_readme.experts.store import DiskExpertStore, MemoryExpertStore, PageFileStore, StoreFileChanged
from vllm_readme.options import WHERE, ExpertCacheOptions

# Under vLLM's "vllm" logger, so its handlers and level apply.
logger = logging.getLogger(f"vllm.{__name__}")


class ExpertPageUnreadable(RuntimeError):
    """A page that no source could read as it was at start-up. Raised in the
    model's forward, where vLLM's engine core treats any exception as fatal:
    the engine stops with this message instead of computing with other
    weights (docs/expert_cache.md, "I/O faults while serving")."""


class ExpertLoader:
    def __init__(
        self,
        *,
        w13_layers: list[torch.Tensor],
        w2_layers: list[torch.Tensor],
        pages: int,
        num_experts: int,
        first_layer: int,
        options: ExpertCacheOptions,
        checkpoint: Path,
        isa: str,
        tp_rank: int,
        tp_size: int,
        store: MemoryExpertStore | PageFileStore | DiskExpertStore | None,
        timed_load: Callable[[float], None],
    ):
        """A pool of ``pages`` slots shaped as one page of ``w13_layers`` and
        ``w2_layers``; ``store`` as ExpertCache takes it. ``timed_load``
        receives the seconds of each timed page load."""
        self.num_layers = len(w13_layers)
        self.num_experts = num_experts
        self.first_layer = first_layer
        self.streamed = w13_layers[0].shape[0] < num_experts
        self.isa = isa
        self.options = options
        self.timed_load = timed_load
        device, dtype = w13_layers[0].device, w13_layers[0].dtype
        self.w13 = _pool_tensor((pages, *w13_layers[0].shape[1:]), dtype, device)
        self.w2 = _pool_tensor((pages, *w2_layers[0].shape[1:]), dtype, device)
        # A second source for a page the store fails to read: the checkpoint,
        # where the page file was written from it (_make_store).
        self.fallback: DiskExpertStore | None = None
        self.fallback_loads = 0
        self.store = store or self._make_store(
            options.backing_store, w13_layers, w2_layers, checkpoint, tp_rank, tp_size
        )
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # With the page file and a pool in page-aligned host memory, a load
        # reads straight into its slot (no bounce buffer, no copy, little
        # Python on the loader thread; measured in docs/expert_cache.md).
        self.slot_buffers = None
        if isinstance(self.store, PageFileStore) and self.store.reads_into(self.w13[0], self.w2[0]):
            self.slot_buffers = [
                (_writable_view(self.w13[slot]), _writable_view(self.w2[slot])) for slot in range(pages)
            ]
        # Threads start with the first job.
        self.executor = (
            ThreadPoolExecutor(1, thread_name_prefix="readme-prefetch", initializer=_loader_thread_start)
            if options.prefetch
            else None
        )
        self.inflight: dict[tuple[int, int], Future] = {}

    # ------------------------------------------------------------ start-up
    def _make_store(self, kind: str, w13_layers, w2_layers, checkpoint: Path, tp_rank: int, tp_size: int):
        device = w13_layers[0].device
        if kind == "auto":
            kind = "memory" if device.type == "cuda" else "disk"
        if kind == "checkpoint":
            if device.type == "cuda":
                raise ReadMEConfigError(
                    'expert cache: backing_store "checkpoint" converts and packs pages for the CPU grouped GEMM; on a '
                    'GPU use "memory" (pinned host memory, the default there) or "disk".'
                )
            store = DiskExpertStore(checkpoint, self.num_layers, self.num_experts, tp_rank, tp_size, self.first_layer)
            self._check_layout(store, w13_layers, w2_layers)
            return store
        if kind == "disk":
            if not self.streamed:
                return PageFileStore.from_layers(w13_layers, w2_layers, self.options.page_dir)
            # Page by page from the checkpoint, packed as the kernel reads it.
            source = DiskExpertStore(checkpoint, self.num_layers, self.num_experts, tp_rank, tp_size, self.first_layer)
            self._check_layout(source, w13_layers, w2_layers)
            started = time.perf_counter()
            try:
                store = PageFileStore(
                    lambda layer, expert: self.read_packed((layer, expert), source),
                    self.num_layers,
                    self.num_experts,
                    self.options.page_dir,
                )
            except BaseException:
                source.close()
                raise
            # Kept open: the checkpoint as it was at start-up is the second
            # source of a page the page file fails to give.
            self.fallback = source
            logger.info(
                "expert cache: wrote %d expert pages from the checkpoint to the page file in %.1f s",
                self.num_layers * self.num_experts,
                time.perf_counter() - started,
            )
            return store
        if self.streamed:
            raise ReadMEConfigError(
                'expert cache: backing_store "memory" keeps every expert in host memory, but this model was loaded '
                'with its experts left on disk; use "disk" or "checkpoint".'
            )
        return memory_store(w13_layers, w2_layers)

    def _check_layout(self, store: DiskExpertStore, w13_layers, w2_layers) -> None:
        """One page read and packed as the store will, against FusedMoE's."""
        w13, w2 = self.read_packed((0, 0), store)
        if not (torch.equal(w13, w13_layers[0][0]) and torch.equal(w2, w2_layers[0][0])):
            raise ReadMEConfigError(
                "expert cache: an expert read from the checkpoint and packed for the CPU grouped GEMM differs from "
                "the one vLLM loaded (this vLLM lays experts out differently). Serve without "
                f'{WHERE}.expert_pool, or use "backing_store": "memory".'
            )

    def describe_store(self) -> str:
        store = self.store.kind
        if isinstance(self.store, PageFileStore):
            store += f" (a {self.store.nbytes / 2**20:.1f} MiB page file in {self.store.folder}, unlinked, " + (
                "O_DIRECT)" if self.store.direct else "page cache dropped)"
            )
        elif isinstance(self.store, DiskExpertStore):
            store += " (safetensors, convert and pack per load, " + (
                "O_DIRECT)" if self.store.direct else "page cache dropped)"
            )
        return store

    # ------------------------------------------------------------ loading
    def read_packed(self, page: tuple[int, int], store=None) -> tuple[torch.Tensor, torch.Tensor]:
        layer, expert = page
        store = store or self.store
        if not isinstance(store, DiskExpertStore):
            return store.packed(layer, expert)
        from vllm_readme.model_executor.kernels import pack_expert_page

        gate, up, down = store.read(layer, expert)
        return pack_expert_page(gate, up, down, self.w13[:1], self.w2[:1], self.isa)

    def write(self, slot: int, w13: torch.Tensor, w2: torch.Tensor, non_blocking: bool = False) -> None:
        self.w13[slot].copy_(w13, non_blocking=non_blocking)
        self.w2[slot].copy_(w2, non_blocking=non_blocking)

    def load(self, page: tuple[int, int], slot: int, non_blocking: bool = False) -> None:
        """``page`` into ``slot`` from the store; a read that fails is tried
        once more (a transient fault may pass), then the page comes from the
        fallback source, if there is one. Never other weights: what no
        source can read raises ExpertPageUnreadable."""
        try:
            self.load_from_store(page, slot, non_blocking)
            return
        except StoreFileChanged as exc:  # read again, the changed file would be refused again
            error = exc
        except OSError:
            try:
                self.load_from_store(page, slot, non_blocking)
                return
            except OSError as exc:
                error = exc
        if self.fallback is None:
            raise ExpertPageUnreadable(
                f"expert cache: page (layer {page[0]}, expert {page[1]}) cannot be read from the {self.store.kind} "
                f"backing store ({error}), and there is no second source. The engine stops rather than compute with "
                'other weights; restart it (with "backing_store": "disk", the page file written at start-up is read, '
                "and the checkpoint is its second source)."
            ) from error
        try:
            w13, w2 = self.read_packed(page, self.fallback)
        except OSError as exc:
            raise ExpertPageUnreadable(
                f"expert cache: page (layer {page[0]}, expert {page[1]}) cannot be read from the page file ({error}) "
                f"nor from the checkpoint ({exc}). The engine stops rather than compute with other weights; check "
                "the disk and restart it."
            ) from exc
        self.write(slot, w13, w2, non_blocking=non_blocking)
        if not self.fallback_loads:
            logger.warning(
                "expert cache: reading page (layer %d, expert %d) from the %s backing store failed twice (%s); such "
                "pages are read from the checkpoint instead (the same weights, converted per load: slower)",
                *page,
                self.store.kind,
                str(error),  # not the exception: a log record that holds its traceback keeps the engine alive
            )
        self.fallback_loads += 1

    def load_from_store(self, page: tuple[int, int], slot: int, non_blocking: bool) -> None:
        """Straight from the page file into the slot's memory where the
        store and the pool allow it (CPU), else read (and pack) then copy;
        on a GPU on the current stream, after every kernel that read the old
        page, asynchronous from a pinned host copy."""
        if self.slot_buffers is not None:
            self.store.read_into(*page, self.slot_buffers[slot])
            return
        w13, w2 = self.read_packed(page)
        self.write(slot, w13, w2, non_blocking=non_blocking or w13.is_pinned())

    def ready_event(self) -> torch.cuda.Event | None:
        """On a GPU, an event recorded now on the compute stream: after every
        kernel queued so far, so after each that can read a slot's old page.
        None on a CPU."""
        if self.copy_stream is None:
            return None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.w13.device))
        return ready

    def start(self, jobs: list[tuple[tuple[int, int], int]], ready: torch.cuda.Event | None) -> None:
        """Hand ``jobs`` [(page, slot)] to the prefetch thread as one job;
        each page is in flight until ``landed``."""
        future = self.executor.submit(self.load_async, jobs, ready)
        for page, _ in jobs:
            self.inflight[page] = future

    def load_async(self, jobs: list[tuple[tuple[int, int], int]], ready: torch.cuda.Event | None):
        """On the prefetch thread: read, pack, write each (unpinned, not yet
        mapped) slot of ``jobs`` [(page, slot)]; on a GPU on the copy stream,
        returning one event for them all. One job per layer's prefetch, not
        per page: fewer hand-offs between the threads.

        On a GPU the host runs ahead of the device: kernels of earlier layers
        that read the page this slot held may not have run yet. ``ready`` was
        recorded on the compute stream when the load was decided (after every
        kernel that can read the old page), and the copy waits for it.

        Returns ``(event, failed)``: ``failed``, the pages whose read
        failed; ``landed`` reports them, their slots are given back and the
        layer that needs one loads it on demand (retried, with the fallback
        source): an I/O error on this thread never ends the engine by itself."""
        failed = set()
        if self.copy_stream is None:
            for page, slot in jobs:
                started = time.perf_counter()
                try:
                    self.load_from_store(page, slot, non_blocking=False)
                except Exception:  # noqa: BLE001 - any failure: the demand path loads it again and reports it
                    failed.add(page)
                    continue
                self.timed_load(time.perf_counter() - started)
            return None, failed
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(ready)
            for page, slot in jobs:
                try:
                    self.load_from_store(page, slot, non_blocking=True)
                except Exception:  # noqa: BLE001 - as above
                    failed.add(page)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event, failed

    def landed(self, page: tuple[int, int]) -> bool:
        """The end of ``page``'s load in flight, waiting for it if it runs:
        True when it is in its slot (on a GPU the compute stream then waits
        for its copy), False when its read failed."""
        event, failed = self.inflight[page].result()
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        del self.inflight[page]
        return page not in failed

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.store.close()
        if self.fallback is not None:
            self.fallback.close()


def _loader_thread_start() -> None:
    """The prefetch thread, on its first job. One torch thread: the model's
    thread keeps the cores' math. And off the model's core: vLLM's CPU
    worker binds its compute thread to its cores (one of two on a 2-core
    machine, the other reserved for the engine and API server processes),
    and a thread inherits its creator's binding, so the loader's reads
    would take turns with the model on the one core instead of overlapping
    it. Measured in docs/expert_cache.md ("The loader's core")."""
    torch.set_num_threads(1)
    if not hasattr(os, "sched_setaffinity"):
        return
    mine = os.sched_getaffinity(0)
    spare = set(range(os.cpu_count() or 1)) - mine
    if spare:
        try:
            os.sched_setaffinity(0, spare)
        except OSError:  # CPUs outside this container's set: stay where we are
            return
        logger.info(
            "expert cache: the loader thread runs on CPUs %s (the model computes on %s)", sorted(spare), sorted(mine)
        )


def _pool_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pool's slots; on a CPU in page-aligned anonymous memory, so that
    O_DIRECT reads can land in a slot (torch's allocator aligns to 64 bytes)."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, max(nbytes, 1))
    # The tensor keeps the mmap alive through the buffer protocol.
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def _writable_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def memory_store(w13_layers: list[torch.Tensor], w2_layers: list[torch.Tensor]) -> MemoryExpertStore:
    """Every page in host memory; pinned when the pool is on a GPU, so that
    loads are asynchronous copies."""
    if w13_layers[0].device.type != "cuda":
        return MemoryExpertStore(torch.stack(w13_layers), torch.stack(w2_layers))
    return MemoryExpertStore(
        torch.stack([w.to("cpu") for w in w13_layers]).pin_memory(),
        torch.stack([w.to("cpu") for w in w2_layers]).pin_memory(),
    )
