# SPDX-License-Identifier: Apache-2.0
"""The expert-aware scheduler inside vLLM's engine (paper §4.2).

Select it with ``--scheduler-cls``::

    vllm serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler        # sync (CPU)
    vllm serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareAsyncScheduler   # async (GPU default)

The policy is a mixin over vLLM's own scheduler (the pattern of vLLM's
``DiffusionAsyncScheduler``); each step it:

1. takes in the routes of the tokens that arrived since the last step
   (``route_source``): by default the model's own, which it publishes after
   each forward by KV slot (``ModelRouteSource``, model_routes.py); or its
   own copy of the router (``RouterCopySource``, routes_ahead.py), which
   routes prompts a bounded number of tokens per step and each new token
   before its step;
2. lists the running requests vLLM would consider, with the experts their
   next tokens route to, and lets ``policy.choose`` pick the step;
3. holds the others back one step the way vLLM's own schedulers do
   (``request.next_decode_eligible_step = current_step + 2``, through
   vllm_internals.py; never by removing a request from ``running``), then
   runs vLLM's ``schedule()``,
   which keeps admission, chunked prefill, preemption, prefix caching and
   the KV budget exactly as they are.

Without a cost model file the step costs are fitted online from the
engine's own steps (``cost_model.OnlineCostFit``), and the cost-model policy
holds nothing back, scheduling exactly as vLLM does, until a distinct expert
is measured to cost time. Anything that fails in the policy's own work is
logged once and the scheduler schedules as vLLM does from then on.

Admission of waiting requests stays vLLM's (FCFS or its priority order): the
policy orders the running set, where decode steps are formed. A model that is
not Read-ME, or a request with no routes, is scheduled exactly as vLLM does.

Sync vs async: with the router copy and the sync scheduler a sampled token
is routed before the ``schedule()`` that runs it. With the model's routes,
and under async scheduling with either, the policy uses the route of the
newest token it has (the previous token's route). How often that guess is
right is the model's route persistence, P[route_t == route_t-1], which the
refactoring report and benchmarks/routes.py measure, and which the
scheduler counts against the model's routes as they arrive.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import traceback
import types
from pathlib import Path

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_readme.options import ExpertCacheOptions, SchedulerOptions
from vllm_readme.scheduler.cost_model import OnlineCostFit, StepCostModel
from vllm_readme.scheduler.policy import Candidate, HoldBackTracker, choose
from vllm_readme.vllm_internals import (
    FreedRequestHook,
    decode_eligible_step,
    hold_back,
    kv_cache_groups,
    last_token_kv_slots,
    schedulable_requests,
    set_decode_eligible_step,
)

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger tree: its handler and level apply


class ExpertAwareMixin(FreedRequestHook):
    """The policy; mixed into vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.readme_options = SchedulerOptions.of(self.vllm_config)
        self.readme_cost_model = self.readme_options.load_cost_model()
        self.readme_held = HoldBackTracker()
        self.readme_stats = SchedulerStatsLog(
            self.readme_options.log_every, engine=self.vllm_config.parallel_config.data_parallel_index
        )
        # Without a cost model file the step costs are fitted from this
        # engine's own steps, and the cost-model policy keeps vLLM's order
        # until a distinct expert is measured to cost time.
        self.readme_cost_fit = OnlineCostFit() if self.readme_options.cost_model is None else None
        if self.readme_cost_fit is not None:
            self.readme_cost_model = StepCostModel(1.0, 0.0, 0.0, source="fitted online")  # until the first fit
            self.readme_stats.cost_fit = self.readme_cost_fit
        self.readme_arrival: dict[str, int] = {}
        self._readme_arrivals = 0
        self._readme_plan = None  # experts/plan.py: with an expert pool, or the model's routes
        self.readme_last_residency: tuple[frozenset[int], float] | None = None  # the cache's, last read
        self.readme_routes = _route_source(self)
        if self.readme_routes is not None:
            self.readme_stats.routes_summary = self.readme_routes.summary
        self.readme_check = None  # self_check.py: is the policy measured to pay against FCFS?
        if self.readme_routes is not None and self.readme_options.policy != "fcfs":
            if self.readme_options.self_check_window:
                from vllm_readme.scheduler.self_check import SelfCheck

                self.readme_check = SelfCheck(window=self.readme_options.self_check_window)
                self.readme_stats.self_check = self.readme_check
        if self.readme_routes is None:
            logger.info("vllm-readme scheduler: not a Read-ME model; scheduling exactly as vLLM does.")
            return
        if self.readme_cost_fit is not None:
            cost = (
                "fitted online from this engine's steps; scheduling in vLLM's order until a distinct expert is "
                "measured to cost time"
            )
        else:
            model = self.readme_cost_model
            cost = (
                f"{self.readme_options.cost_model} ({model.base_ms:.2f} ms + {model.per_token_ms:.3f} ms/token + "
                f"{model.per_expert_ms:.2f} ms/expert)"
            )
        logger.info(
            "vllm-readme scheduler: policy %s, a request waits at most %d step(s), cost model: %s, "
            "routes ahead from %s.",
            self.readme_options.policy,
            self.readme_options.max_held_back,
            cost,
            self.readme_routes.describe(),
        )
        has_pool = ExpertCacheOptions.of(self.vllm_config).pool_size() is not None
        if has_pool or isinstance(self.readme_routes, ModelRouteSource):
            from vllm_readme.experts.plan import PlanWriter, engine_id_of, expected_readers

            model_routes = isinstance(self.readme_routes, ModelRouteSource)
            parallel = self.vllm_config.parallel_config
            self._readme_plan = PlanWriter.create(
                self.vllm_config.model_config.hf_config.num_experts,
                engine_id_of(self.vllm_config),
                readers=expected_readers(
                    parallel.tensor_parallel_size * parallel.pipeline_parallel_size,
                    caches=has_pool,
                    routes=model_routes,
                ),
            )
            if isinstance(self.readme_routes, ModelRouteSource):
                self.readme_routes.plan = self._readme_plan
        if has_pool and self._readme_plan is not None:
            logger.info(
                "vllm-readme scheduler: publishing each step's expert plan to the expert cache; its cost model "
                "charges the experts the cache reports as not resident at what a load has cost its steps."
            )

    def shutdown(self) -> None:
        if getattr(self, "_readme_plan", None) is not None:
            if isinstance(self.readme_routes, ModelRouteSource):
                self.readme_routes.plan = None
            self._readme_plan.close()
            self._readme_plan = None
        super().shutdown()

    def _readme_guarded(self, bookkeeping, *args, what: str = "route bookkeeping") -> bool:
        """Everything the plugin adds degrades instead of stopping the engine:
        on an error the scheduler logs it once and schedules as vLLM does
        from then on (routes only order requests; outputs never depend on
        them). False when it failed."""
        try:
            bookkeeping(*args)
            return True
        except Exception:
            self._readme_give_up(what)
            return False

    def _readme_give_up(self, what: str, marked: dict | None = None) -> None:
        """Log the fault once, release every request this step marked to wait
        (``marked``: request -> its eligible step before), and leave the
        scheduling to vLLM from now on."""
        # The traceback as text: a record holding the exception would keep
        # this scheduler's frames, and with them the engine, alive as long
        # as any handler keeps the record.
        logger.error(
            "vllm-readme scheduler: %s failed; scheduling as vLLM does from now on.\n%s", what, traceback.format_exc()
        )
        for request, eligible_step in (marked or {}).items():
            set_decode_eligible_step(request, eligible_step)
        self.readme_routes = None

    # -- requests in and out ---------------------------------------------
    def add_request(self, request: Request) -> None:
        super().add_request(request)
        if self.readme_routes is not None and request.prompt_token_ids is not None:
            if request.request_id not in self.readme_arrival:
                self._readme_guarded(self._readme_add, request)

    def _readme_add(self, request: Request) -> None:
        self.readme_routes.add(request.request_id, list(request.prompt_token_ids))
        self.readme_arrival[request.request_id] = self._readme_arrivals
        self._readme_arrivals += 1

    def _readme_request_freed(self, request: Request) -> None:
        """Called by vLLM for every request it frees (FreedRequestHook)."""
        if self.readme_routes is not None:
            self._readme_guarded(self._readme_forget, request.request_id)

    def _readme_forget(self, request_id: str) -> None:
        self.readme_routes.release(request_id)
        self.readme_held.forget(request_id)
        self.readme_arrival.pop(request_id, None)

    # -- the step ----------------------------------------------------------
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        """vLLM's ``schedule()``, run exactly once per step, after the policy
        marked the requests it holds back. A fault anywhere in the policy's
        own work hands the step, and every later one, to vLLM's order."""
        if self.readme_routes is None:
            return super().schedule(throttle_prefills)
        started = time.perf_counter()
        marked: dict[Request, int] = {}
        try:
            decision = self._readme_decide(marked)
        except Exception:
            self._readme_give_up("the expert-aware policy", marked)
            decision = None
        if decision is None:
            return super().schedule(throttle_prefills)
        decided = time.perf_counter()
        output = super().schedule(throttle_prefills)
        resumed = time.perf_counter()
        try:
            self._readme_after_step(output, *decision, own_s=decided - started, resumed=resumed)
        except Exception:
            self._readme_give_up("the expert-aware policy's bookkeeping")
        return output

    def _readme_decide(self, marked: dict[Request, int]) -> tuple[list[Candidate], set[str]] | None:
        """Choose the step and mark the requests held back (recorded in
        ``marked`` as they are marked); None when the route source failed."""
        if not self._readme_guarded(self.readme_routes.catch_up, self.running):
            return None
        candidates = self._readme_candidates()
        cost_model, resident = self._readme_residency()
        policy = self._readme_policy(cost_model)
        by_id = {c.request_id: c for c in candidates}
        if policy == "fcfs":  # vLLM's order: nothing held back
            return candidates, set()
        chosen = set(
            choose(
                policy,
                candidates,
                max_tokens=self.max_num_scheduled_tokens,
                max_requests=self.max_num_running_reqs,
                max_held_back=self.readme_options.max_held_back,
                cost_model=cost_model,
                resident=resident,
            )
        )
        # Only the policy's choices hold a request back: a candidate without
        # routes that did not fit the policy's estimate of the budget (a
        # prefill whose whole chunk did not) is left to vLLM, which runs what
        # fits.
        held = {rid for rid, c in by_id.items() if rid not in chosen and c.experts is not None}
        for request in self.running:
            if request.request_id in held:
                marked.setdefault(request, decode_eligible_step(request))
                self._readme_hold_back(request)
        return candidates, held

    def _readme_hold_back(self, request: Request) -> None:
        hold_back(self, request)  # skipped by this step's schedule()

    def _readme_policy(self, cost_model: StepCostModel) -> str:
        """The policy for this step: FCFS in the self-check's FCFS windows,
        and for the cost-model policy with online costs while no expert cost
        is measured (the fit's per-expert cost, or the expert cache's loads)."""
        policy = self.readme_options.policy
        if self.readme_check is not None and not self.readme_check.uses_policy():
            return "fcfs"
        if policy == "cost-model" and self.readme_cost_fit is not None:
            fit = self.readme_cost_fit.latest
            if fit is None or not (fit.significant or cost_model.per_load_ms > 0):
                return "fcfs"
        return policy

    def _readme_after_step(
        self, output: SchedulerOutput, candidates: list[Candidate], held: set[str], own_s: float, resumed: float
    ) -> None:
        ran = output.num_scheduled_tokens
        if not self._readme_guarded(self.readme_routes.scheduled, self, ran):
            return
        by_id = {c.request_id: c for c in candidates}
        # A wait counts against the bound only when the policy held the
        # request back; one it chose that vLLM then did not run (no KV
        # blocks: vLLM preempts) keeps its count: it waited on vLLM, as under
        # vLLM's own scheduler, and stays first in line if it was.
        waited = [rid for rid in by_id if rid not in ran and rid not in held]
        self.readme_held.update(by_id, ran, keep=waited)
        own_s += time.perf_counter() - resumed  # ours, not vLLM's schedule()
        self.readme_stats.preemptions += len(output.preempted_req_ids or ())
        experts, experts_known = self._readme_step_experts(ran)
        self.readme_stats.step(
            experts,
            sum(ran.values()),
            len(ran),
            candidates,
            {rid: self.readme_held.get(rid) for rid in held},
            decision_s=own_s,
            experts_known=experts_known,
        )
        self._readme_follow_fit()
        self._readme_publish_plan(candidates)

    def _readme_follow_fit(self) -> None:
        """With online costs: the policy's model is the latest fit, its
        per-expert cost counted only while it is measured to be one."""
        model = self.readme_cost_fit.model() if self.readme_cost_fit is not None else None
        if model is not None:
            self.readme_cost_model = model

    def _readme_residency(self) -> tuple[StepCostModel, set[int] | None]:
        """With an expert cache: which experts are resident in every layer and
        what loading one costs (measured by the cache, experts/plan.py), so
        that the cost model charges a step for the experts it would load."""
        residency = self._readme_plan.residency() if self._readme_plan is not None else None
        if residency is None:
            return self.readme_cost_model, None
        resident, load_ms = residency
        self.readme_last_residency = residency
        return dataclasses.replace(self.readme_cost_model, per_load_ms=load_ms), set(resident)

    def _readme_publish_plan(self, candidates) -> None:
        """Tell the expert cache which experts the following step is likely
        to need: every candidate's latest routes, held back or not
        (experts/plan.py; Belady's future and the next-step prefetch)."""
        if self._readme_plan is not None:
            self._readme_plan.publish(set().union(*(c.experts or () for c in candidates)))

    def _readme_candidates(self) -> list[Candidate]:
        threshold = self.scheduler_config.long_prefill_token_threshold or self.max_num_scheduled_tokens
        out = []
        for request in schedulable_requests(self):  # vLLM itself skips the others this step
            rid = request.request_id
            remaining = request.num_tokens_with_spec - request.num_computed_tokens
            is_prefill = request.num_computed_tokens < request.num_prompt_tokens
            tokens = max(1, min(remaining, threshold, self.max_num_scheduled_tokens))
            out.append(
                Candidate(
                    request_id=rid,
                    tokens=tokens,
                    experts=self.readme_routes.experts(rid, request.num_computed_tokens, tokens, is_prefill),
                    arrival=self.readme_arrival.get(rid, -1),
                    is_prefill=is_prefill,
                    held_back=self.readme_held.get(rid),
                )
            )
        return out

    def _readme_step_experts(self, ran: dict[str, int]) -> tuple[set[int], bool]:
        """The distinct experts of the step's tokens, and whether every
        scheduled request's were known (a prompt without routes has none)."""
        experts: set[int] = set()
        known = True
        for rid, n in ran.items():
            request = self.requests.get(rid)
            if request is not None:
                start = request.num_computed_tokens - n
                routed = self.readme_routes.experts(rid, start, n, start < request.num_prompt_tokens)
                known = known and routed is not None
                experts |= routed or set()
        return experts, known

    def update_from_output(self, *args, **kwargs):
        outputs = super().update_from_output(*args, **kwargs)
        if self.readme_routes is not None:
            self._readme_guarded(self._readme_note_idle, what="the step statistics")
        return outputs

    def _readme_note_idle(self) -> None:
        # With nothing left to run the engine waits for requests before its
        # next schedule(): that wait is no step's cost.
        if not self.has_unfinished_requests():
            self.readme_stats.idle()


class ExpertAwareScheduler(ExpertAwareMixin, Scheduler):
    """vLLM's synchronous ``Scheduler`` (CPU, or ``--no-async-scheduling``)."""


class ExpertAwareAsyncScheduler(ExpertAwareMixin, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` (GPU default). A plain ``Scheduler``
    subclass under async scheduling misbehaves (vLLM PR #43724)."""


def _route_source(scheduler) -> RouterCopySource | ModelRouteSource | None:
    """Where routes ahead come from (``route_source``), or None for models
    that are not Read-ME."""
    vllm_config = scheduler.vllm_config
    hf_config = vllm_config.model_config.hf_config
    if getattr(hf_config, "model_type", None) != "readme":
        return None
    if scheduler.readme_options.route_source == "model":
        try:
            return ModelRouteSource(
                scheduler.kv_cache_config, hf_config.num_experts, engine=vllm_config.parallel_config.data_parallel_index
            )
        except ValueError as exc:
            logger.warning("vllm-readme scheduler: %s Scheduling as vLLM does.", exc)
            return None
    from vllm_readme.scheduler.routes_ahead import RouteTracker, load_router

    folder = Path(vllm_config.model_config.model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(folder), local_files_only=True))
    window = scheduler.readme_options.route_window
    tracker = RouteTracker(load_router(folder), window=window, initial_slots=vllm_config.scheduler_config.max_num_seqs)
    return RouterCopySource(tracker, window)


class RouterCopySource:
    """Routes ahead from the scheduler's own copy of the router
    (routes_ahead.py): prompts are routed at most ``tokens_per_step`` tokens
    per step, oldest first, so that a burst of long prompts cannot stall the
    decodes; each sampled token before the step that runs it (sync
    scheduler). A request whose prompt is not routed yet has no experts and
    is never held back."""

    tokens_per_step = 256

    def __init__(self, tracker, window: int):
        self.tracker = tracker
        self.window = window
        self.routed_last_step = 0  # prompt tokens routed in the latest step

    def describe(self) -> str:
        return f"the scheduler's router copy (last {self.window} tokens)"

    def __len__(self) -> int:
        return len(self.tracker)

    def add(self, request_id: str, prompt: list[int]) -> None:
        self.tracker.add(request_id, prompt, max_tokens=0)

    def release(self, request_id: str) -> None:
        self.tracker.release(request_id)

    def catch_up(self, running: list[Request]) -> None:
        """Route every token that reached a running request since last step."""
        new = {}
        for request in running:
            known = self.tracker.known(request.request_id)
            if known is not None and known < request.num_tokens:
                new[request.request_id] = request.all_token_ids[known : request.num_tokens]
        if new:
            self.tracker.extend(new)
        self.routed_last_step = self.tracker.route_backlog(self.tokens_per_step)

    def scheduled(self, scheduler, ran: dict[str, int]) -> None:
        pass

    def summary(self) -> str:
        return ""

    def experts(self, request_id: str, start: int, tokens: int, is_prefill: bool) -> frozenset[int] | None:
        routes = self.tracker.routes.get(request_id)
        if not routes or request_id in self.tracker.backlog:
            return None
        if start >= len(routes):  # async: the newest token is not routed yet; its predecessor's route
            return frozenset(routes[-1:])
        return frozenset(routes[start : start + tokens])


class ModelRouteSource:
    """Routes ahead from the model's own routes (model_routes.py): after each
    step the model publishes the route of every sequence's last token by KV
    slot; a decode is predicted to take its last token's expert. Prompts
    are not routed ahead (their candidates carry no experts, so the policy
    never holds them back)."""

    def __init__(self, kv_cache_config, num_experts: int, engine: int = 0):
        from vllm_readme.model_executor.route_publisher import ANCHOR_LAYER, MAX_PUBLISHED_EXPERTS
        from vllm_readme.scheduler.model_routes import ModelRouteBook

        if num_experts > MAX_PUBLISHED_EXPERTS:
            raise ValueError(
                f"route_source=model publishes one byte per route, this model has {num_experts} experts; "
                "use route_source=router."
            )

        self.book = ModelRouteBook()
        self.plan = None  # the scheduler's PlanWriter, set once created
        self.metrics = _prometheus(engine)
        self.group, self.block_size = _kv_group_of(kv_cache_config, ANCHOR_LAYER)

    def describe(self) -> str:
        return "the model's own routes of each request's last token (one token late)"

    def __len__(self) -> int:
        return len(self.book)

    def add(self, request_id: str, prompt: list[int]) -> None:
        self.book.add(request_id)

    def release(self, request_id: str) -> None:
        self.book.release(request_id)

    def catch_up(self, running: list[Request]) -> None:
        published = self.plan.model_routes() if self.plan is not None else None
        if published is not None:
            guessed, right = self.book.predicted, self.book.predicted_right
            self.book.receive(*published)
            if self.metrics and self.book.predicted > guessed:
                self.metrics.guesses.inc(self.book.predicted - guessed)
                self.metrics.guesses_right.inc(self.book.predicted_right - right)

    def scheduled(self, scheduler, ran: dict[str, int]) -> None:
        """Note the slot each scheduled request's last token is written to."""
        self.book.expect(last_token_kv_slots(scheduler, self.group, self.block_size, ran))

    def summary(self) -> str:
        """How often a decode's guessed route (its previous token's) was the
        model's route, since start."""
        book = self.book
        if not book.predicted:
            return ""
        return f"; previous-token routes right for {100 * book.predicted_right / book.predicted:.1f}% of decodes"

    def experts(self, request_id: str, start: int, tokens: int, is_prefill: bool) -> frozenset[int] | None:
        if is_prefill:
            return None
        route = self.book.get(request_id)
        return None if route is None else frozenset((route,))


def _kv_group_of(kv_cache_config, layer: str) -> tuple[int, int]:
    """(KV cache group, its block size) holding ``layer``."""
    for index, (layer_names, block_size) in enumerate(kv_cache_groups(kv_cache_config)):
        if layer in layer_names:
            return index, block_size
    raise ValueError(f"route_source=model: no KV cache group holds {layer!r}; use route_source=router.")


class SchedulerStatsLog:
    """Per-step figures of the policy: a log line every ``log_every`` steps
    and Prometheus metrics (``vllm_readme:scheduler_*``) of engine
    ``engine`` (its data-parallel rank)."""

    def __init__(self, log_every: int, engine: int = 0):
        self.log_every = log_every
        self.window = _Window()
        # Since start: steps that ran tokens, their distinct experts and tokens,
        # request-steps held back, the longest consecutive wait, preemptions.
        self.total_steps = self.total_unique = self.total_tokens = self.total_held = 0
        self.longest_wait = self.preemptions = 0
        # (tokens, scheduled requests, distinct experts, ms from this step's
        # schedule() to the next one's less this scheduler's own time): what
        # `vllm-readme calibrate` fits (scheduler/calibrate.py).
        self.samples: collections.deque = collections.deque(maxlen=100_000)
        self._pending: tuple | None = None
        self.metrics = _prometheus(engine)
        self.routes_summary = str  # the route source's figures for the log line ("" by default)
        self.self_check = None  # self_check.SelfCheck, when on
        self.cost_fit = None  # cost_model.OnlineCostFit, without a cost model file

    def idle(self) -> None:
        """The engine ran out of requests: the step now pending ends in a wait."""
        self._pending = None

    def step(
        self,
        experts: set[int],
        tokens: int,
        scheduled: int,
        candidates,
        held: dict[str, int],
        decision_s: float,
        experts_known: bool = True,
    ) -> None:
        now = time.perf_counter()
        if self._pending is not None:  # the previous step ran from its schedule() to this one
            p_tokens, p_requests, p_experts, p_started, p_known = self._pending
            # The step itself: the model's forward, vLLM's bookkeeping and
            # its schedule(), less this scheduler's own work, which the cost
            # model must not learn as step cost.
            self.samples.append((p_tokens, p_requests, p_experts, 1000 * (now - p_started - decision_s)))
            self.window.step_s += now - p_started
            if self.self_check is not None:
                self._record_self_check(p_tokens, now - p_started)
            if self.cost_fit is not None and p_known:  # a step with unknown experts would teach a wrong cost
                self._record_cost_fit(p_tokens, p_experts, self.samples[-1][-1], p_requests)
        self._pending = (tokens, scheduled, len(experts), now, experts_known) if tokens else None
        if tokens == 0:
            return
        all_experts = set().union(*(c.experts or () for c in candidates)) if candidates else set()
        w = self.window
        w.steps += 1
        w.unique += len(experts)
        w.unique_if_all += len(all_experts)
        w.tokens += tokens
        w.held += len(held)
        w.max_held = max([w.max_held, *held.values()])
        w.decision_s += decision_s
        self.total_steps += 1
        self.total_unique += len(experts)
        self.total_tokens += tokens
        self.total_held += len(held)
        self.longest_wait = max(self.longest_wait, w.max_held)
        if self.metrics:
            self.metrics.unique.observe(len(experts))
            self.metrics.tokens.observe(tokens)
            self.metrics.held.inc(len(held))
            self.metrics.own_seconds.inc(decision_s)
        if self.log_every and w.steps >= self.log_every:
            logger.info(
                "vllm-readme scheduler: last %d steps: %.2f unique experts/step (all runnable together: %.2f), "
                "%.1f tokens/step, %d request-steps held back (longest wait %d), own time %.2f ms/step "
                "(%.1f%% of the step)%s",
                w.steps,
                w.unique / w.steps,
                w.unique_if_all / w.steps,
                w.tokens / w.steps,
                w.held,
                w.max_held,
                1000 * w.decision_s / w.steps,
                100 * w.decision_s / w.step_s if w.step_s else 0.0,
                self.routes_summary(),
            )
            self.window = _Window()
            if self.cost_fit is not None and self.cost_fit.latest is not None:
                self._log_cost_fit(self.cost_fit.latest)

    def _record_cost_fit(self, tokens: int, experts: int, ms: float, requests: int) -> None:
        fit = self.cost_fit
        before = fit.latest
        fit.add(tokens, experts, ms, requests)
        latest = fit.refit()
        if latest is None:
            return
        if self.metrics:
            self.metrics.fit_per_expert.set(latest.per_expert_ms)
            self.metrics.fit_per_expert_se.set(latest.per_expert_se)
            self.metrics.fit_per_token.set(latest.per_token_ms)
            self.metrics.fit_active.set(float(latest.significant))
        if before is None or before.significant != latest.significant:
            self._log_cost_fit(latest)

    def _log_cost_fit(self, fit) -> None:
        logger.info(
            "vllm-readme scheduler: step cost fitted online: %s; %s.",
            fit.describe(),
            "a distinct expert costs time: the cost-model policy groups requests by expert"
            if fit.significant
            else "a distinct expert is not measured to cost time: scheduling in vLLM's order",
        )

    def _record_self_check(self, tokens: int, seconds: float) -> None:
        check = self.self_check
        verdict = check.policy_pays
        pairs = len(check.log_ratios)
        check.record(tokens, seconds)
        if self.metrics and check.ratio is not None:
            self.metrics.policy_vs_fcfs.set(check.ratio)
        if len(check.log_ratios) == check.pairs and (pairs < check.pairs or verdict != check.policy_pays):
            logger.info(
                "vllm-readme scheduler: self-check: the policy ran at %.2fx FCFS's throughput over the last %d "
                "pairs of %d-step windows; %s.",
                check.ratio,
                check.pairs,
                check.window,
                f"keeping the policy (an FCFS window every {check.reprobe} to re-check)"
                if check.policy_pays
                else f"running FCFS (the policy again for one window in every {check.reprobe})",
            )


class _Window:
    def __init__(self):
        self.steps = self.unique = self.unique_if_all = self.tokens = self.held = self.max_held = 0
        self.decision_s = self.step_s = 0.0


_METRICS: dict = {}


def _prometheus(engine: int = 0) -> types.SimpleNamespace | None:
    """The scheduler's Prometheus metrics of one engine, labelled ``engine``
    with its data-parallel rank as vLLM labels its own: each rank's
    scheduler runs in a process of its own, and the multi-process export
    (``vllm-readme serve`` sets PROMETHEUS_MULTIPROC_DIR so that they reach
    the server's /metrics) would otherwise add the ranks' series up. The
    metrics are made once per process."""
    if "all" not in _METRICS:
        try:
            from prometheus_client import Counter, Gauge, Histogram
        except ImportError:
            return None
        by_engine = ["engine"]
        _METRICS["all"] = types.SimpleNamespace(
            unique=Histogram(
                "vllm_readme:scheduler_unique_experts_per_step",
                "Distinct experts among the tokens the expert-aware scheduler ran in one step",
                by_engine,
                buckets=[float(b) for b in range(1, 65)],
            ),
            tokens=Histogram(
                "vllm_readme:scheduler_tokens_per_step",
                "Tokens the expert-aware scheduler ran in one step",
                by_engine,
                buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
            ),
            held=Counter(
                "vllm_readme:scheduler_held_back",
                "Runnable requests held back one step by the expert-aware scheduler",
                by_engine,
            ),
            own_seconds=Counter(
                "vllm_readme:scheduler_own_seconds",
                "Seconds the expert-aware scheduler spent on its own work (routes ahead, policy, bookkeeping)",
                by_engine,
            ),
            guesses=Counter(
                "vllm_readme:scheduler_route_guesses",
                "Decodes whose route the scheduler guessed from the previous token's (route_source=model)",
                by_engine,
            ),
            guesses_right=Counter(
                "vllm_readme:scheduler_route_guesses_right",
                "Of those, guesses the model's own route then confirmed",
                by_engine,
            ),
            policy_vs_fcfs=Gauge(
                "vllm_readme:scheduler_policy_vs_fcfs",
                "Self-check: the policy's measured throughput over FCFS's (windows taking turns; NaN: none yet)",
                by_engine,
                multiprocess_mode="mostrecent",
            ),
            fit_per_expert=Gauge(
                "vllm_readme:scheduler_fit_per_expert_ms",
                "Online step-cost fit: milliseconds a distinct expert adds to a step (NaN: no fit yet)",
                by_engine,
                multiprocess_mode="mostrecent",
            ),
            fit_per_expert_se=Gauge(
                "vllm_readme:scheduler_fit_per_expert_ms_se",
                "Online step-cost fit: standard error of the per-expert milliseconds",
                by_engine,
                multiprocess_mode="mostrecent",
            ),
            fit_per_token=Gauge(
                "vllm_readme:scheduler_fit_per_token_ms",
                "Online step-cost fit: milliseconds a token adds to a step",
                by_engine,
                multiprocess_mode="mostrecent",
            ),
            fit_active=Gauge(
                "vllm_readme:scheduler_fit_active",
                "1 while the fitted per-expert cost is significant and the cost-model policy may hold requests "
                "back; 0 while it schedules in vLLM's order",
                by_engine,
                multiprocess_mode="mostrecent",
            ),
        )
    label = str(engine)
    if label not in _METRICS:
        metrics = types.SimpleNamespace(
            **{name: metric.labels(engine=label) for name, metric in vars(_METRICS["all"]).items()}
        )
        for unmeasured in (metrics.fit_per_expert, metrics.fit_per_expert_se):
            unmeasured.set(float("nan"))
        metrics.policy_vs_fcfs.set(float("nan"))  # not 0: nothing is measured until a self-check compares
        _METRICS[label] = metrics
    return _METRICS[label]
