# SPDX-License-Identifier: Apache-2.0
"""The bookkeeping of a pool of expert slots (paper §4.3): which page holds
which slot, which slots are free, which pages a computation pins.

A page is one expert of one layer, ``(layer, expert)``; every layer shares
the pool. A page is *resident* (its weights are in its slot), *loading* (a
prefetch is writing its slot) or absent. Pinned pages are never evicted:
the caller pins what the layer being computed reads, so a wrong expert is
impossible, not unlikely; a loading page is never evicted either, since its
slot is being written. ``check()`` states the invariants (the property test
drives them through a long random workload).

Plain Python: no vLLM, no torch. The tensors live in experts/loader.py.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from vllm_readme.experts.eviction import EvictionPolicy


class PoolTooSmall(RuntimeError):
    """Every slot holds a page that may not be evicted."""


class PagePool:
    def __init__(self, capacity: int, policy: EvictionPolicy):
        if capacity < 1:
            raise ValueError(f"an expert pool needs at least one slot, got {capacity}.")
        self.capacity = capacity
        self.policy = policy
        self.slot_of: dict[Hashable, int] = {}  # resident or loading page -> slot
        self.page_in: list[Hashable | None] = [None] * capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self.loading: set[Hashable] = set()
        self.pinned: set[Hashable] = set()

    def __contains__(self, page: Hashable) -> bool:
        """Resident (loaded and readable)."""
        return page in self.slot_of and page not in self.loading

    def slot(self, page: Hashable) -> int:
        return self.slot_of[page]

    def touch(self, page: Hashable, clock: int) -> None:
        self.policy.touch(page, clock)

    def pin(self, pages: Iterable[Hashable]) -> None:
        self.pinned = set(pages)

    def allocate(self, page: Hashable, clock: int, loading: bool = False) -> tuple[int, Hashable | None]:
        """A slot for ``page`` (absent), evicting if the pool is full; returns
        (slot, evicted page or None). ``loading``: the slot is being written
        until ``loaded(page)``. Raises PoolTooSmall when every page is pinned
        or loading."""
        got = self.allocate_many([page], clock, loading=loading)
        if not got:
            raise PoolTooSmall("every page in the pool is pinned or loading: the pool is smaller than one step needs")
        _, slot, evicted = got[0]
        return slot, evicted

    def allocate_many(
        self, pages: list[Hashable], clock: int, loading: bool = False
    ) -> list[tuple[Hashable, int, Hashable | None]]:
        """Slots for ``pages`` (absent, in order): [(page, slot, evicted page
        or None)], free slots first, then victims chosen in one pass over the
        pool (not one per page: the per-layer work on a step that loads,
        docs/expert_cache.md); the pages asked for are never each other's
        victims. Fewer than asked when every other page is pinned or loading."""
        for page in pages:
            if page in self.slot_of:
                raise ValueError(f"page {page} already has slot {self.slot_of[page]}.")
        short = len(pages) - len(self.free)
        victims = []
        if short > 0:
            candidates = [p for p in self.slot_of if p not in self.loading and p not in self.pinned]
            victims = self.policy.victims(candidates, clock, short)
        out = []
        for page in pages:
            evicted = None
            if self.free:
                slot = self.free.pop()
            elif victims:
                evicted = victims.pop(0)
                slot = self.slot_of.pop(evicted)
                self.policy.forget(evicted)
            else:
                break
            self.slot_of[page] = slot
            self.page_in[slot] = page
            if loading:
                self.loading.add(page)
            out.append((page, slot, evicted))
        return out

    def loaded(self, page: Hashable) -> None:
        self.loading.discard(page)

    def cancel(self, page: Hashable) -> None:
        """A load that did not happen: the slot is free again."""
        slot = self.slot_of.pop(page)
        self.loading.discard(page)
        self.page_in[slot] = None
        self.free.append(slot)
        self.policy.forget(page)

    def check(self) -> None:
        """The invariants; raises AssertionError naming the broken one."""
        assert len(self.slot_of) + len(self.free) == self.capacity, "slots lost or duplicated"
        assert len(set(self.free)) == len(self.free), "a slot is free twice"
        assert not set(self.free) & set(self.slot_of.values()), "a free slot holds a page"
        for page, slot in self.slot_of.items():
            assert self.page_in[slot] == page, f"slot {slot} names {self.page_in[slot]}, table says {page}"
        for slot in self.free:
            assert self.page_in[slot] is None, f"free slot {slot} still names {self.page_in[slot]}"
        assert self.loading <= set(self.slot_of), "a loading page has no slot"
