# SPDX-License-Identifier: Apache-2.0
"""Which expert page sits in which slot of the expert cache's pool, and which
page leaves when a slot is needed (paper §4.3; docs/expert_cache.md).

A page is one expert of one layer, ``(layer, expert)``. The pool's
bookkeeping (pool.py) decides slots, with an eviction policy (eviction.py);
a table ``[layer, expert]`` maps each page to its slot (-1: absent), and the
routed kernel reads the pool through it.

Belady's future is what the server knows: the running step's experts for the
layers still to run, then the next step's predicted experts (the scheduler's
plan when it publishes one, plan.py, with the running step's).
"""

from __future__ import annotations

import torch

from vllm_readme.experts.eviction import NEVER, make_policy
from vllm_readme.experts.pool import PagePool


class Residency:
    def __init__(
        self,
        slot_table: torch.Tensor,
        pages: int,
        eviction: str,
        num_layers: int,
        num_experts: int,
        device: torch.device,
    ):
        """``slot_table``: the model's ``[layer, expert]`` table, on
        ``device`` (the pool's); every page starts absent."""
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.slot_table = slot_table
        self.slot_table.fill_(-1)
        # Where the cache writes residency: the model's table on a CPU; on a
        # GPU a host copy, because writing one element of a device tensor
        # from Python synchronises the host with the device (the write waits
        # for every queued kernel; benchmarks/gpu_sync_probe.py shows which
        # operations wait), which would stop the host from deciding the next
        # layers' loads ahead of the device.
        # Each layer's row then reaches the device as a small asynchronous
        # copy (slots).
        self.host_table = (
            slot_table if device.type == "cpu" else slot_table.new_full(slot_table.shape, -1, device="cpu")
        )
        self.rows_to_device = device.type == "cuda"
        self.pool = PagePool(pages, make_policy(eviction, next_use=self.next_use, ticks_per_step=num_layers))
        self.step_experts: frozenset[int] = frozenset()
        self.next_experts: frozenset[int] = frozenset()  # the next step's plan | step_experts, set once per step
        self.prefetched_unused: set[tuple[int, int]] = set()  # prefetched pages no layer has read yet

    def expect(self, step_experts: frozenset[int], next_plan: frozenset[int] | None) -> None:
        """The future for a step that starts: its experts, and the
        scheduler's plan for the next step (written when it scheduled this
        one; None without one)."""
        self.step_experts = step_experts
        self.next_experts = step_experts | (next_plan or frozenset())

    def next_use(self, page: tuple[int, int], clock: int) -> float:
        """Belady's knowledge: when ``page`` is next read, as a clock."""
        layer, expert = page
        step, now = divmod(clock, self.num_layers)
        if layer > now and expert in self.step_experts:
            return step * self.num_layers + layer
        if expert in self.next_experts:
            return (step + 1) * self.num_layers + layer
        return NEVER

    def allocate(self, pages: list, clock: int, loading: bool = False) -> list[tuple[tuple[int, int], int]]:
        """Slots for ``pages``, [(page, slot)]: fewer when the rest of the pool is pinned or loading."""
        out = []
        for page, slot, evicted in self.pool.allocate_many(pages, clock, loading=loading):
            if evicted is not None:
                self.host_table[evicted] = -1
                self.prefetched_unused.discard(evicted)
            out.append((page, slot))
        return out

    def loaded(self, page: tuple[int, int], slot: int) -> None:
        """``page`` is in ``slot``: layers read it from now on."""
        self.pool.loaded(page)
        self.host_table[page] = slot

    def slots(self, layer: int, expert_index: torch.Tensor) -> torch.Tensor:
        """Each token's slot in this layer, [T, 1]."""
        row = self.host_table[layer]
        if self.rows_to_device:
            # A snapshot of the row as decided now, copied without a sync; the
            # pinned block is not reused before the copy ran (torch's caching
            # host allocator records the copy).
            row = row.clone().pin_memory().to(expert_index.device, non_blocking=True)
        return torch.index_select(row, 0, expert_index).unsqueeze(-1)

    def resident_experts(self) -> frozenset[int]:
        """Experts whose page is resident (or arriving) in every layer."""
        pages = [0] * self.num_experts
        for _, expert in self.pool.slot_of:
            pages[expert] += 1
        return frozenset(e for e, n in enumerate(pages) if n == self.num_layers)
