# SPDX-License-Identifier: Apache-2.0
"""Which runnable requests run in the next engine step (paper §4.2).

Every candidate carries the experts its next tokens route to (Read-ME's
routes are known before the backbone runs). A policy picks a subset; the
rest are held back one step. Policies:

* ``fcfs``: arrival order (vLLM's own behaviour);
* ``decode-first`` / ``prefill-first``: the paper's two baselines;
* ``greedy-expert``: the paper's Algorithm 1: take the expert with the
  longest queue, add its requests while the step's token budget allows,
  repeat;
* ``cost-model``: add groups of requests while they raise tokens per
  estimated millisecond (``cost_model.StepCostModel``): a request whose
  experts are already in the step rides along almost free; a new expert is
  opened only when its tokens pay for reading it.

Fairness (``choose``): a candidate held back ``max_held_back`` consecutive
steps is taken first, oldest first, so no request waits more than
``max_held_back`` steps while the step has room for it, and none starves.
Candidates without routes (``experts is None``) are never held back.

Plain Python over plain data: no vLLM, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from vllm_readme.scheduler.cost_model import MIN_STEP_MS, StepCostModel

POLICIES = ("fcfs", "decode-first", "prefill-first", "greedy-expert", "cost-model")


@dataclasses.dataclass(eq=False)
class Candidate:
    request_id: str
    tokens: int  # tokens this step would run: 1 for a decode, the chunk for a prefill
    experts: frozenset[int] | None  # experts of those tokens; None = routes unknown
    arrival: int  # arrival order (FCFS key)
    is_prefill: bool = False
    held_back: int = 0  # consecutive steps runnable but not chosen


@dataclasses.dataclass
class Budget:
    """What a step may still hold: tokens, requests and (with an expert pool
    smaller than the model's experts) distinct experts."""

    tokens: int
    requests: int
    max_experts: int | None = None
    opened: set[int] = dataclasses.field(default_factory=set)

    def fits(self, candidate: Candidate) -> bool:
        if candidate.tokens > self.tokens or self.requests < 1:
            return False
        if self.max_experts is None or candidate.experts is None:
            return True
        return len(self.opened | candidate.experts) <= self.max_experts

    def take(self, candidate: Candidate) -> None:
        self.tokens -= candidate.tokens
        self.requests -= 1
        self.opened |= candidate.experts or set()

    def copy(self) -> Budget:
        return Budget(self.tokens, self.requests, self.max_experts, set(self.opened))


def choose(
    policy: str,
    candidates: Sequence[Candidate],
    max_tokens: int,
    max_requests: int,
    max_held_back: int,
    cost_model: StepCostModel | None = None,
    resident: set[int] | None = None,
    batch_tokens: int | None = None,
    max_experts: int | None = None,
) -> list[str]:
    """Request ids to run this step, in the order taken. ``max_experts``:
    distinct experts a step may touch (an expert pool's capacity)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown scheduling policy {policy!r}; choose one of {list(POLICIES)}.")
    budget = Budget(max_tokens, max_requests, max_experts)
    chosen: list[Candidate] = []
    forced = sorted(
        (c for c in candidates if c.experts is None or c.held_back >= max_held_back), key=lambda c: c.arrival
    )
    for c in forced:
        if budget.fits(c):
            budget.take(c)
            chosen.append(c)
    rest = [c for c in candidates if c.experts is not None and c.held_back < max_held_back]
    if policy == "fcfs":
        picked = _in_order(sorted(rest, key=lambda c: c.arrival), budget)
    elif policy in ("decode-first", "prefill-first"):
        first_prefill = policy == "prefill-first"
        picked = _in_order(sorted(rest, key=lambda c: (c.is_prefill != first_prefill, c.arrival)), budget)
    elif policy == "greedy-expert":
        if batch_tokens is not None:
            budget.tokens = min(budget.tokens, max(0, batch_tokens - sum(c.tokens for c in chosen)))
        picked = _greedy_by_expert(rest, budget)
    else:
        picked = _by_cost(rest, chosen, budget, cost_model or DEFAULT_COST_MODEL, resident)
    return [c.request_id for c in chosen + picked]


def _in_order(ordered: Iterable[Candidate], budget: Budget) -> list[Candidate]:
    picked = []
    for c in ordered:
        if budget.fits(c):
            budget.take(c)
            picked.append(c)
    return picked


def _greedy_by_expert(rest: list[Candidate], budget: Budget) -> list[Candidate]:
    """Algorithm 1: the expert with the longest queue (in tokens) first."""
    picked: list[Candidate] = []
    remaining = sorted(rest, key=lambda c: c.arrival)
    while remaining and budget.requests > 0:
        queue: dict[int, int] = {}
        for c in remaining:
            for e in c.experts:
                queue[e] = queue.get(e, 0) + c.tokens
        if not queue:
            break
        expert = max(queue, key=lambda e: (queue[e], -e))
        taken = [c for c in remaining if expert in c.experts and budget.fits(c)]
        if not taken:
            break
        for c in taken:
            if budget.fits(c):
                budget.take(c)
                picked.append(c)
        taken_ids = {id(c) for c in picked}
        remaining = [c for c in remaining if id(c) not in taken_ids]
    return picked


def _by_cost(
    rest: list[Candidate],
    chosen: list[Candidate],
    budget: Budget,
    model: StepCostModel,
    resident: set[int] | None,
) -> list[Candidate]:
    """Add the group of requests (same set of not-yet-opened experts) that
    gives the best tokens per estimated ms, while that ratio improves."""
    opened: set[int] = set().union(*(c.experts or () for c in chosen))
    tokens = sum(c.tokens for c in chosen)
    loads = len(opened - resident) if resident is not None else 0
    picked: list[Candidate] = []
    remaining = sorted(rest, key=lambda c: c.arrival)
    while remaining and budget.requests > 0:
        groups: dict[frozenset[int], list[Candidate]] = {}
        for c in remaining:
            groups.setdefault(frozenset(c.experts - opened), []).append(c)
        current = _tokens_per_ms(model, tokens, len(opened), loads)
        best, best_ratio = None, current
        for new, group in groups.items():
            take, spare = [], budget.copy()
            for c in group:
                if spare.fits(c):
                    spare.take(c)
                    take.append(c)
            if not take:
                continue
            t = tokens + sum(c.tokens for c in take)
            new_loads = len(new - resident) if resident is not None else 0
            ratio = _tokens_per_ms(model, t, len(opened) + len(new), loads + new_loads)
            if ratio > best_ratio or (ratio == best_ratio and best is not None and len(take) > len(best[1])):
                best, best_ratio = (new, take), ratio
        if best is None:
            break
        new, take = best
        for c in take:
            budget.take(c)
            picked.append(c)
        opened |= new
        tokens += sum(c.tokens for c in take)
        loads += len(new - resident) if resident is not None else 0
        taken_ids = {id(c) for c in take}
        remaining = [c for c in remaining if id(c) not in taken_ids]
    return picked


def _tokens_per_ms(model: StepCostModel, tokens: int, experts: int, loads: int) -> float:
    """Throughput of a step in the model; a step of tokens never counts as free
    (a model given from outside may not guarantee it)."""
    if not tokens:
        return 0.0
    return tokens / max(model.step_ms(tokens, experts, loads), MIN_STEP_MS)


class HoldBackTracker:
    """Counts, per request, consecutive steps it was runnable but not run."""

    def __init__(self):
        self.held_back: dict[str, int] = {}

    def get(self, request_id: str) -> int:
        return self.held_back.get(request_id, 0)

    def update(self, runnable: Iterable[str], chosen: Iterable[str], keep: Iterable[str] = ()) -> None:
        """``chosen`` ran (count reset); ``keep``: waited for another reason
        than the policy (count unchanged); the other runnable ones were held
        back one more step."""
        chosen, keep = set(chosen), set(keep)
        for request_id in runnable:
            if request_id in chosen:
                self.held_back[request_id] = 0
            elif request_id not in keep:
                self.held_back[request_id] = self.get(request_id) + 1

    def forget(self, request_id: str) -> None:
        self.held_back.pop(request_id, None)


# A default that only has to rank choices sensibly, shipped as package data; a
# machine's own figures come from `vllm-readme calibrate` or the online fit.
DEFAULT_COST_MODEL_FILE = Path(__file__).with_name("default_cost_model.json")
DEFAULT_COST_MODEL = StepCostModel.load(DEFAULT_COST_MODEL_FILE)
