"""Tensor parallelism is not ruled out: TP=2 on CPU (one core per rank)
gives the reference's greedy tokens and logprobs, also with the expert
cache at half the pages (each rank pools and loads its own shard of every
page, from its page file or sliced from the checkpoint)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, load_reference

pytestmark = pytest.mark.slow  # multi-process vLLM
NEW_TOKENS = 12

SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, dtype="float32", enforce_eager=True,
          max_model_len=512, kv_cache_memory_bytes=32 << 20, max_num_seqs=4,
          additional_config=json.loads(sys.argv[3]))
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=int(sys.argv[4]), temperature=0.0,
                    ignore_eos=True, logprobs=1))
print("RESULT " + json.dumps([
    {"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
     "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
    for o in outs]))
"""


@pytest.mark.parametrize(
    "plugin_options",
    [{}, {"expert_pool": "50%"}, {"expert_pool": "50%", "backing_store": "checkpoint", "prefetch": False}],
    ids=["resident", "pool-disk", "pool-checkpoint"],
)
def test_tp2_matches_the_reference(tiny_gqa, tmp_path, plugin_options):
    route_log = tmp_path / "routes.log"
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
        VLLM_CPU_OMP_THREADS_BIND="0|1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_README_ROUTE_LOG=str(route_log),
        VLLM_README_EXPERT_METRICS="1",  # the route log is written by the metrics observer
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tiny_gqa),
            json.dumps(PROMPTS[:2]),
            json.dumps({"vllm_readme": plugin_options}),
            str(NEW_TOKENS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    reference = load_reference(tiny_gqa)
    routes = []  # each sequence's expert per position, from the reference's router
    for result in json.loads(lines[0][len("RESULT ") :]):
        ids = list(result["prompt_ids"])
        logprobs = []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                lp = reference(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
                ids.append(int(lp.argmax()))
                logprobs.append(float(lp.max()))
        assert result["tokens"] == ids[len(result["prompt_ids"]) :]
        routes.append((len(result["prompt_ids"]), reference.route(torch.tensor([ids]))[1][0].tolist()))
        assert max(abs(a - b) for a, b in zip(result["logprobs"], logprobs, strict=True)) < 5e-5
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
