# SPDX-License-Identifier: Apache-2.0
"""The expert cache's figures (docs/expert_cache.md): per step and in total,
the pages the layers found resident, loaded on demand or ahead, the bytes
loaded and the time the layers waited; two running means that the
scheduler's cost model reads; the Prometheus counters and the periodic log
line.

Plain Python: no vLLM, no torch. The counters' module
(model_executor/metrics.py) is imported when the cache starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# Under vLLM's "vllm" logger, so its handlers and level apply.
logger = logging.getLogger(f"vllm.{__name__}")


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

    def clear(self) -> None:
        """Every field back to its default, in place: the cache's per-layer
        path holds this object, so a step's end makes no new one."""
        self.__init__()

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def summary(self) -> dict:
        return {
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "hit_ratio": self.hit_ratio,
            "prefetch_accuracy": self.prefetch_used / max(1, self.prefetched),
        }


class CacheStatistics:
    """``now``, the running step's counts (the cache adds to it in place);
    ``total``, every ended step's. ``export``: this cache adds its steps to
    the Prometheus counters (every tensor-parallel rank's cache decides the
    same, and Prometheus sums processes, so one rank counts)."""

    def __init__(self, log_every: int, export: bool):
        self.log_every = log_every
        self.export = export
        self.now = CacheStats()
        self.total = CacheStats()
        self.page_load_ms = 0.0  # one page's read and write, a running mean (reported)
        self.stall_per_load_ms = 0.0  # what the layers waited per page loaded, a running mean (to the scheduler)
        self.counters = None

    def start_counters(self) -> None:
        from vllm_readme.model_executor.metrics import ExpertCacheCounters

        self.counters = ExpertCacheCounters()

    def timed_load(self, seconds: float) -> None:
        """A running mean of one page's load time (read, pack, write), for
        the scheduler's cost model; on a GPU the host's share only."""
        self.page_load_ms += 0.05 * (1000 * seconds - self.page_load_ms) if self.page_load_ms else 1000 * seconds

    def measure_stall(self) -> None:
        """The running step's wait per page loaded, into its running mean:
        what a load has cost the steps (with prefetch most of a load's time
        overlaps compute)."""
        loads = self.now.misses + self.now.prefetched
        if loads:
            waited = 1000 * self.now.stall_s / loads
            self.stall_per_load_ms += 0.1 * (waited - self.stall_per_load_ms) if self.stall_per_load_ms else waited

    def end_step(self, plan_seq: int | None) -> None:
        """The running step into the totals and the counters, a log line
        every ``log_every`` steps, and ``now`` cleared for the next step.
        ``plan_seq``: the number of the scheduler's plan that the step's
        prefetch followed; None when it followed the step's own experts."""
        now = self.now
        now.steps = 1
        self.total.add(now)
        if self.export:
            self.counters.record(now)
        if self.log_every and self.total.steps % self.log_every == 0:
            t = self.total
            logger.info(
                "expert cache: %d steps, hit ratio %.1f%% (last step %d/%d), %.1f MiB loaded, prefetch %d (%.0f%% "
                "used), stalled %.1f ms/step, next-step plan: %s",
                t.steps,
                100 * t.hit_ratio,
                now.hits,
                now.hits + now.misses,
                t.bytes_loaded / 2**20,
                t.prefetched,
                100 * t.prefetch_used / max(1, t.prefetched),
                1000 * t.stall_s / t.steps,
                f"the scheduler's (#{plan_seq})" if plan_seq is not None else "this step's experts",
            )
        now.clear()
