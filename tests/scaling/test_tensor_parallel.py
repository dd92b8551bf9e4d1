# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism is not ruled out: TP=2 on CPU (one core per rank)
gives the reference's greedy tokens and logprobs, also with the expert
cache at half the pages (each rank pools and loads its own shard of every
page, from its page file or sliced from the checkpoint)."""

import pytest
import torch
from conftest import PROMPTS, load_reference
from parallel_engines import assert_matches_reference, run_engine

pytestmark = pytest.mark.slow  # multi-process vLLM
NEW_TOKENS = 12


@pytest.mark.parametrize(
    "plugin_options",
    [{}, {"expert_pool": "50%"}, {"expert_pool": "50%", "backing_store": "checkpoint", "prefetch": False}],
    ids=["resident", "pool-disk", "pool-checkpoint"],
)
def test_tp2_matches_the_reference(tiny_gqa, tmp_path, plugin_options):
    route_log = tmp_path / "routes.log"
    results, _ = run_engine(
        tiny_gqa,
        tmp_path,
        PROMPTS[:2],
        NEW_TOKENS,
        workers=2,
        env={"VLLM_README_ROUTE_LOG": str(route_log), "VLLM_README_EXPERT_METRICS": "1"},  # written by the metrics
        tensor_parallel_size=2,
        enforce_eager=True,
        kv_cache_memory_bytes=32 << 20,
        additional_config={"vllm_readme": plugin_options},
        timeout_s=300,
    )
    assert_matches_reference(tiny_gqa, results, NEW_TOKENS)
    reference = load_reference(tiny_gqa)
    routes = []  # each sequence's expert per position, from the reference's router
    for result in results:
        ids = torch.tensor([list(result["prompt_ids"]) + result["tokens"]])
        routes.append((len(result["prompt_ids"]), reference.route(ids)[1][0].tolist()))
    # Both ranks compute every step's routes; the route log (and the expert
    # metrics) must count each step once. A sequence is prefilled in one step
    # and decodes one token per step after it; the second prompt may reach
    # the engine a step after the first, so each possible start is a schedule.
    logged = [[int(e) for e in line.split()] for line in route_log.read_text().splitlines()]
    schedules = [steps_of(routes, starts) for starts in ((0, 0), (0, 1), (1, 0))]
    assert any(logged[-len(steps) :] == steps for steps in schedules), (logged, schedules)


def steps_of(
    routes: list[tuple[int, list[int]]], starts: tuple[int, ...], new_tokens: int = NEW_TOKENS
) -> list[list[int]]:
    """Each engine step's distinct experts when sequence i (prompt length n,
    routes r) is prefilled at step starts[i]: its prompt's routes, then one
    step per new token after the first, each reading the token before it."""
    steps: dict[int, set[int]] = {}
    for (n, r), start in zip(routes, starts, strict=True):
        steps.setdefault(start, set()).update(r[:n])
        for j in range(1, new_tokens):
            steps.setdefault(start + j, set()).add(r[n + j - 1])
    return [sorted(steps[k]) for k in sorted(steps)]
