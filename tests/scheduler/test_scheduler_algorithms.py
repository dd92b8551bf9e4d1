# SPDX-License-Identifier: Apache-2.0
"""The scheduling and eviction algorithms on plain data (milliseconds, no
engine): policies, the fairness bound, the cost model, eviction, replay."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from vllm_readme.experts.eviction import make_policy
from vllm_readme.scheduler.cost_model import StepCostModel
from vllm_readme.scheduler.model_routes import ModelRouteBook
from vllm_readme.scheduler.policy import POLICIES, Candidate, choose

ROOT = Path(__file__).resolve().parents[2]


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass looks its module up while it is made
    spec.loader.exec_module(module)
    return module


simulation = _benchmark_module("simulation")
ExpertPoolModel, TraceRequest = simulation.ExpertPoolModel, simulation.TraceRequest
simulate, single_stream_hit_ratio = simulation.simulate, simulation.single_stream_hit_ratio


def decodes(experts: list[int]) -> list[Candidate]:
    return [Candidate(f"r{i}", 1, frozenset([e]), arrival=i) for i, e in enumerate(experts)]


def test_fcfs_takes_arrival_order_within_the_budget():
    cands = decodes([3, 1, 2, 0, 1])
    assert choose("fcfs", cands, max_tokens=100, max_requests=3, max_held_back=10) == ["r0", "r1", "r2"]


def test_decode_first_and_prefill_first_are_the_papers_baselines():
    cands = [Candidate("p", 5, frozenset([0, 1]), 0, is_prefill=True), *decodes([2, 3])]
    cands[1].arrival, cands[2].arrival = 1, 2
    assert choose("decode-first", cands, 100, 2, 10) == ["r0", "r1"]
    assert choose("prefill-first", cands, 100, 2, 10) == ["p", "r0"]


def test_greedy_by_expert_takes_the_longest_queue_first():
    # expert 2 has 3 requests, expert 0 has 2, expert 1 has 1
    cands = decodes([0, 2, 1, 2, 0, 2])
    assert choose("greedy-expert", cands, 100, 5, 10, batch_tokens=3) == ["r1", "r3", "r5"]
    assert choose("greedy-expert", cands, 100, 5, 10, batch_tokens=5) == ["r1", "r3", "r5", "r0", "r4"]


def test_cost_model_policy_groups_only_when_an_expert_costs_more_than_its_tokens_gain():
    cands = decodes([0, 0, 0, 0, 1, 2, 3])
    costly = StepCostModel(base_ms=1.0, per_token_ms=0.1, per_expert_ms=5.0)
    cheap = StepCostModel(base_ms=10.0, per_token_ms=0.1, per_expert_ms=0.01)
    assert choose("cost-model", cands, 100, 64, 10, cost_model=costly) == ["r0", "r1", "r2", "r3"]
    assert sorted(choose("cost-model", cands, 100, 64, 10, cost_model=cheap)) == sorted(c.request_id for c in cands)


def test_cost_model_policy_prefers_resident_experts_when_loads_cost():
    cands = decodes([0, 0, 1, 1])
    model = StepCostModel(base_ms=1.0, per_token_ms=0.1, per_expert_ms=0.1, per_load_ms=50.0)
    assert choose("cost-model", cands, 100, 64, 10, cost_model=model, resident={1}) == ["r2", "r3"]


def test_a_request_held_back_to_the_bound_is_taken_first():
    cands = decodes([0, 0, 0, 1])
    cands[3].held_back = 2
    costly = StepCostModel(base_ms=1.0, per_token_ms=0.1, per_expert_ms=50.0)
    assert "r3" not in choose("cost-model", cands, 100, 64, max_held_back=3, cost_model=costly)
    assert choose("cost-model", cands, 100, 64, max_held_back=2, cost_model=costly)[0] == "r3"


def test_unknown_policy_and_bad_cost_model_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown scheduling policy 'lifo'"):
        choose("lifo", decodes([0]), 10, 1, 1)
    with pytest.raises(ValueError, match="per_expert_ms must be a finite number >= 0"):
        StepCostModel(1.0, 0.1, -2.0)
    (tmp_path / "bad.json").write_text('{"base_ms": 1}')
    with pytest.raises(ValueError, match=r"missing \['per_expert_ms', 'per_token_ms'\]"):
        StepCostModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot be read"):
        StepCostModel.load(tmp_path / "absent.json")


def test_cost_model_fit_recovers_the_coefficients_and_round_trips(tmp_path):
    truth = StepCostModel(12.0, 0.4, 2.5)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        tokens, experts = rng.randint(1, 256), rng.randint(1, 8)
        samples.append((tokens, experts, truth.step_ms(tokens, experts) + rng.gauss(0, 0.05)))
    fitted = StepCostModel.fit(samples)
    assert fitted.base_ms == pytest.approx(12.0, abs=0.1)
    assert fitted.per_token_ms == pytest.approx(0.4, abs=0.01)
    assert fitted.per_expert_ms == pytest.approx(2.5, abs=0.05)
    fitted.save(tmp_path / "cost.json")
    assert StepCostModel.load(tmp_path / "cost.json") == fitted


def skewed_trace(n: int, seed: int, experts: int = 8, prompt: int = 24, output: int = 48) -> list[TraceRequest]:
    """Routes with persistence and a popular pair of experts, as real routes."""
    rng = random.Random(seed)
    weights = [8, 6, 2, 2, 1, 1, 1, 1][:experts]
    out = []
    for i in range(n):
        route, routes = rng.choices(range(experts), weights)[0], []
        for _ in range(prompt + output):
            if rng.random() > 0.6:
                route = rng.choices(range(experts), weights)[0]
            routes.append(route)
        out.append(TraceRequest(f"q{i}", rng.randint(0, 40), routes[:prompt], routes[prompt:]))
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_finishes_and_the_hold_back_bound_holds(policy):
    trace = skewed_trace(40, seed=1)
    costly = StepCostModel(base_ms=1.0, per_token_ms=0.05, per_expert_ms=20.0)
    result = simulate(trace, policy, costly, max_tokens=64, max_requests=16, max_held_back=3, chunk=16)
    expected = sum(len(r.prompt_routes) + len(r.output_routes) for r in trace)
    assert result.tokens == expected, "every token of every request must run exactly once"
    assert result.max_held_back <= 3


def test_on_skewed_routes_expert_aware_policies_touch_fewer_experts_per_step():
    trace = skewed_trace(64, seed=2)
    costly = StepCostModel(base_ms=1.0, per_token_ms=0.05, per_expert_ms=4.0)
    fcfs = simulate(trace, "fcfs", costly, max_requests=32, max_held_back=4, chunk=32)
    cost = simulate(trace, "cost-model", costly, max_requests=32, max_held_back=4, chunk=32)
    greedy = simulate(trace, "greedy-expert", costly, max_requests=32, max_held_back=4, chunk=32, batch_tokens=16)
    assert cost.mean_unique_experts < 0.8 * fcfs.mean_unique_experts
    assert greedy.mean_unique_experts < fcfs.mean_unique_experts
    assert cost.tokens_per_second > fcfs.tokens_per_second


def test_pinned_experts_are_never_evicted_and_a_too_small_pool_is_refused():
    pool = ExpertPoolModel(2, make_policy("lru"))
    pool.access([0, 1], 0)
    pool.access([1, 2], 1)  # 0 is the LRU and unpinned: it goes, never 1 or 2
    assert pool.resident == {1, 2}
    with pytest.raises(ValueError, match="needs 3 distinct experts but the pool holds 2"):
        pool.access([3, 4, 5], 2)


def test_belady_beats_lru_and_random_and_lookahead_bounds_it():
    rng = random.Random(3)
    routes, route = [], 0
    for _ in range(4000):
        if rng.random() > 0.3:
            route = rng.choices(range(8), [8, 6, 4, 3, 2, 2, 1, 1])[0]
        routes.append(route)
    for capacity in (2, 3, 4):
        belady = single_stream_hit_ratio(routes, capacity, "belady")
        lru = single_stream_hit_ratio(routes, capacity, "lru")
        rand = single_stream_hit_ratio(routes, capacity, "random")
        short = single_stream_hit_ratio(routes, capacity, "belady", lookahead=1)
        assert belady > lru and belady > rand
        assert short <= belady


@pytest.mark.parametrize("policy", POLICIES)
def test_with_a_pool_smaller_than_the_experts_no_step_exceeds_it_and_all_finish(policy):
    trace = skewed_trace(24, seed=4)
    result = simulate(trace, policy, max_requests=16, max_held_back=3, chunk=16, cache_capacity=2, eviction="belady")
    assert max(result.unique_experts_per_step) <= 2
    assert result.tokens == sum(len(r.prompt_routes) + len(r.output_routes) for r in trace)
    assert result.hits + result.misses > 0


def test_options_from_additional_config_and_environment(tmp_path):
    """The plugin's key wins over the environment; the environment fills
    what the key leaves out; the expert cache's fields are accepted."""
    from vllm_readme.options import ReadMEOptionsError, SchedulerOptions

    env = {"VLLM_README_POLICY": "greedy-expert", "VLLM_README_MAX_HELD_BACK": "7"}
    opts = SchedulerOptions.from_additional_config({"vllm_readme": {"max_held_back": 2, "eviction": "lru"}}, env=env)
    assert (opts.policy, opts.max_held_back) == ("greedy-expert", 2)
    assert SchedulerOptions.from_additional_config(None, env={}) == SchedulerOptions()
    cost = tmp_path / "cost.json"
    cost.write_text('{"base_ms": 1, "per_token_ms": 2, "per_expert_ms": 3}')
    loaded = SchedulerOptions.from_additional_config({"vllm_readme": {"cost_model": str(cost)}}, env={})
    assert loaded.load_cost_model().per_expert_ms == 3
    with pytest.raises(ReadMEOptionsError, match="must be a JSON object"):
        SchedulerOptions.from_additional_config({"vllm_readme": "cost-model"}, env={})
    with pytest.raises(ReadMEOptionsError, match="route_window must be >= 1"):
        SchedulerOptions.from_additional_config({"vllm_readme": {"route_window": 0}}, env={})


def test_model_route_book_matches_slots_to_requests():
    """route_source=model: published (slot, position, expert) triples reach
    the request whose newest token was written to that slot at that
    position; unknown slots, a slot reused at another position and finished
    requests are ignored, and an older step never overrides a newer one."""
    book = ModelRouteBook(keep_steps=2)
    for rid in "ab":
        book.add(rid)
    book.expect({100: ("a", 9), 200: ("b", 4)})
    book.expect({101: ("a", 10), 201: ("b", 5)})
    # The newer step's routes arrive first (async); slot 999 is nobody's.
    assert book.receive([101, 201, 999], [10, 5, 0], [3, 1, 2]) == 2
    assert book.receive([100, 200], [9, 4], [0, 0]) == 2  # then the older step's: matched, but not newer
    assert (book.get("a"), book.get("b"), book.get("c")) == (3, 1, None)
    assert book.latest["a"] == (10, 3)
    book.expect({102: ("a", 11), 202: ("b", 6)})
    assert book.receive([102], [40], [1]) == 0  # slot 102 at another position: someone else's token
    book.release("b")  # finished while its last step ran
    book.receive([102, 202], [11, 6], [2, 2])
    assert book.get("a") == 2 and book.get("b") is None and len(book) == 1 and "b" not in book
    assert (book.received, book.matched) == (8, 6)
    # a's route at 10 (3) was the guess for 11 (2): one prediction, wrong.
    assert (book.predicted, book.predicted_right) == (1, 0)
    book.expect({300: ("a", 12)})
    book.expect({301: ("a", 13)})
    book.expect({302: ("a", 14)})  # keep_steps=2: the note for slot 300 has aged out
    assert book.receive([300], [12], [1]) == 0 and book.get("a") == 2


def _drive(check, policy_ms: float, fcfs_ms: float, steps: int, tokens: int = 32) -> list[str]:
    """Steps of the given duration per mode; returns the mode of every step."""
    modes = []
    for _ in range(steps):
        modes.append(check.mode)
        check.record(tokens, (policy_ms if check.uses_policy() else fcfs_ms) / 1000)
    return modes


def test_self_check_falls_back_to_fcfs_when_the_policy_is_slower_and_keeps_probing():
    from vllm_readme.scheduler.self_check import SelfCheck

    check = SelfCheck(window=10, settle=2, pairs=3, margin=0.02, reprobe=4)
    modes = _drive(check, policy_ms=110, fcfs_ms=100, steps=400)
    assert not check.policy_pays and abs(check.ratio - 100 / 110) < 1e-9
    late = modes[100:]
    assert 0 < late.count("policy") / len(late) <= 0.3, "mostly FCFS, the policy retried now and then"
    # The machine changes: now the policy is faster; the probes notice.
    _drive(check, policy_ms=90, fcfs_ms=100, steps=400)
    assert check.policy_pays and check.ratio > 1


def test_self_check_keeps_a_policy_that_pays_or_ties():
    from vllm_readme.scheduler.self_check import SelfCheck

    for policy_ms in (95, 100, 101):  # faster, equal, within the 2 % margin
        check = SelfCheck(window=10, settle=2, pairs=3, margin=0.02, reprobe=4)
        modes = _drive(check, policy_ms=policy_ms, fcfs_ms=100, steps=400)
        assert check.policy_pays, policy_ms
        assert modes[200:].count("policy") / 200 >= 0.7
    with pytest.raises(ValueError, match="longer than its settling"):
        SelfCheck(window=4, settle=4)
