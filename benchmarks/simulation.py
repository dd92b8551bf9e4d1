# SPDX-License-Identifier: Apache-2.0
"""Trace-driven replay of scheduling policies and expert pools, for the
benchmarks (benchmarks/routes.py, benchmarks/expert_cache_replay.py) and
tests/scheduler/test_scheduler_algorithms.py; the engine runs none of it.

Route traces (the expert of every prompt token and of every generated token
that is fed back, recorded from the real model on real text) plus arrival
steps are replayed step by step: admission in arrival order up to
``max_requests`` running, chunked prefill, one policy choosing each step's
requests (``policy.choose``, with the fairness bound), and, if given, a pool
of ``cache_capacity`` expert slots with an eviction policy. Each step's time
comes from the cost model. It runs in seconds, so policies and pool sizes can
be compared before either exists in the engine.

What a server can know of the future (for Belady): the routes of prompt
tokens not yet run, and for a decoding request only its next token's route
(``future="known"``); ``future="exact"`` uses the whole trace (the bound).

``ExpertPoolModel`` is a pool of slots as a replay sees it, and
``single_stream_hit_ratio`` the paper's Table 4 setting (one token at a
time). Plain Python over the package's policies (vllm_readme/experts/eviction.py,
vllm_readme/scheduler/policy.py, cost_model.py): no vLLM, no torch. Import it
as ``simulation`` with benchmarks/ on ``sys.path`` (a script here has it).
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections.abc import Iterable

from vllm_readme.experts.eviction import BELADY_DECAY, NEVER, EvictionPolicy, make_policy
from vllm_readme.scheduler.cost_model import StepCostModel
from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL, Candidate, HoldBackTracker, choose


class ExpertPoolModel:
    """A pool of ``capacity`` expert slots, as a replay sees it: which
    experts are resident, hits and misses per access."""

    def __init__(self, capacity: int, policy: EvictionPolicy):
        if capacity < 1:
            raise ValueError(f"expert pool capacity must be >= 1, got {capacity}.")
        self.capacity = capacity
        self.policy = policy
        self.resident: set[int] = set()
        self.hits = 0
        self.misses = 0

    def access(self, experts: Iterable[int], step: int) -> int:
        """One step needs ``experts`` (all pinned for the step); returns the
        number of loads (misses)."""
        needed = set(experts)
        if len(needed) > self.capacity:
            raise ValueError(
                f"a step needs {len(needed)} distinct experts but the pool holds {self.capacity}; "
                f"the pool must hold at least {len(needed)}."
            )
        loads = 0
        for expert in sorted(needed):
            if expert in self.resident:
                self.hits += 1
            else:
                self.misses += 1
                loads += 1
                if len(self.resident) >= self.capacity:
                    out = self.policy.victim(self.resident, needed, step)
                    self.resident.discard(out)
                    self.policy.forget(out)
                self.resident.add(expert)
            self.policy.touch(expert, step)
        return loads

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def single_stream_hit_ratio(
    routes: list[int], capacity: int, policy: str, lookahead: int | None = None, decay: float | None = None
) -> float:
    """The paper's Table 4 setting: one token at a time, one expert for all
    layers. ``lookahead``: how many future routes Belady may see (None =
    all of them, the exact-future bound); ``decay``: Belady's tie-break
    decay (default BELADY_DECAY; 0 breaks ties by recency alone)."""
    positions: dict[int, list[int]] = {}
    for i, e in enumerate(routes):
        positions.setdefault(e, []).append(i)

    def next_use(expert: int, step: int) -> float:
        uses = positions.get(expert, [])
        k = bisect.bisect_right(uses, step)
        if k == len(uses):
            return NEVER
        if lookahead is not None and uses[k] - step > lookahead:
            return NEVER
        return uses[k]

    chosen = make_policy(policy, next_use, decay=BELADY_DECAY if decay is None else decay)
    pool = ExpertPoolModel(capacity, chosen)
    for step, expert in enumerate(routes):
        pool.access([expert], step)
    return pool.hit_ratio


@dataclasses.dataclass
class TraceRequest:
    request_id: str
    arrival_step: int
    prompt_routes: list[int]
    output_routes: list[int]  # routes of generated tokens fed back, in order


@dataclasses.dataclass
class _Running:
    trace: TraceRequest
    arrival: int
    prefilled: int = 0
    decoded: int = 0

    @property
    def done(self) -> bool:
        return self.prefilled == len(self.trace.prompt_routes) and self.decoded == len(self.trace.output_routes)

    def next_tokens(self, chunk: int, max_experts: int | None) -> tuple[int, list[int]]:
        if self.prefilled < len(self.trace.prompt_routes):
            routes = self.trace.prompt_routes[self.prefilled : self.prefilled + chunk]
            if max_experts is not None:  # a chunk must fit the pool: cut it where it would not
                seen: set[int] = set()
                for i, e in enumerate(routes):
                    seen.add(e)
                    if len(seen) > max_experts:
                        routes = routes[:i]
                        break
            return len(routes), routes
        return 1, [self.trace.output_routes[self.decoded]]

    def advance(self, tokens: int) -> None:
        if self.prefilled < len(self.trace.prompt_routes):
            self.prefilled += tokens
        else:
            self.decoded += 1


@dataclasses.dataclass
class SimResult:
    policy: str
    steps: int
    tokens: int
    estimated_ms: float
    unique_experts_per_step: list[int]
    tokens_per_step: list[int]
    max_held_back: int
    held_back_steps: int
    hits: int = 0
    misses: int = 0

    @property
    def tokens_per_second(self) -> float:
        return 1000 * self.tokens / self.estimated_ms if self.estimated_ms else 0.0

    @property
    def mean_unique_experts(self) -> float:
        return statistics.fmean(self.unique_experts_per_step) if self.unique_experts_per_step else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def summary(self) -> dict:
        return {
            "policy": self.policy,
            "steps": self.steps,
            "tokens": self.tokens,
            "estimated_tokens_per_s": self.tokens_per_second,
            "mean_unique_experts_per_step": self.mean_unique_experts,
            "mean_tokens_per_step": self.tokens / self.steps if self.steps else 0.0,
            "max_held_back": self.max_held_back,
            "held_back_request_steps": self.held_back_steps,
            "hit_ratio": self.hit_ratio if self.hits + self.misses else None,
        }


def simulate(
    requests: list[TraceRequest],
    policy: str = "fcfs",
    cost_model: StepCostModel = DEFAULT_COST_MODEL,
    max_tokens: int = 2048,
    max_requests: int = 64,
    max_held_back: int = 4,
    chunk: int = 512,
    cache_capacity: int | None = None,
    eviction: str = "lru",
    future: str = "known",
    batch_tokens: int | None = None,
    max_steps: int = 1_000_000,
) -> SimResult:
    if future not in ("known", "exact"):
        raise ValueError(f"future must be 'known' or 'exact', got {future!r}.")
    pending = sorted(requests, key=lambda r: (r.arrival_step, r.request_id))
    running: dict[str, _Running] = {}
    tracker = HoldBackTracker()
    order = 0
    step = 0
    result = SimResult(policy, 0, 0, 0.0, [], [], 0, 0)

    def next_use(expert: int, now: int) -> float:
        """Steps until some running request needs ``expert`` (what the
        server knows, or the exact trace)."""
        best = NEVER
        for r in running.values():
            ahead = r.trace.prompt_routes[r.prefilled :]
            if future == "exact":
                ahead = ahead + r.trace.output_routes[r.decoded :]
            elif r.prefilled == len(r.trace.prompt_routes):
                ahead = r.trace.output_routes[r.decoded : r.decoded + 1]
            for offset, e in enumerate(ahead):
                if e == expert:
                    best = min(best, offset)
                    break
        return best

    pool = None
    if cache_capacity is not None:
        pool = ExpertPoolModel(cache_capacity, make_policy(eviction, next_use))
    while (pending or running) and step < max_steps:
        while pending and pending[0].arrival_step <= step and len(running) < max_requests:
            trace = pending.pop(0)
            running[trace.request_id] = _Running(trace, order)
            order += 1
        if not running:
            step = pending[0].arrival_step
            continue
        candidates, routes_of = [], {}
        for rid, r in running.items():
            tokens, routes = r.next_tokens(chunk, cache_capacity)
            routes_of[rid] = routes
            candidates.append(
                Candidate(rid, tokens, frozenset(routes), r.arrival, r.prefilled < len(r.trace.prompt_routes))
            )
            candidates[-1].held_back = tracker.get(rid)
        resident = pool.resident if pool is not None else None
        chosen = choose(
            policy,
            candidates,
            max_tokens,
            max_requests,
            max_held_back,
            cost_model,
            resident,
            batch_tokens,
            max_experts=cache_capacity,
        )
        tracker.update(running, chosen)
        experts = set().union(*(routes_of[rid] for rid in chosen))
        tokens = sum(len(routes_of[rid]) for rid in chosen)
        loads = pool.access(experts, step) if pool is not None and experts else 0
        result.estimated_ms += cost_model.step_ms(tokens, len(experts), loads)
        result.unique_experts_per_step.append(len(experts))
        result.tokens_per_step.append(tokens)
        result.tokens += tokens
        chosen_ids = set(chosen)
        held = [rid for rid in running if rid not in chosen_ids]
        result.held_back_steps += len(held)
        result.max_held_back = max([result.max_held_back] + [tracker.get(rid) for rid in held])
        for rid in chosen:
            running[rid].advance(len(routes_of[rid]))
            if running[rid].done:
                del running[rid]
                tracker.forget(rid)
        step += 1
        result.steps += 1
    if pool is not None:
        result.hits, result.misses = pool.hits, pool.misses
    return result
