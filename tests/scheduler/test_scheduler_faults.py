# SPDX-License-Identifier: Apache-2.0
"""Nothing the expert-aware scheduler adds may take the engine down, stall
it, or make its default slower than vLLM's own order.

* cost files must be finite and give a step positive time; a fit never
  gives one that is not;
* a fault anywhere in the policy's step (here: ``choose`` raising, or a
  fault between two hold-back marks) degrades to vLLM's order with one log
  line, and no request stays marked;
* without a cost file the step costs are fitted online, and the policy
  keeps vLLM's order until a distinct expert is measured to cost time;
* the router copy routes prompts in bounded chunks and a bounded number of
  tokens per step.
"""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from test_scheduler_engine import KV_TIGHT, expensive_experts, reference, run, workload  # noqa: F401 (fixtures)

from vllm_readme.options import ReadMEOptionsError, SchedulerOptions
from vllm_readme.scheduler import vllm_scheduler
from vllm_readme.scheduler.cost_model import CostFit, OnlineCostFit, StepCostModel
from vllm_readme.scheduler.policy import Candidate, choose
from vllm_readme.scheduler.routes_ahead import RouteTracker, load_router

# -- cost files and fits ------------------------------------------------------


@pytest.mark.parametrize(
    "coefficients,field",
    [
        ({"base_ms": 0.0, "per_token_ms": 0.0, "per_expert_ms": 1.0}, "base_ms + per_token_ms"),
        ({"base_ms": float("nan"), "per_token_ms": 0.5, "per_expert_ms": 1.0}, "base_ms"),
        ({"base_ms": 15.0, "per_token_ms": float("inf"), "per_expert_ms": 1.0}, "per_token_ms"),
        ({"base_ms": 15.0, "per_token_ms": 0.5, "per_expert_ms": float("-inf")}, "per_expert_ms"),
        ({"base_ms": 15.0, "per_token_ms": 0.5, "per_expert_ms": 1.0, "per_load_ms": float("nan")}, "per_load_ms"),
        ({"base_ms": True, "per_token_ms": 0.5, "per_expert_ms": 1.0}, "base_ms"),
    ],
)
def test_cost_files_without_a_finite_positive_step_time_are_refused(tmp_path, coefficients, field):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(coefficients))  # writes NaN / Infinity, which json reads back
    with pytest.raises(ReadMEOptionsError) as info:
        SchedulerOptions.from_additional_config({"vllm_readme": {"cost_model": str(path)}})
    message = str(info.value)
    assert str(path) in message and field in message, message
    assert "vllm-readme calibrate" in message  # the fix


def test_a_fit_never_gives_a_step_no_time():
    """Steps measured at 0 ms (a clock that did not move) fit to the floor,
    not to a model in which a step is free."""
    model = StepCostModel.fit([(t, 1 + t % 3, 0.0) for t in range(1, 20)])
    assert model.step_ms(1, 1) > 0
    candidates = [Candidate(str(i), 1, frozenset({i % 4}), i) for i in range(8)]
    assert len(choose("cost-model", candidates, 64, 8, 4, cost_model=model)) == 8


class FreeSteps:
    """A cost model (a dependency of the policy) in which every step is free."""

    per_load_ms = 0.0

    def step_ms(self, tokens: int, experts: int, loads: int = 0) -> float:
        return 0.0


def test_the_cost_policy_survives_a_model_whose_step_takes_no_time():
    candidates = [Candidate(str(i), 1, frozenset({i % 4}), i) for i in range(8)]
    chosen = choose("cost-model", candidates, 64, 8, 4, cost_model=FreeSteps())
    assert sorted(chosen) == sorted(c.request_id for c in candidates)


# -- the online fit (plain Python) ----------------------------------------------


def synthetic_steps(per_expert_ms: float, seed: int, steps: int = 600, noise_ms: float = 2.0):
    """Decode-like steps: tokens 1..64, distinct experts growing with tokens
    but not determined by them, time = 20 + 0.5/token + per_expert + noise."""
    rng = random.Random(seed)
    for _ in range(steps):
        tokens = rng.randint(1, 64)
        experts = min(8, rng.randint(1, 1 + tokens // 4))
        yield tokens, experts, 20.0 + 0.5 * tokens + per_expert_ms * experts + rng.gauss(0.0, noise_ms)


def batched_decodes(per_expert_ms: float, seed: int, steps: int = 600):
    """Decode steps of a batch of 1..64 requests, each on one of 4 experts at
    random: experts saturate as the batch grows while the time per token
    falls (time grows as the square root of the batch), as in a real engine."""
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.randint(1, 64)
        experts = len({rng.randrange(4) for _ in range(batch)})
        yield batch, experts, 30.0 + 40.0 * math.sqrt(batch) + per_expert_ms * experts + rng.gauss(0.0, 2.0), batch


def fed(fit: OnlineCostFit, steps) -> CostFit:
    """Each step added and the fit refitted, as the scheduler does."""
    for step in steps:
        fit.add(*step)
        fit.refit()
    return fit.latest


def distinct_decodes(n: int = 8) -> list[Candidate]:
    return [Candidate(str(i), 1, frozenset({i}), i) for i in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_experts_that_cost_nothing_are_not_significant_and_keep_vllms_order(seed):
    fit = OnlineCostFit()
    latest = fed(fit, synthetic_steps(0.0, seed))
    assert latest is not None and not latest.significant, latest
    assert latest.per_token_ms == pytest.approx(0.5, abs=0.05)
    # The policy with the fitted model takes every candidate, in arrival order.
    candidates = distinct_decodes()
    assert choose("cost-model", candidates, 64, 8, 4, cost_model=fit.model()) == [c.request_id for c in candidates]


@pytest.mark.parametrize("seed", range(5))
def test_experts_that_cost_time_are_significant_and_fitted(seed):
    fit = OnlineCostFit()
    latest = fed(fit, synthetic_steps(3.0, seed))
    assert latest.significant, latest
    assert latest.per_expert_ms == pytest.approx(3.0, abs=4 * latest.per_expert_se)
    assert latest.per_expert_ms == pytest.approx(3.0, rel=0.15)
    assert fit.model().per_expert_ms == latest.per_expert_ms
    assert fit.model().step_ms(8, 8) - fit.model().step_ms(8, 1) == pytest.approx(7 * latest.per_expert_ms)


@pytest.mark.parametrize("seed", range(5))
def test_an_expert_cost_too_small_to_pay_for_holding_back_keeps_vllms_order(seed):
    """Measured beyond doubt (many standard errors above 0) but a few percent
    of a step: grouping could save at most that, and each request it holds
    back waits a whole step, so the policy stays out of the way."""
    fit = OnlineCostFit()
    latest = fed(fit, synthetic_steps(0.4, seed, noise_ms=0.3))
    assert latest.per_expert_ms > 10 * latest.per_expert_se, latest  # the cost itself is significant
    assert not latest.significant, latest
    candidates = distinct_decodes()
    assert choose("cost-model", candidates, 64, 8, 4, cost_model=fit.model()) == [c.request_id for c in candidates]


@pytest.mark.parametrize("seed", range(5))
def test_time_that_grows_slower_than_the_batch_is_not_read_as_an_expert_cost(seed):
    """Experts saturate as the batch grows while the time per token falls: a
    straight line through every step reads that curvature as about 20 ms per
    distinct expert although experts cost nothing here. Compared only between
    steps of the same batch, experts are free, and vLLM's order stays."""
    latest = fed(OnlineCostFit(), batched_decodes(0.0, seed))
    assert not latest.significant, latest
    assert abs(latest.per_expert_ms) < 3 * latest.per_expert_se, latest


@pytest.mark.parametrize("seed", range(5))
def test_an_expert_cost_under_a_curved_batch_cost_is_still_measured(seed):
    latest = fed(OnlineCostFit(), batched_decodes(12.0, seed))
    assert latest.significant, latest
    assert latest.per_expert_ms == pytest.approx(12.0, abs=4 * latest.per_expert_se)


def test_the_verdict_must_hold_over_persist_refits_and_ends_at_once():
    """Experts turn costly mid-run: a fit that must see the cost at 64
    refits running turns on 63 steps after one that trusts a single refit,
    and both turn off at the same step once experts are free again."""
    steps = [*synthetic_steps(0.0, seed=3, steps=300), *synthetic_steps(12.0, seed=4, steps=400)]
    steps += list(synthetic_steps(0.0, seed=5, steps=900))
    eager, patient = OnlineCostFit(persist=1), OnlineCostFit(persist=64)
    eager_on = [bool(fed(eager, [step]) and eager.latest.significant) for step in steps]
    patient_on = [bool(fed(patient, [step]) and patient.latest.significant) for step in steps]
    assert True in eager_on and not any(eager_on[:300])
    first = eager_on.index(True)
    assert patient_on.index(True) == first + 63 and eager_on[first : first + 64] == [True] * 64
    assert len(eager_on) - eager_on[::-1].index(True) == len(patient_on) - patient_on[::-1].index(True)


def test_the_fit_needs_enough_steps_drops_bad_times_and_forgets_old_ones():
    fit = OnlineCostFit(window=128, min_samples=64)
    for tokens, experts, ms in synthetic_steps(3.0, seed=1, steps=63):
        fit.add(tokens, experts, ms)
    fit.add(5, 2, float("nan"))
    fit.add(5, 2, -1.0)
    assert fit.refit() is None and fit.model() is None
    # Experts now free: once the window holds only new steps the verdict flips.
    for step in synthetic_steps(0.0, seed=2, steps=400):
        fit.add(*step)
    assert len(fit.samples) == 128 and not fit.refit().significant


def test_steps_where_experts_move_with_tokens_cannot_measure_an_expert_cost():
    """One new expert per decode: tokens and experts tell nothing apart."""
    fit = OnlineCostFit()
    for tokens in list(range(1, 9)) * 20:
        fit.add(tokens, tokens, 10.0 + 2.0 * tokens)
    latest = fit.refit()
    assert not latest.significant and math.isinf(latest.per_expert_se)
    assert fit.model().step_ms(4, 4) > 0


# -- the scheduler in a real engine ---------------------------------------------


def test_a_policy_that_raises_mid_run_degrades_to_vllms_order(
    tiny_gqa,
    tmp_path,
    reference,  # noqa: F811 (a fixture)
    expensive_experts,  # noqa: F811 (a fixture)
    monkeypatch,
    caplog,
):
    """``choose`` raises from its fifth call on (costly experts, so that the
    policy runs every step): one log line, then vLLM's order; no request is
    lost and the greedy outputs equal vLLM's scheduler's."""
    calls = {"n": 0}
    real_choose = vllm_scheduler.choose

    def failing_choose(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 5:
            raise ZeroDivisionError("injected policy fault")
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(vllm_scheduler, "choose", failing_choose)
    with caplog.at_level("ERROR"):
        outputs, stats = run(tiny_gqa, tmp_path, "cost-model", kv_bytes=KV_TIGHT, cost_model=str(expensive_experts))
    assert calls["n"] == 5, "the policy ran again after it failed"
    assert stats["routes_left"] is None, "the scheduler kept its routes after the fault"
    assert outputs == reference
    faults = [r for r in caplog.records if "scheduling as vLLM does from now on" in r.getMessage()]
    assert len(faults) == 1, [r.getMessage() for r in faults]
    assert "the expert-aware policy failed" in faults[0].getMessage()
    assert "ZeroDivisionError: injected policy fault" in faults[0].getMessage()  # with its traceback


def test_a_fault_between_hold_back_marks_leaves_no_request_held(
    tiny_gqa,
    tmp_path,
    reference,  # noqa: F811 (a fixture)
    expensive_experts,  # noqa: F811 (a fixture)
):
    """A fault after the policy marked one request to wait and before it
    marked the next: the step is vLLM's, with every runnable request in it."""
    state = {"steps": 0, "armed": False, "fault_step": None, "left_marked": None}

    def observe(scheduler):
        state["steps"] += 1
        if state["fault_step"] is not None and state["left_marked"] is None:
            state["left_marked"] = [
                r.request_id for r in scheduler.running if r.next_decode_eligible_step > scheduler.current_step
            ]
        if state["steps"] == 4 and scheduler.readme_routes is not None:
            mark = scheduler._readme_hold_back

            def mark_then_fail(request):  # fault injected into the step's marking
                mark(request)
                if state["armed"]:
                    state["fault_step"] = scheduler.current_step + 1
                    raise RuntimeError("injected fault between two marks")
                state["armed"] = True

            scheduler._readme_hold_back = mark_then_fail

    outputs, stats = run(
        tiny_gqa,
        tmp_path,
        "cost-model",
        kv_bytes=KV_TIGHT,
        observe=observe,
        cost_model=str(expensive_experts),
        max_held_back=4,
    )
    assert state["fault_step"] is not None, "the policy never held two requests back in a step"
    assert state["left_marked"] == [], "a request marked before the fault stayed held back"
    assert stats["routes_left"] is None and outputs == reference


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_default_options_keep_vllms_order_when_experts_cost_nothing(tiny_gqa, tmp_path, monkeypatch):
    """No option but the scheduler class: costs are fitted online from the
    engine's steps; on the tiny model on a CPU a distinct expert is not
    measured to cost time, so the policy never runs (vLLM's order, nothing
    held back) and the outputs are vLLM's."""
    requests = [(prompt, 3 * max_tokens) for prompt, max_tokens in workload(12, seed=4)]
    fits = []
    policy_calls = []
    real_choose = vllm_scheduler.choose

    def counted_choose(*args, **kwargs):  # observes, then runs the real policy
        policy_calls.append(args[0])
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(vllm_scheduler, "choose", counted_choose)

    def observe(scheduler):
        fits.append(scheduler.readme_cost_fit.latest)

    expected, _ = run(tiny_gqa, tmp_path, None, kv_bytes=KV_TIGHT, requests=requests)
    lines, logger = LogLines(), vllm_scheduler.logger
    level = logger.level
    logger.addHandler(lines)  # on the scheduler's own logger: vLLM's logging config may not pass INFO upwards
    logger.setLevel(logging.INFO)
    try:
        outputs, stats = run(tiny_gqa, tmp_path, "cost-model", kv_bytes=KV_TIGHT, observe=observe, requests=requests)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert outputs == expected and stats["held"] == 0
    assert policy_calls == [], f"the policy ran {len(policy_calls)} times: not vLLM's order"
    assert any("cost model: fitted online from this engine's steps" in line for line in lines.messages), lines.messages
    fitted = [f for f in fits if f is not None]
    assert len(fitted) > 16, f"the engine ran {len(fits)} steps, too few for the fit to be tested"
    assert not any(f.significant for f in fitted), fitted[-1]


# -- the router copy: bounded memory and work per step -------------------------


def windowed_routes(router, token_ids: list[int], window: int) -> list[int]:
    """The router over the whole sequence at once, every token attending to
    the ``window`` positions up to itself (the reference the copy must equal)."""
    t = len(token_ids)
    distance = torch.arange(t)[:, None] - torch.arange(t)[None]
    band = (distance >= 0) & (distance < window)
    mask = torch.zeros(t, t).masked_fill(~band, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        x = router.embed_tokens(torch.tensor([token_ids]))
        position_embeddings = router.rotary_emb(x, torch.arange(t)[None])
        for layer in router.layers:
            x = layer(x, position_embeddings, mask)
        return router.expert_head(router.norm(x)).argmax(-1)[0].tolist()


@pytest.mark.parametrize("checkpoint,length", [("tiny_gqa", 4096), ("tiny_mha", 1024)])
def test_a_long_prompt_is_routed_in_bounded_chunks_as_the_windowed_router_does(checkpoint, length, request):
    """A long prompt through a 48-token window, 100 tokens per step in chunks
    of 32: every route equals the windowed router over the whole sequence,
    and no call routes more than its budget."""
    router = load_router(request.getfixturevalue(checkpoint))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, router.embed_tokens.num_embeddings, (length,), generator=g).tolist()
    short = prompt[:40]
    tracker = RouteTracker(router, window=48, initial_slots=1, chunk=32)
    tracker.add("long", prompt, max_tokens=0)
    tracker.add("short", short[:10])  # routed at once (no budget given)
    assert tracker.routes["long"] == [] and len(tracker.routes["short"]) == 10
    per_call = []
    while tracker.backlog:
        # A decode of the short request each step, while the long prompt waits its turn.
        tracker.extend({"short": short[tracker.known("short") : tracker.known("short") + 1]})
        per_call.append(tracker.route_backlog(100))
    assert max(per_call) == 100 and sum(per_call) == length
    assert tracker.routes["short"] == windowed_routes(router, short[: len(tracker.routes["short"])], 48)
    # Decodes after the long prompt keep matching (a route depends on earlier tokens only).
    tail = torch.randint(0, router.embed_tokens.num_embeddings, (60,), generator=g).tolist()
    for token in tail:
        tracker.extend({"long": [token]})
    assert tracker.routes["long"] == windowed_routes(router, prompt + tail, 48)


def test_a_request_whose_prompt_is_not_routed_yet_is_never_held_back(tiny_gqa):
    source = vllm_scheduler.RouterCopySource(RouteTracker(load_router(tiny_gqa), window=16, initial_slots=2), 16)
    source.add("a", list(range(1, 40)))
    assert source.experts("a", 0, 39, True) is None and len(source.tracker.routes["a"]) == 0
    source.tracker.route_backlog(20)
    assert source.experts("a", 0, 20, True) is None  # half routed: still none
    source.tracker.route_backlog(20)
    assert source.experts("a", 0, 39, True) is not None


def test_router_copy_in_the_engine_routes_a_bounded_number_of_tokens_per_step(
    tiny_gqa,
    tmp_path,
    reference,  # noqa: F811 (a fixture)
    expensive_experts,  # noqa: F811 (a fixture)
    monkeypatch,
):
    """route_source=router with 16 prompt tokens per step (prompts of up to
    60 tokens arrive six at a time): no step routes more, every prompt is
    routed in the end, the policy still acts, and the outputs are vLLM's."""
    monkeypatch.setattr(vllm_scheduler.RouterCopySource, "tokens_per_step", 16)
    per_step = []

    def observe(scheduler):
        per_step.append(scheduler.readme_routes.routed_last_step)

    outputs, stats = run(
        tiny_gqa,
        tmp_path,
        "cost-model",
        kv_bytes=KV_TIGHT,
        observe=observe,
        cost_model=str(expensive_experts),
        max_held_back=2,
        route_source="router",
    )
    assert outputs == reference
    assert max(per_step) == 16 and per_step.count(16) >= 3, per_step  # prompts did wait for their turn
    assert stats["held"] > 0 and stats["longest_wait"] <= 2 and stats["routes_left"] == 0


def test_the_online_fit_learns_from_steps_with_known_experts_and_no_idle_wait():
    """A step followed by an idle wait (no requests left) and a step whose
    experts were not all known (a prompt without routes) teach the fit
    nothing; the calibration samples still keep the latter."""
    stats = vllm_scheduler.SchedulerStatsLog(log_every=0)
    stats.cost_fit = OnlineCostFit(window=8, min_samples=4)
    stats.step({1}, 4, 4, [], {}, decision_s=0.0)
    stats.idle()  # the engine ran out of requests after that step
    stats.step({1, 2}, 9, 2, [], {}, decision_s=0.0, experts_known=False)
    stats.step({1}, 1, 1, [], {}, decision_s=0.0)
    stats.step({2}, 1, 1, [], {}, decision_s=0.0)
    assert [s[0] for s in stats.samples] == [9, 1]
    assert [s[0] for s in stats.cost_fit.samples] == [1.0]
