# SPDX-License-Identifier: Apache-2.0
"""Which resident expert to evict when a slot is needed (paper §4.3).

One interface, four policies. Belady evicts the expert whose next use is
farthest in the future, which Read-ME can know because routes are computed
before the backbone runs; LRU, LFU and random are the baselines. Experts the
current step needs are passed as ``pinned`` and are never chosen: evicting
one mid-step would compute with the wrong weights.

Plain Python over hashable keys (expert ids in a replay, ``(layer,
expert)`` pages in the engine's pool, pool.py): no vLLM, no torch.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable

EVICTION_POLICIES = ("belady", "lru", "lfu", "random")
NEVER = float("inf")
# Belady's tie-break: a use's weight decays by this much per step (see Belady).
BELADY_DECAY = 0.98


class EvictionPolicy:
    name = "base"

    def touch(self, expert: int, step: int) -> None:
        """``expert`` was used at ``step``."""

    def forget(self, expert: int) -> None:
        """``expert`` left the pool."""

    def victim(self, resident: Iterable[int], pinned: set[int], step: int) -> int:
        candidates = [e for e in resident if e not in pinned]
        if not candidates:
            raise RuntimeError("every resident expert is pinned by this step: the pool is smaller than one step needs")
        return self._pick(candidates, step)

    def victims(self, candidates: list[int], step: int, count: int) -> list[int]:
        """Up to ``count`` experts to evict from ``candidates`` (none pinned),
        first victim first: the same experts, in the same order, as
        ``count`` calls of ``victim`` with each victim gone before the next
        (the keys do not change between them), in one pass."""
        return heapq.nsmallest(count, candidates, key=lambda e: self._key(e, step))

    def _key(self, expert: int, step: int):
        """Eviction order: the smallest key goes first."""
        raise NotImplementedError

    def _pick(self, candidates: list[int], step: int) -> int:
        return min(candidates, key=lambda e: self._key(e, step))


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self.last_use: dict[int, int] = {}

    def touch(self, expert, step):
        self.last_use[expert] = step

    def forget(self, expert):
        self.last_use.pop(expert, None)

    def _key(self, expert, step):
        return self.last_use.get(expert, -1), expert


class LFU(EvictionPolicy):
    """Least frequently used over the whole history (ties: least recent)."""

    name = "lfu"

    def __init__(self):
        self.uses: dict[int, int] = {}
        self.last_use: dict[int, int] = {}

    def touch(self, expert, step):
        self.uses[expert] = self.uses.get(expert, 0) + 1
        self.last_use[expert] = step

    def _key(self, expert, step):
        return self.uses.get(expert, 0), self.last_use.get(expert, -1), expert


class RandomEviction(EvictionPolicy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def _pick(self, candidates, step):
        return self.rng.choice(sorted(candidates))

    def victims(self, candidates, step, count):
        left, out = list(candidates), []
        for _ in range(min(count, len(left))):
            out.append(self._pick(left, step))
            left.remove(out[-1])
        return out


class Belady(LRU):
    """Farthest next use first. ``next_use(expert, step)`` is the caller's
    knowledge of the future (exact in an offline replay; in a server, the
    routes it has already computed); experts never used again go first.

    A decoding server knows little of the future (the next token's route),
    so most candidates tie at "no known use". Ties go to the expert with
    the lowest recency-weighted use count (each use counts 1, decaying by
    ``decay`` per step; LRFU), then the least recent: an expert used often
    lately is likely to be needed again soon. ``BELADY_DECAY`` was chosen
    on the routes of held-out documentation text and checked on English
    prose against breaking ties by recency alone (docs/expert_cache.md,
    "Hit ratios")."""

    name = "belady"

    def __init__(self, next_use: Callable[[int, int], float], decay: float = BELADY_DECAY):
        super().__init__()
        self.next_use = next_use
        self.decay = decay
        # Recency-weighted uses and the step they were last updated at; kept
        # when an expert leaves the pool, so one that comes back keeps its history.
        self.score: dict[int, tuple[float, int]] = {}

    def touch(self, expert, step):
        self.score[expert] = (self._weighted(expert, step) + 1.0, step)
        super().touch(expert, step)

    def _weighted(self, expert: int, step: int) -> float:
        score, at = self.score.get(expert, (0.0, step))
        return score * self.decay ** max(0, step - at)

    def _key(self, expert, step):
        return -self.next_use(expert, step), self._weighted(expert, step), self.last_use.get(expert, -1)


def make_policy(
    name: str,
    next_use: Callable[[int, int], float] | None = None,
    seed: int = 0,
    ticks_per_step: int = 1,
    decay: float = BELADY_DECAY,
) -> EvictionPolicy:
    """``ticks_per_step``: how many clock ticks the caller counts per step
    (the engine's pool ticks once per layer), so that Belady's tie-break
    (``decay`` per step) decays per step whatever the clock."""
    if name == "belady":
        if next_use is None:
            raise ValueError("Belady eviction needs the future: a next_use(expert, step) function.")
        return Belady(next_use, decay=decay ** (1 / ticks_per_step))
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "random":
        return RandomEviction(seed)
    raise ValueError(f"unknown eviction policy {name!r}; choose one of {list(EVICTION_POLICIES)}.")
