# SPDX-License-Identifier: Apache-2.0
"""The expert-aware scheduler in a real vLLM engine (tiny Read-ME model).

One workload for every policy: prompts of different lengths, more arriving
while the first decode, different output lengths, and a KV budget small
enough that vLLM must preempt. Greedy outputs must equal vLLM's own
scheduler's, every request must finish, and no request may wait longer than
the bound.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import vllm_engine

from vllm_readme.scheduler.routes_ahead import RouteTracker, load_router

SCHEDULER = "vllm_readme.scheduler.ExpertAwareScheduler"
# Prompt lengths 3..60 tokens; output lengths differ per request.
WORDS = "the of and to in is was for on that with as by at from it an be this are or".split()


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 60, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=g)]
        out.append((" ".join(words), 8 + 5 * (i % 5)))
    return out


def run(model, tmp_path, policy: str | None, kv_bytes: int = 32 << 20, observe=None, requests=None, **options):
    """Half the requests (default: ``workload(12)``) first, the rest after
    three steps; returns outputs by request id and the scheduler's figures
    (None for vLLM's own). ``observe(scheduler)`` is called after every
    step."""
    from vllm import SamplingParams

    kwargs = {}
    if policy is not None:
        options = {"policy": policy, "log_every": 0, **options}
        kwargs = dict(scheduler_cls=SCHEDULER, additional_config={"vllm_readme": options})
    requests = requests or workload(12)
    with vllm_engine(
        model, kv_cache_memory_bytes=kv_bytes, max_num_seqs=8, block_size=32, max_model_len=256, **kwargs
    ) as llm:
        engine = llm.llm_engine
        outputs = {}

        def add(first: int, last: int) -> None:
            for i in range(first, last):
                prompt, max_tokens = requests[i]
                engine.add_request(
                    str(i), prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
                )

        def step() -> None:
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
            if observe is not None:
                observe(engine.engine_core.engine_core.scheduler)

        add(0, len(requests) // 2)
        for _ in range(3):
            step()
        add(6, len(requests))
        for _ in range(2000):
            if not engine.has_unfinished_requests():
                break
            step()
        scheduler = engine.engine_core.engine_core.scheduler
        stats = None
        if policy is not None:
            s = scheduler.readme_stats
            stats = dict(
                steps=s.total_steps,
                unique=s.total_unique,
                held=s.total_held,
                longest_wait=s.longest_wait,
                preemptions=s.preemptions,
                routes_left=None if scheduler.readme_routes is None else len(scheduler.readme_routes),
            )
        del scheduler  # the engine must be free to shut down when the block ends
    return outputs, stats


@pytest.fixture(scope="module")
def expensive_experts(tmp_path_factory):
    """A cost model in which a distinct expert costs far more than a token,
    so that the cost-model policy holds requests back."""
    path = tmp_path_factory.mktemp("cost") / "cost.json"
    path.write_text(json.dumps({"base_ms": 1.0, "per_token_ms": 0.1, "per_expert_ms": 50.0, "per_load_ms": 0.0}))
    return path


@pytest.fixture(scope="module")
def reference(tiny_gqa, tmp_path_factory):
    """vLLM's own scheduler on the same workload and KV budget."""
    return run(tiny_gqa, tmp_path_factory.mktemp("ref"), None, kv_bytes=KV_TIGHT)[0]


# ~510 tokens in 32-token blocks: 8 running requests of up to ~100 tokens
# outgrow it while they decode, so vLLM must preempt.
KV_TIGHT = 3 << 18


@pytest.mark.parametrize(
    "policy,options",
    [
        ("fcfs", {}),
        # Within vLLM's token budget greedy-expert takes every decode (it
        # reorders, it does not hold back): no bound to check.
        ("greedy-expert", {}),
        ("cost-model", {"max_held_back": 1}),  # routes ahead from the model (the default)
        # With the self-check taking turns with FCFS every 8 steps.
        ("cost-model", {"max_held_back": 2, "route_source": "router", "self_check_window": 8}),
        ("decode-first", {}),
        ("prefill-first", {}),
    ],
)
def test_outputs_equal_vllm_scheduler(tiny_gqa, tmp_path, reference, expensive_experts, policy, options):
    if policy == "cost-model":
        options = {**options, "cost_model": str(expensive_experts)}
    outputs, stats = run(tiny_gqa, tmp_path, policy, kv_bytes=KV_TIGHT, **options)
    assert sorted(outputs) == sorted(reference), "every request finishes"
    assert outputs == reference, f"{policy}: greedy outputs differ from vLLM's own scheduler"
    assert stats["preemptions"] > 0, "the KV budget was meant to force preemption"
    assert stats["routes_left"] == 0, "finished requests release their router state"
    if "max_held_back" in options:
        assert stats["held"] > 0, f"{policy} never held a request back: the test would not test the bound"
        assert stats["longest_wait"] <= options["max_held_back"]


def test_grouping_lowers_unique_experts(tiny_gqa, tmp_path, expensive_experts):
    """Same workload, all in KV: the cost-model policy with costly experts
    touches fewer distinct experts per step than FCFS."""
    _, fcfs = run(tiny_gqa, tmp_path, "fcfs")
    # The router copy's exact routes: the figure compared is the routes' own.
    # The policy's own effect (the self-check is off by default).
    _, grouped = run(
        tiny_gqa,
        tmp_path,
        "cost-model",
        cost_model=str(expensive_experts),
        max_held_back=4,
        route_source="router",
    )
    assert grouped["unique"] / grouped["steps"] < 0.9 * fcfs["unique"] / fcfs["steps"], (fcfs, grouped)
    assert grouped["longest_wait"] <= 4


def run_costly_observed(model, tmp_path, cost_model, observe, **options):
    """The cost-model policy with costly experts (so that it holds requests
    back, bound 2) on the preempting KV budget, ``observe`` after each step."""
    return run(
        model,
        tmp_path,
        "cost-model",
        kv_bytes=KV_TIGHT,
        observe=observe,
        cost_model=str(cost_model),
        max_held_back=2,
        **options,
    )


def test_model_routes_drive_the_policy(tiny_gqa, tmp_path, reference, expensive_experts):
    """route_source=model: the scheduler runs no router; the routes it holds
    for each request are the model's own routes of that request's newest
    token (checked against the reference router over the whole sequence),
    and the policy acts on them without changing a single output."""
    seen: dict[str, dict[int, int]] = {}  # request -> position -> route the scheduler held
    tokens: dict[str, list[int]] = {}

    def observe(scheduler):
        for rid, (position, route) in scheduler.readme_routes.book.latest.items():
            seen.setdefault(rid, {})[position] = route
        for request in scheduler.running:
            tokens[request.request_id] = list(request.all_token_ids)

    outputs, stats = run_costly_observed(tiny_gqa, tmp_path, expensive_experts, observe, route_source="model")
    assert outputs == reference, "greedy outputs differ from vLLM's own scheduler"
    assert stats["held"] > 0 and stats["longest_wait"] <= 2, stats
    assert stats["routes_left"] == 0, "finished requests leave the route book"
    router = load_router(tiny_gqa)
    checked = 0
    with torch.no_grad():
        for rid, held in seen.items():
            full = router(torch.tensor([tokens[rid]])).argmax(-1)[0].tolist()
            for position, route in held.items():
                assert route == full[position], f"request {rid}, position {position}"
                checked += 1
    # Every request's route is known from its first decode step on.
    assert checked >= sum(len(out) for out in outputs.values()) // 2, checked


def test_failed_route_bookkeeping_degrades_to_vllm_order(tiny_gqa, tmp_path, reference, expensive_experts, caplog):
    """If the route bookkeeping raises mid-run (a fault injected into the
    route source after a few steps), the engine keeps running: the scheduler
    logs it, drops its routes and schedules as vLLM does; nothing is lost."""
    state = {"steps": 0, "failed": False}

    def observe(scheduler):
        state["steps"] += 1
        source = scheduler.readme_routes
        if state["steps"] == 6 and source is not None:

            def broken(*args, **kwargs):
                state["failed"] = True
                raise RuntimeError("injected route bookkeeping fault")

            source.scheduled = broken  # fault injection into a dependency
        state["dropped"] = scheduler.readme_routes is None

    with caplog.at_level("ERROR"):
        outputs, stats = run_costly_observed(tiny_gqa, tmp_path, expensive_experts, observe)
    assert state["failed"], "the injected fault never ran: the test would not test the degrade path"
    assert state["dropped"] and stats["routes_left"] is None, "the scheduler kept the failed route source"
    assert outputs == reference, "outputs changed or requests were lost when the bookkeeping failed"
    assert "route bookkeeping failed" in caplog.text


def test_router_copy_matches_model(tiny_gqa):
    """The scheduler's router copy: prompt routes and incremental routes equal
    the router over the whole sequence (within its window)."""
    router = load_router(tiny_gqa)
    tracker = RouteTracker(router, window=64, initial_slots=1)  # grows as requests arrive
    g = torch.Generator().manual_seed(1)
    seqs = {str(i): torch.randint(0, router.embed_tokens.num_embeddings, (50,), generator=g).tolist() for i in range(5)}
    for rid, seq in seqs.items():
        tracker.add(rid, seq[: 5 + 3 * int(rid)])
    while any(len(tracker.routes[rid]) < 50 for rid in seqs):
        tracker.extend({rid: seq[len(tracker.routes[rid]) : len(tracker.routes[rid]) + 2] for rid, seq in seqs.items()})
    with torch.no_grad():
        for rid, seq in seqs.items():
            assert tracker.routes[rid] == router(torch.tensor([seq])).argmax(-1)[0].tolist()
    tracker.release("0")
    assert "0" not in tracker and len(tracker) == 4


@pytest.mark.parametrize(
    "options,message",
    [
        ({"policy": "shortest-job"}, "unknown policy 'shortest-job'"),
        ({"max_held_back": -1}, "max_held_back must be >= 0"),
        ({"cost_model": "/nonexistent/cost.json"}, "cannot read '/nonexistent/cost.json'"),
        ({"polcy": "fcfs"}, "unknown option(s) ['polcy']"),
        ({"max_held_back": "soon"}, "max_held_back: expected int"),
        ({"route_source": "oracle"}, "route_source: 'oracle' is not one of ['router', 'model']"),
        ({"self_check_window": 3}, "self_check_window must be 0 (off) or >= 8 steps"),
        ({"max_held_back": 1000}, "max_held_back must be >= 0 and <= 64"),
        (
            {"route_source": "router", "route_window": 10**6},
            "route_window must be <= the router's max_position_embeddings",
        ),
        ({"log_every": float("nan")}, "log_every: expected int"),
    ],
)
def test_bad_options_fail_at_start(tiny_gqa, options, message):
    with pytest.raises(Exception) as info:
        with vllm_engine(tiny_gqa, scheduler_cls=SCHEDULER, additional_config={"vllm_readme": options}):
            pass
    assert message in str(info.value) or message in repr(info.value.__cause__), str(info.value)


def test_dense_model_scheduled_as_vllm_does(tmp_path):
    """A model that is not Read-ME: no router copy, and the same outputs and
    the same per-step schedule as vLLM's own scheduler."""
    from vllm import SamplingParams

    from vllm_readme.checkpoint.tiny import build_tiny_dense

    dense = build_tiny_dense(tmp_path / "dense", seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [prompt for prompt, _ in workload(10, seed=2)]
    results = []
    for kwargs in ({}, dict(scheduler_cls=SCHEDULER, additional_config={"vllm_readme": {"policy": "cost-model"}})):
        with vllm_engine(dense, max_num_seqs=4, **kwargs) as llm:
            scheduler = llm.llm_engine.engine_core.engine_core.scheduler
            steps: list[dict] = []
            # Observe, not replace: vLLM's schedule() or ours runs underneath.
            scheduler.schedule = _recording(scheduler.schedule, steps)
            outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            results.append((outputs, steps, getattr(scheduler, "readme_routes", "absent")))
            # An engine outliving its block shuts down later and takes the
            # next engine's process groups with it: drop every reference.
            del scheduler.schedule, scheduler, llm
    (ref_out, ref_steps, _), (out, steps, routes) = results
    assert routes is None
    assert out == ref_out
    assert steps == ref_steps


def _recording(schedule, steps: list[dict]):
    def recording(*args, **kwargs):
        out = schedule(*args, **kwargs)
        # LLM.generate's request ids are "<index>-<random>": keep the index.
        steps.append({rid.split("-")[0]: n for rid, n in out.num_scheduled_tokens.items()})
        return out

    return recording


def test_prefix_caching_keeps_working(tiny_gqa, expensive_experts):
    """Requests sharing a long prompt prefix, served after the first: the
    cost-model policy (holding requests back on costly experts) gives vLLM's
    outputs, and the later requests are served from the prefix cache as
    under vLLM's own scheduler."""
    from vllm import SamplingParams

    prefix = " ".join(WORDS + WORDS[::-1])
    prompts = [f"{prefix} {word}" for word in WORDS[:6]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def serve(policy):
        kwargs = {}
        if policy is not None:
            options = {"policy": policy, "cost_model": str(expensive_experts), "max_held_back": 2, "log_every": 0}
            kwargs = dict(scheduler_cls=SCHEDULER, additional_config={"vllm_readme": options})
        with vllm_engine(tiny_gqa, max_num_seqs=8, block_size=32, enable_prefix_caching=True, **kwargs) as llm:
            first = llm.generate(prompts[:1], params, use_tqdm=False)
            rest = llm.generate(prompts[1:], params, use_tqdm=False)
            stats = getattr(llm.llm_engine.engine_core.engine_core.scheduler, "readme_stats", None)
            held = None if stats is None else stats.total_held
        return [list(o.outputs[0].token_ids) for o in first + rest], [o.num_cached_tokens for o in rest], held

    reference, reference_cached, _ = serve(None)
    outputs, cached, held = serve("cost-model")
    assert held > 0, "the policy never held a request back: the test would only test FCFS"
    assert outputs == reference, "greedy outputs differ from vLLM's own scheduler with prefix caching"
    assert min(reference_cached) >= 32, reference_cached  # the workload does hit the cache
    assert cached == reference_cached, "the policy changed what the prefix cache served"
