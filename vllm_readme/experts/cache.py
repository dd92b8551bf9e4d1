# SPDX-License-Identifier: Apache-2.0
"""The paged expert cache inside the model (paper §4.3; docs/expert_cache.md).

A pool of ``P`` expert slots allocated once after loading, shared by every
layer. A page is one expert of one layer; the shared MLPs stay resident.
A table ``[layer, expert]`` maps a page to its slot (-1: absent): the
model's ``slot_table`` on a CPU, a host copy on a GPU (each layer's row is
copied to the device asynchronously). The routed kernel reads the pool
through each token's slot, so a hit costs nothing beyond the table gather.

Per layer, before its experts run, ``layer_slots`` (called through the
custom op ``vllm::readme_expert_slots``, which torch.compile keeps as one
opaque call) makes the step's pages of that layer resident and pins them,
loading misses on demand (counted: correctness never depends on a
prediction), then starts prefetching the pages of the next ``prefetch_layers`` layers
(past the last layer: the next step's first layers) on a background thread. The op takes
the layer's input hidden states only to be ordered after the previous
layer's experts ran: a slot is never rewritten while a kernel may read it.

``ExpertCache`` runs the steps and composes three parts:

* residency.py: which page sits in which slot, the table, and eviction
  (eviction.py, one interface): Belady over the future the server knows,
  i.e. this step's experts for the layers still to run, then the next
  step's predicted experts (the expert-aware scheduler's plan when it
  publishes one, plan.py, else this step's); LRU, LFU and random as
  baselines.
* loader.py: the pool's memory, the backing store (store.py) and its
  second source, loads on demand and on the prefetch thread, CUDA streams.
* stats.py: hits, misses, loads and waits per step and in total, the
  running means the scheduler reads, the Prometheus counters.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import torch

from vllm_readme.experts.loader import ExpertLoader
from vllm_readme.experts.plan import PROCESS_ENGINE_ID, PlanReader
from vllm_readme.experts.pool import PoolTooSmall
from vllm_readme.experts.residency import Residency
from vllm_readme.experts.stats import CacheStatistics
from vllm_readme.experts.store import DiskExpertStore, MemoryExpertStore, PageFileStore
from vllm_readme.options import ExpertCacheOptions

# This module imports no vLLM: the cache's mechanics (pool, stores, streams)
# run and are tested with torch alone, on a GPU too (tests/model/test_gpu.py); the
# custom op that calls it from the model lives in model_executor/expert_op.py.

# The custom op finds its cache by id; weak, so an engine torn down in-process
# frees its pool.
_CACHES: weakref.WeakValueDictionary[int, ExpertCache] = weakref.WeakValueDictionary()


def cache_by_id(cache_id: int) -> ExpertCache:
    return _CACHES[cache_id]


class _PartAttribute:
    """An attribute of one of the cache's parts, read as the cache's own;
    the part may rebind it (a count, a running mean)."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, cache, owner: type | None = None):
        if cache is None:
            return self
        return getattr(getattr(cache, self.part), self.name)


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
        self.num_experts = num_experts or w13_layers[0].shape[0]
        self.page_bytes = w13_layers[0][0].nbytes + w2_layers[0][0].nbytes
        self.options = options
        # Every tensor-parallel rank's cache decides the same: one counts (Prometheus sums processes).
        self.stats = CacheStatistics(log_every, export=tp_rank == 0)
        self.residency = Residency(
            slot_table, pages, options.eviction, self.num_layers, self.num_experts, w13_layers[0].device
        )
        self.loader = ExpertLoader(
            w13_layers=w13_layers,
            w2_layers=w2_layers,
            pages=pages,
            num_experts=self.num_experts,
            first_layer=first_layer,
            options=options,
            checkpoint=checkpoint,
            isa=isa,
            tp_rank=tp_rank,
            tp_size=tp_size,
            store=store,
            timed_load=self.stats.timed_load,
        )
        self.streamed = self.loader.streamed
        self._fill(w13_layers, w2_layers)
        # The parts' objects (never replaced) and methods, bound once: the
        # per-layer path and the model read them without a lookup through
        # the part.
        self.pool, self.prefetched_unused = self.residency.pool, self.residency.prefetched_unused
        self.w13, self.w2, self.store = self.loader.w13, self.loader.w2, self.loader.store
        self.copy_stream, self.slot_buffers = self.loader.copy_stream, self.loader.slot_buffers
        self.executor, self.inflight = self.loader.executor, self.loader.inflight
        self.now, self.total = self.stats.now, self.stats.total  # cleared in place, never replaced
        self._allocate, self._loaded, self._slots = self.residency.allocate, self.residency.loaded, self.residency.slots
        self._load, self._landed, self._timed_load = self.loader.load, self.loader.landed, self.stats.timed_load
        self._ready_event, self._start_loads = self.loader.ready_event, self.loader.start
        self.step = -1
        self.step_order: list[int] = []  # the step's experts, ascending (the order pages are pinned and loaded)
        self.expert_index: torch.Tensor | None = None  # the step's expert ids as int64, for the slot gather
        self.resident_step = False  # every page of the step was resident at its start (_begin_step)
        # Every tensor-parallel rank's cache decides the same: worker 0 (the
        # first stage's first rank) tells the scheduler.
        self.plan = PlanReader(self.num_experts, engine_id, rank=tp_rank if worker is None else worker)
        self.next_plan: frozenset[int] | None = None  # the scheduler's, read once per step
        self.id = id(self)
        _CACHES[self.id] = self
        self.stats.start_counters()

    def _fill(self, w13_layers: list[torch.Tensor], w2_layers: list[torch.Tensor]) -> None:
        """Start with the first experts of every layer resident (expert-major)."""
        pool, loader = self.residency.pool, self.loader
        for expert in range(self.num_experts):
            for layer in range(self.num_layers):
                if not pool.free:
                    return
                slot, _ = pool.allocate((layer, expert), clock=-1)
                if expert < w13_layers[layer].shape[0]:
                    loader.write(slot, w13_layers[layer][expert], w2_layers[layer][expert])
                else:
                    loader.write(slot, *loader.read_packed((layer, expert)))
                self.residency.loaded((layer, expert), slot)

    # The parts' state that callers read as the cache's.
    step_experts = _PartAttribute("residency")  # the running step's experts
    page_load_ms = _PartAttribute("stats")
    stall_per_load_ms = _PartAttribute("stats")
    fallback_loads = _PartAttribute("loader")  # pages read from the second source

    @property
    def _load_from_store(self):
        """The loader's read of one page from the store. Replacing it here
        replaces it for every load, on demand and on the prefetch thread
        (tests/faults inject faults through it)."""
        return self.loader.load_from_store

    @_load_from_store.setter
    def _load_from_store(self, read) -> None:
        self.loader.load_from_store = read

    def describe(self) -> str:
        total = self.num_layers * self.num_experts
        pages = self.pool.capacity
        return (
            f"expert cache of layers {self.first_layer}-{self.first_layer + self.num_layers - 1}: {pages} of {total} expert pages ({pages / total:.0%}; {pages * self.page_bytes / 2**20:.1f} "
            f"of {total * self.page_bytes / 2**20:.1f} MiB), page {self.page_bytes / 2**10:.0f} KiB, eviction "
            f"{self.options.eviction}, prefetch {f'{self.options.prefetch_layers} layers ahead' if self.executor else 'off'}, "
            f"backing store {self.loader.describe_store()}"
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
            return self._slots(layer, self.expert_index)
        needed = [(layer, e) for e in self.step_order]
        self.pool.pin(needed)
        started = time.perf_counter()
        self._harvest(wait_for=needed)
        missing = [page for page in needed if page not in self.pool]
        self.now.hits += len(needed) - len(missing)
        used = self.prefetched_unused.intersection(needed)
        self.now.prefetch_used += len(used)
        self.prefetched_unused.difference_update(used)
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
        return self._slots(layer, self.expert_index)

    def _begin_step(self, expert_ids: torch.Tensor) -> None:
        if self.step >= 0:
            self._end_step()
        self.step += 1
        self.expert_index = expert_ids.long()
        self.step_order = expert_ids.unique().tolist()  # sorted; on a GPU the step's one host sync
        self.next_plan = self.plan.read()
        # The scheduler's plan for the next step (written when it scheduled
        # this one) with this step's experts; this step's alone without one.
        self.residency.expect(frozenset(self.step_order), self.next_plan)
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
            self.prefetched_unused.difference_update(used)

    def resident_experts(self) -> frozenset[int]:
        """Experts whose page is resident (or arriving) in every layer."""
        return self.residency.resident_experts()

    def _end_step(self) -> None:
        # To the expert-aware scheduler, if there is one: its cost model
        # charges a step for opening experts that are not resident, at what a
        # load has cost the steps: the layers' wait per page loaded, a
        # running mean (stats.py).
        self.stats.measure_stall()
        # A load the scheduler could avoid by holding a request back is only
        # deferred, not saved, while the pool cannot keep a step's pages from
        # one step to the next: the held request needs the same pages a step
        # later, and they will have been evicted by then, so charging such
        # loads makes the policy hold requests back for no saving
        # (docs/expert_cache.md has the serving figures). Then a load is
        # charged nothing.
        working_set = len(self.step_order) * self.num_layers
        load_ms = self.stats.stall_per_load_ms * self.num_layers if working_set <= self.pool.capacity else 0.0
        self.plan.publish_residency(self.residency.resident_experts(), load_ms)
        self.stats.end_step(self.plan.last_seq if self.next_plan is not None else None)

    def _finish(self, page, slot: int) -> None:
        self._loaded(page, slot)
        self.now.bytes_loaded += self.page_bytes

    # ------------------------------------------------------------ prefetch
    def _prefetch(self, layer: int, clock: int) -> None:
        """Start loading the pages of the next ``prefetch_layers`` layers
        (past the last layer: the next step's, for its predicted experts)."""
        pages = []
        for target in range(layer + 1, layer + 1 + min(self.options.prefetch_layers, self.num_layers)):
            if target < self.num_layers:
                pages += [(target, e) for e in self.step_order]
            else:
                pages += [(target - self.num_layers, e) for e in sorted(self.residency.next_experts)]
        self.pool.pin(self.pool.pinned | {p for p in pages if p in self.pool.slot_of})
        ready = self._ready_event()
        # Short of slots when every other page is needed now: the demand path loads the rest.
        jobs = self._allocate([p for p in pages if p not in self.pool.slot_of], clock, loading=True)
        if jobs:
            self._start_loads(jobs, ready)
            self.now.prefetched += len(jobs)

    def _harvest(self, wait_for) -> None:
        """Finish loads that are done, and wait for those of ``wait_for``."""
        wanted = set(wait_for)
        for page in list(self.inflight):
            if page not in wanted and not self.inflight[page].done():
                continue
            if not self._landed(page):  # a layer that needs it loads it on demand
                self.pool.cancel(page)
                continue
            self._finish(page, self.pool.slot(page))
            self.prefetched_unused.add(page)

    def close(self) -> None:
        self.loader.close()
        self.plan.close()
        _CACHES.pop(self.id, None)


def minimum_pages(num_experts: int) -> int:
    """One layer's experts: a step may route its tokens to all of them, and a
    layer's pages are pinned while it runs."""
    return num_experts
