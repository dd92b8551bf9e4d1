"""The paged expert cache inside the model (paper §4.3; docs/expert_cache.md).

A pool of ``P`` expert slots allocated once after loading, shared by every
layer: ``w13 [P, 2Ip, H]`` and ``w2 [P, H, Ip]`` in the CPU grouped GEMM's
layout. A page is one expert of one layer; the shared MLPs stay resident.
A table ``[layer, expert]`` maps a page to its slot (-1: absent): the
model's ``slot_table`` on a CPU, a host copy on a GPU (each layer's row is
copied to the device asynchronously; see ``host_table``). The routed kernel
reads the pool through each token's slot, so a hit costs nothing beyond
the table gather.

Per layer, before its experts run, ``layer_slots`` (called through the
custom op ``vllm::readme_expert_slots``, which torch.compile keeps as one
opaque call) makes the step's pages of that layer resident and pins them,
loading misses on demand (counted: correctness never depends on a
prediction), then starts prefetching the pages of the next ``prefetch_layers`` layers
(past the last layer: the next step's first layers) on a background thread. The op takes
the layer's input hidden states only to be ordered after the previous
layer's experts ran: a slot is never rewritten while a kernel may read it.

Eviction (eviction.py, one interface): Belady over the future the server
knows, i.e. this step's experts for the layers still to run, then the next
step's predicted experts (the expert-aware scheduler's plan when it
publishes one, plan.py, else this step's); LRU, LFU and random as baselines.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_readme.configuration_readme import ReadMEConfigError
from vllm_readme.experts.eviction import NEVER, make_policy
from vllm_readme.experts.plan import PROCESS_ENGINE_ID, PlanReader
from vllm_readme.experts.pool import PagePool, PoolTooSmall
from vllm_readme.experts.store import DiskExpertStore, MemoryExpertStore, PageFileStore, StoreFileChanged
from vllm_readme.options import WHERE, ExpertCacheOptions

# Under vLLM's "vllm" logger, so its handlers and level apply. This module
# imports no vLLM: the cache's mechanics (pool, stores, streams) run and are
# tested with torch alone, on a GPU too (tests/test_gpu.py); the custom op
# that calls it from the model lives in model_executor/expert_op.py.
logger = logging.getLogger(f"vllm.{__name__}")

# The custom op finds its cache by id; weak, so an engine torn down in-process
# frees its pool.
_CACHES: weakref.WeakValueDictionary[int, ExpertCache] = weakref.WeakValueDictionary()


def cache_by_id(cache_id: int) -> ExpertCache:
    return _CACHES[cache_id]


class ExpertPageUnreadable(RuntimeError):
    """A page that no source could read as it was at start-up. Raised in the
    model's forward, where vLLM's engine core treats any exception as fatal:
    the engine stops with this message instead of computing with other
    weights (docs/expert_cache.md, "I/O faults while serving")."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # loaded on demand: the layer waited for the read
    prefetched: int = 0  # loads started ahead of use
    prefetch_used: int = 0  # prefetched pages that a layer then read
    bytes_loaded: int = 0
    stall_s: float = 0.0  # time layers waited on loads (demand reads and unfinished prefetches)
    steps: int = 0

    def add(self, other: CacheStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def summary(self) -> dict:
        return {
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "hit_ratio": self.hit_ratio,
            "prefetch_accuracy": self.prefetch_used / max(1, self.prefetched),
        }


class ExpertCache:
    def __init__(
        self,
        *,
        w13_layers: list[torch.Tensor],
        w2_layers: list[torch.Tensor],
        slot_table: torch.Tensor,
        pages: int,
        options: ExpertCacheOptions,
        checkpoint: Path,
        isa: str,
        tp_rank: int = 0,
        tp_size: int = 1,
        log_every: int = 100,
        store: MemoryExpertStore | PageFileStore | DiskExpertStore | None = None,
        num_experts: int | None = None,
        engine_id: str = PROCESS_ENGINE_ID,
        first_layer: int = 0,
        worker: int | None = None,
    ):
        """``store``: a backing store already made (benchmarks share one
        between caches); by default made from ``options.backing_store``.
        ``num_experts``: the model's; when the layers hold fewer (the model
        streamed its experts: expert 0 only, as the layout reference), every
        other page comes from the checkpoint and never from memory.
        ``engine_id``: the engine whose scheduler's plan file to read
        (plan.py; vLLM's ``instance_id``). ``first_layer``: under pipeline
        parallelism, the model layer of this stage's first (``w13_layers``
        are the stage's own). ``worker``: this worker's rank in the engine
        (stage x tensor-parallel size + tensor-parallel rank; default
        ``tp_rank``): worker 0 tells the scheduler what is resident."""
        self.num_layers = len(w13_layers)
        self.first_layer = first_layer
        self.tp_rank = tp_rank
        self.num_experts = num_experts or w13_layers[0].shape[0]
        self.streamed = w13_layers[0].shape[0] < self.num_experts
        self.page_bytes = w13_layers[0][0].nbytes + w2_layers[0][0].nbytes
        self.isa = isa
        self.options = options
        self.log_every = log_every
        device, dtype = w13_layers[0].device, w13_layers[0].dtype
        self.w13 = _pool_tensor((pages, *w13_layers[0].shape[1:]), dtype, device)
        self.w2 = _pool_tensor((pages, *w2_layers[0].shape[1:]), dtype, device)
        self.slot_table = slot_table
        self.slot_table.fill_(-1)
        # Where the cache writes residency: the model's table on a CPU; on a
        # GPU a host copy, because writing one element of a device tensor
        # from Python synchronises the host with the device (the write waits
        # for every queued kernel; benchmarks/gpu_sync_probe.py shows which
        # operations wait), which would stop the host from deciding the next
        # layers' loads ahead of the device.
        # Each layer's row then reaches the device as a small asynchronous
        # copy (layer_slots).
        self.host_table = (
            slot_table if device.type == "cpu" else slot_table.new_full(slot_table.shape, -1, device="cpu")
        )
        self.pool = PagePool(
            pages, make_policy(options.eviction, next_use=self._next_use, ticks_per_step=self.num_layers)
        )
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
        # Start with the first experts of every layer resident (expert-major).
        for expert in range(self.num_experts):
            for layer in range(self.num_layers):
                if self.pool.free:
                    slot, _ = self.pool.allocate((layer, expert), clock=-1)
                    if expert < w13_layers[layer].shape[0]:
                        self._write(slot, w13_layers[layer][expert], w2_layers[layer][expert])
                    else:
                        self._write(slot, *self._read_packed((layer, expert)))
                    self.host_table[layer, expert] = slot
        self.executor = (
            ThreadPoolExecutor(1, thread_name_prefix="readme-prefetch", initializer=_loader_thread_start)
            if options.prefetch
            else None
        )
        self.inflight: dict[tuple[int, int], Future] = {}
        self.prefetched_unused: set[tuple[int, int]] = set()
        self.step = -1
        self.step_experts: frozenset[int] = frozenset()
        self.step_order: list[int] = []  # the same, ascending (the order pages are pinned and loaded)
        self.expert_index: torch.Tensor | None = None  # the step's expert ids as int64, for the slot gather
        self.resident_step = False  # every page of the step was resident at its start (_begin_step)
        # Every tensor-parallel rank's cache decides the same: worker 0 (the
        # first stage's first rank) tells the scheduler.
        self.plan = PlanReader(self.num_experts, engine_id, rank=tp_rank if worker is None else worker)
        self.next_plan: frozenset[int] | None = None  # the scheduler's, read once per step
        self.next_experts: frozenset[int] = frozenset()  # next_plan | step_experts, set once per step
        self.now = CacheStats()
        self.total = CacheStats()
        self.page_load_ms = 0.0  # one page's read and write, a running mean (reported)
        self.stall_per_load_ms = 0.0  # what the layers waited per page loaded, a running mean (to the scheduler)
        self.id = id(self)
        _CACHES[self.id] = self
        from vllm_readme.model_executor.metrics import ExpertCacheCounters

        self.counters = ExpertCacheCounters()

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
            self.store = store
            self._check_layout(w13_layers, w2_layers)
            return store
        if kind == "disk":
            if not self.streamed:
                return PageFileStore.from_layers(w13_layers, w2_layers, self.options.page_dir)
            # Page by page from the checkpoint, packed as the kernel reads it.
            source = DiskExpertStore(checkpoint, self.num_layers, self.num_experts, tp_rank, tp_size, self.first_layer)
            self.store = source
            self._check_layout(w13_layers, w2_layers)
            started = time.perf_counter()
            try:
                store = PageFileStore(
                    lambda layer, expert: self._read_packed((layer, expert)),
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

    def _check_layout(self, w13_layers, w2_layers) -> None:
        """One page read and packed as the store will, against FusedMoE's."""
        w13, w2 = self._read_packed((0, 0))
        if not (torch.equal(w13, w13_layers[0][0]) and torch.equal(w2, w2_layers[0][0])):
            raise ReadMEConfigError(
                "expert cache: an expert read from the checkpoint and packed for the CPU grouped GEMM differs from "
                "the one vLLM loaded (this vLLM lays experts out differently). Serve without "
                f'{WHERE}.expert_pool, or use "backing_store": "memory".'
            )

    def describe(self) -> str:
        total = self.num_layers * self.num_experts
        pages = self.pool.capacity
        store = self.store.kind
        if isinstance(self.store, PageFileStore):
            store += f" (a {self.store.nbytes / 2**20:.1f} MiB page file in {self.store.folder}, unlinked, " + (
                "O_DIRECT)" if self.store.direct else "page cache dropped)"
            )
        elif isinstance(self.store, DiskExpertStore):
            store += " (safetensors, convert and pack per load, " + (
                "O_DIRECT)" if self.store.direct else "page cache dropped)"
            )
        return (
            f"expert cache of layers {self.first_layer}-{self.first_layer + self.num_layers - 1}: {pages} of {total} expert pages ({pages / total:.0%}; {pages * self.page_bytes / 2**20:.1f} "
            f"of {total * self.page_bytes / 2**20:.1f} MiB), page {self.page_bytes / 2**10:.0f} KiB, eviction "
            f"{self.options.eviction}, prefetch {f'{self.options.prefetch_layers} layers ahead' if self.executor else 'off'}, "
            f"backing store {store}"
            + (", experts read from the checkpoint at load (never all in memory)" if self.streamed else "")
        )

    # ------------------------------------------------------------ per layer
    def layer_slots(self, layer: int, expert_ids: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            self._begin_step(expert_ids)
        clock = self.step * self.num_layers + layer
        if self.resident_step:
            # Every page of the step was resident when it began and is pinned
            # for the whole step (_begin_step): nothing to check per layer.
            if layer == self.num_layers - 1 and self.executor is not None:
                self._prefetch(layer, clock)
            return self._slots(layer)
        needed = [(layer, e) for e in self.step_order]
        self.pool.pin(needed)
        started = time.perf_counter()
        self._harvest(wait_for=needed)
        missing = [page for page in needed if page not in self.pool]
        self.now.hits += len(needed) - len(missing)
        used = self.prefetched_unused.intersection(needed)
        self.now.prefetch_used += len(used)
        self.prefetched_unused -= used
        if missing:
            self.now.misses += len(missing)
            slots = self._allocate(missing, clock)
            if len(slots) < len(missing) and self.inflight:
                # A prefetch reaching past this layer holds slots while it
                # loads (with prefetch_layers > 1 the last layer's prefetch
                # loads the next step's layers 0 and 1 for the experts it
                # expected): let every load land, so that its pages become
                # evictable, and ask for the rest.
                self._harvest(wait_for=list(self.inflight))
                slots += self._allocate(missing[len(slots) :], clock)
            if len(slots) < len(missing):
                for page, _ in slots:
                    self.pool.cancel(page)
                raise PoolTooSmall(
                    f"layer {layer} needs {len(missing)} more pages but the rest of the pool is pinned or loading; "
                    f"the pool needs at least {minimum_pages(self.num_experts)} pages."
                )
            for page, slot in slots:
                load_started = time.perf_counter()
                self._load(page, slot)
                self._timed_load(time.perf_counter() - load_started)
                self._finish(page, slot)
        for page in needed:
            self.pool.touch(page, clock)
        self.now.stall_s += time.perf_counter() - started
        if self.executor is not None:
            self._prefetch(layer, clock)
        return self._slots(layer)

    def _slots(self, layer: int) -> torch.Tensor:
        """Each token's slot in this layer, [T, 1]."""
        row = self.host_table[layer]
        if self.copy_stream is not None:
            # A snapshot of the row as decided now, copied without a sync; the
            # pinned block is not reused before the copy ran (torch's caching
            # host allocator records the copy).
            row = row.clone().pin_memory().to(self.expert_index.device, non_blocking=True)
        return torch.index_select(row, 0, self.expert_index).unsqueeze(-1)

    def _begin_step(self, expert_ids: torch.Tensor) -> None:
        if self.step >= 0:
            self._end_step()
        self.step += 1
        self.expert_index = expert_ids.long()
        self.step_order = expert_ids.unique().tolist()  # sorted; on a GPU the step's one host sync
        self.step_experts = frozenset(self.step_order)
        self.next_plan = self.plan.read()
        # The scheduler's plan for the next step (written when it scheduled
        # this one) with this step's experts; this step's alone without one.
        self.next_experts = self.step_experts | (self.next_plan or frozenset())
        # The common case once the pool holds the working set: every page of
        # the step already resident. Then the step's pages are pinned and
        # touched once here (in the order the layers would touch them), and
        # the layers only gather their slots.
        pages = [(layer, e) for layer in range(self.num_layers) for e in self.step_order]
        self.resident_step = not self.inflight and all(page in self.pool for page in pages)
        if self.resident_step:
            self.pool.pin(pages)
            base = self.step * self.num_layers
            for page in pages:
                self.pool.touch(page, base + page[0])
            self.now.hits += len(pages)
            used = self.prefetched_unused.intersection(pages)
            self.now.prefetch_used += len(used)
            self.prefetched_unused -= used

    def _timed_load(self, seconds: float) -> None:
        """A running mean of one page's load time (read, pack, write), for
        the scheduler's cost model; on a GPU the host's share only."""
        self.page_load_ms += 0.05 * (1000 * seconds - self.page_load_ms) if self.page_load_ms else 1000 * seconds

    def resident_experts(self) -> frozenset[int]:
        """Experts whose page is resident (or arriving) in every layer."""
        pages = [0] * self.num_experts
        for _, expert in self.pool.slot_of:
            pages[expert] += 1
        return frozenset(e for e, n in enumerate(pages) if n == self.num_layers)

    def _end_step(self) -> None:
        # To the expert-aware scheduler, if there is one: its cost model
        # charges a step for opening experts that are not resident, at what a
        # load has cost the steps: the layers' wait per page loaded (with
        # prefetch most of a load's time overlaps compute), a running mean.
        loads = self.now.misses + self.now.prefetched
        if loads:
            waited = 1000 * self.now.stall_s / loads
            self.stall_per_load_ms += 0.1 * (waited - self.stall_per_load_ms) if self.stall_per_load_ms else waited
        # A load the scheduler could avoid by holding a request back is only
        # deferred, not saved, while the pool cannot keep a step's pages from
        # one step to the next: the held request needs the same pages a step
        # later, and they will have been evicted by then, so charging such
        # loads makes the policy hold requests back for no saving
        # (docs/expert_cache.md has the serving figures). Then a load is
        # charged nothing.
        working_set = len(self.step_experts) * self.num_layers
        load_ms = self.stall_per_load_ms * self.num_layers if working_set <= self.pool.capacity else 0.0
        self.plan.publish_residency(self.resident_experts(), load_ms)
        self.now.steps = 1
        self.total.add(self.now)
        if self.tp_rank == 0:  # every rank's cache decides the same: count once (Prometheus sums processes)
            self.counters.record(self.now)
        if self.log_every and self.total.steps % self.log_every == 0:
            t = self.total
            logger.info(
                "expert cache: %d steps, hit ratio %.1f%% (last step %d/%d), %.1f MiB loaded, prefetch %d (%.0f%% "
                "used), stalled %.1f ms/step, next-step plan: %s",
                t.steps,
                100 * t.hit_ratio,
                self.now.hits,
                self.now.hits + self.now.misses,
                t.bytes_loaded / 2**20,
                t.prefetched,
                100 * t.prefetch_used / max(1, t.prefetched),
                1000 * t.stall_s / t.steps,
                f"the scheduler's (#{self.plan.last_seq})" if self.next_plan is not None else "this step's experts",
            )
        self.now = CacheStats()

    def _next_use(self, page: tuple[int, int], clock: int) -> float:
        """Belady's knowledge: when ``page`` is next read, as a clock."""
        layer, expert = page
        step, now = divmod(clock, self.num_layers)
        if layer > now and expert in self.step_experts:
            return step * self.num_layers + layer
        if expert in self.next_experts:
            return (step + 1) * self.num_layers + layer
        return NEVER

    def _allocate(self, pages: list, clock: int, loading: bool = False) -> list[tuple[tuple[int, int], int]]:
        """Slots for ``pages``, [(page, slot)]: fewer when the rest of the pool is pinned or loading."""
        out = []
        for page, slot, evicted in self.pool.allocate_many(pages, clock, loading=loading):
            if evicted is not None:
                self.host_table[evicted] = -1
                self.prefetched_unused.discard(evicted)
            out.append((page, slot))
        return out

    def _finish(self, page, slot: int) -> None:
        self.pool.loaded(page)
        self.host_table[page] = slot
        self.now.bytes_loaded += self.page_bytes

    # ------------------------------------------------------------ loading
    def _read_packed(self, page, store=None) -> tuple[torch.Tensor, torch.Tensor]:
        layer, expert = page
        store = store or self.store
        if not isinstance(store, DiskExpertStore):
            return store.packed(layer, expert)
        from vllm_readme.model_executor.kernels import pack_expert_page

        gate, up, down = store.read(layer, expert)
        return pack_expert_page(gate, up, down, self.w13[:1], self.w2[:1], self.isa)

    def _write(self, slot: int, w13: torch.Tensor, w2: torch.Tensor, non_blocking: bool = False):
        self.w13[slot].copy_(w13, non_blocking=non_blocking)
        self.w2[slot].copy_(w2, non_blocking=non_blocking)

    def _load(self, page, slot: int, non_blocking: bool = False) -> None:
        """``page`` into ``slot`` from the store; a read that fails is tried
        once more (a transient fault may pass), then the page comes from the
        fallback source, if there is one. Never other weights: what no
        source can read raises ExpertPageUnreadable."""
        try:
            self._load_from_store(page, slot, non_blocking)
            return
        except StoreFileChanged as exc:  # read again, the changed file would be refused again
            error = exc
        except OSError:
            try:
                self._load_from_store(page, slot, non_blocking)
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
            w13, w2 = self._read_packed(page, self.fallback)
        except OSError as exc:
            raise ExpertPageUnreadable(
                f"expert cache: page (layer {page[0]}, expert {page[1]}) cannot be read from the page file ({error}) "
                f"nor from the checkpoint ({exc}). The engine stops rather than compute with other weights; check "
                "the disk and restart it."
            ) from exc
        self._write(slot, w13, w2, non_blocking=non_blocking)
        if not self.fallback_loads:
            logger.warning(
                "expert cache: reading page (layer %d, expert %d) from the %s backing store failed twice (%s); such "
                "pages are read from the checkpoint instead (the same weights, converted per load: slower)",
                *page,
                self.store.kind,
                str(error),  # not the exception: a log record that holds its traceback keeps the engine alive
            )
        self.fallback_loads += 1

    def _load_from_store(self, page, slot: int, non_blocking: bool) -> None:
        """Straight from the page file into the slot's memory where the
        store and the pool allow it (CPU), else read (and pack) then copy;
        on a GPU on the current stream, after every kernel that read the old
        page, asynchronous from a pinned host copy."""
        if self.slot_buffers is not None:
            self.store.read_into(*page, self.slot_buffers[slot])
            return
        w13, w2 = self._read_packed(page)
        self._write(slot, w13, w2, non_blocking=non_blocking or w13.is_pinned())

    def _load_async(self, jobs: list[tuple[tuple[int, int], int]], ready: torch.cuda.Event | None):
        """On the prefetch thread: read, pack, write each (unpinned, not yet
        mapped) slot of ``jobs`` [(page, slot)]; on a GPU on the copy stream,
        returning one event for them all. One job per layer's prefetch, not
        per page: fewer hand-offs between the threads.

        On a GPU the host runs ahead of the device: kernels of earlier layers
        that read the page this slot held may not have run yet. ``ready`` was
        recorded on the compute stream when the load was decided (after every
        kernel that can read the old page), and the copy waits for it.

        Returns ``(event, failed)``: ``failed``, the pages whose read
        failed; ``_harvest`` gives their slots back and the layer that needs
        one loads it on demand (retried, with the fallback source): an I/O
        error on this thread never ends the engine by itself."""
        failed = set()
        if self.copy_stream is None:
            for page, slot in jobs:
                started = time.perf_counter()
                try:
                    self._load_from_store(page, slot, non_blocking=False)
                except Exception:  # noqa: BLE001 - any failure: the demand path loads it again and reports it
                    failed.add(page)
                    continue
                self._timed_load(time.perf_counter() - started)
            return None, failed
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(ready)
            for page, slot in jobs:
                try:
                    self._load_from_store(page, slot, non_blocking=True)
                except Exception:  # noqa: BLE001 - as above
                    failed.add(page)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event, failed

    def _prefetch(self, layer: int, clock: int) -> None:
        """Start loading the pages of the next ``prefetch_layers`` layers
        (past the last layer: the next step's, for its predicted experts)."""
        pages = []
        for target in range(layer + 1, layer + 1 + min(self.options.prefetch_layers, self.num_layers)):
            if target < self.num_layers:
                pages += [(target, e) for e in self.step_order]
            else:
                pages += [(target - self.num_layers, e) for e in sorted(self.next_experts)]
        self.pool.pin(self.pool.pinned | {p for p in pages if p in self.pool.slot_of})
        ready = None
        if self.copy_stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.w13.device))
        # Short of slots when every other page is needed now: the demand path loads the rest.
        jobs = self._allocate([p for p in pages if p not in self.pool.slot_of], clock, loading=True)
        if jobs:
            future = self.executor.submit(self._load_async, jobs, ready)
            for page, _ in jobs:
                self.inflight[page] = future
            self.now.prefetched += len(jobs)

    def _harvest(self, wait_for) -> None:
        """Finish loads that are done, and wait for those of ``wait_for``."""
        wanted = set(wait_for)
        for page in list(self.inflight):
            job = self.inflight[page]
            if page not in wanted and not job.done():
                continue
            event, failed = job.result()
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            del self.inflight[page]
            if page in failed:  # a layer that needs it loads it on demand
                self.pool.cancel(page)
                continue
            self._finish(page, self.pool.slot(page))
            self.prefetched_unused.add(page)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.store.close()
        if self.fallback is not None:
            self.fallback.close()
        self.plan.close()
        _CACHES.pop(self.id, None)


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


def minimum_pages(num_experts: int) -> int:
    """One layer's experts: a step may route its tokens to all of them, and a
    layer's pages are pinned while it runs."""
    return num_experts
