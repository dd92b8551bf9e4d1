# SPDX-License-Identifier: Apache-2.0
"""Pipeline parallelism (SupportsPP): a Read-ME model split into stages gives
the reference's greedy tokens and logprobs, with every expert resident and
with each stage's expert cache at half its pages, under vLLM's scheduler and
under the expert-aware one; alone and with tensor parallelism inside each
stage. The router runs once, on the first stage: its routes reach the later
stages inside IntermediateTensors.

vLLM's CPU build runs a split model only in its default compiled mode (in
eager mode its second-stage worker fails for stock Llama too: docs/scaling.md),
so these engines compile."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from conftest import PROMPTS, scrape, served, stream_greedy, streams_off_reference, varied_prompt
from parallel_engines import SCHEDULER_CLS, assert_matches_reference, run_engine, workers_env

from vllm_readme.checkpoint.tiny import TinyShape, build_tiny_checkpoint

pytestmark = pytest.mark.slow  # multi-process vLLM
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """Four layers: two a stage, so that half a stage's pages (4 of 8) still
    hold one layer's experts, the pool's minimum."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("pp") / "tiny4", TinyShape(num_hidden_layers=4), seed=11)


def stages_logged(log: str) -> list[str]:
    return sorted(set(re.findall(r"this pipeline stage: layers (\d+-\d+)", log)))


@pytest.mark.parametrize("scheduler", ["vllm", "expert-aware"])
@pytest.mark.parametrize("plugin_options", [{}, {"expert_pool": "50%"}], ids=["resident", "pool-50"])
def test_pp2_matches_the_reference(four_layers, tmp_path, plugin_options, scheduler):
    engine = {"pipeline_parallel_size": 2, "additional_config": {"vllm_readme": plugin_options}}
    if scheduler == "expert-aware":
        engine["scheduler_cls"] = SCHEDULER_CLS
    results, log = run_engine(four_layers, tmp_path, PROMPTS, NEW_TOKENS, workers=2, **engine)
    assert_matches_reference(four_layers, results, NEW_TOKENS)
    assert stages_logged(log) == ["0-1", "2-3"], log[-3000:]
    if plugin_options:
        # Each stage pools its own layers' pages, half of them.
        assert "expert cache of layers 0-1: 4 of 8 expert pages" in log
        assert "expert cache of layers 2-3: 4 of 8 expert pages" in log


def test_pp2_with_tied_embeddings_and_uneven_stages(tiny_mha, tmp_path):
    """Three layers over two stages (2 + 1), the embedding tied to lm_head:
    the last stage holds the embedding too, the router stays on the first."""
    results, log = run_engine(tiny_mha, tmp_path, PROMPTS, NEW_TOKENS, workers=2, pipeline_parallel_size=2)
    assert_matches_reference(tiny_mha, results, NEW_TOKENS)
    assert stages_logged(log) == ["0-1", "2-2"], log[-3000:]


@pytest.mark.parametrize("scheduler", ["vllm", "expert-aware"])
@pytest.mark.parametrize("plugin_options", [{}, {"expert_pool": "50%"}], ids=["resident", "pool-50"])
def test_tp2_x_pp2_matches_the_reference(four_layers, tmp_path, plugin_options, scheduler):
    """Four workers on this machine's cores (they take turns)."""
    engine = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    if scheduler == "expert-aware":
        engine["scheduler_cls"] = SCHEDULER_CLS
    results, log = run_engine(
        four_layers,
        tmp_path,
        PROMPTS,
        NEW_TOKENS,
        workers=4,
        additional_config={"vllm_readme": plugin_options},
        timeout_s=900,
        **engine,
    )
    assert_matches_reference(four_layers, results, NEW_TOKENS)
    assert stages_logged(log) == ["0-1", "2-3"], log[-3000:]


@pytest.mark.parametrize("plugin_options", [{}, {"expert_pool": "50%"}], ids=["resident", "pool-50"])
def test_tp2_with_the_expert_aware_scheduler_matches_the_reference(four_layers, tmp_path, plugin_options):
    """(vLLM's scheduler under TP=2: tests/scaling/test_tensor_parallel.py.)"""
    results, _ = run_engine(
        four_layers,
        tmp_path,
        PROMPTS,
        NEW_TOKENS,
        workers=2,
        tensor_parallel_size=2,
        scheduler_cls=SCHEDULER_CLS,
        additional_config={"vllm_readme": plugin_options},
    )
    assert_matches_reference(four_layers, results, NEW_TOKENS)


def test_expert_parallel_is_refused_at_start_up_with_the_reason(tiny_gqa, tmp_path):
    with pytest.raises(AssertionError) as failed:
        run_engine(tiny_gqa, tmp_path, PROMPTS[:1], 2, workers=2, tensor_parallel_size=2, enable_expert_parallel=True)
    assert "--enable-expert-parallel is not supported for Read-ME models" in str(failed.value)


def test_pp2_server_streams_32_clients_with_the_references_tokens(four_layers, tmp_path):
    """`vllm-readme serve --pipeline-parallel-size 2` with the expert-aware
    scheduler and half of each stage's pages: 32 streaming clients at once,
    every one completed with the reference's greedy tokens; the bytes the
    first stage sent per token are what the IntermediateTensors hold."""
    from openai import AsyncOpenAI

    clients, new_tokens = 32, 12
    args = (
        *("--dtype", "float32", "--max-model-len", "512", "--served-model-name", "tiny-readme"),
        *("--max-num-seqs", "16", "--pipeline-parallel-size", "2", "--scheduler-cls", SCHEDULER_CLS),
        *("--additional-config", json.dumps({"vllm_readme": {"expert_pool": "50%"}})),
    )

    async def run(url: str):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        streams = [stream_greedy(client, "tiny-readme", varied_prompt(i), new_tokens) for i in range(clients)]
        return await asyncio.gather(*(asyncio.wait_for(s, 300) for s in streams), return_exceptions=True)

    env = {k: v for k, v in workers_env(2).items() if k.startswith("VLLM_CPU_OMP")} | {"VLLM_LOGGING_LEVEL": "INFO"}
    with served(four_layers, tmp_path / "server.log", *args, env=env) as (_, url):
        results = asyncio.run(run(url))
        metrics = scrape(url)
    log = (tmp_path / "server.log").read_text()
    lost = [r for r in results if not (isinstance(r, tuple) and r[0] == "completed")]
    assert not lost, lost[:3]
    wrong = streams_off_reference(four_layers, results, [varied_prompt(i) for i in range(clients)], new_tokens)
    assert not wrong, f"{len(wrong)} of {clients} streams differ from the reference's greedy tokens: {wrong}"
    assert stages_logged(log) == ["0-1", "2-3"], log[-3000:]
    config = json.loads((four_layers / "config.json").read_text())
    per_token = metrics["vllm_readme:pipeline_sent_bytes_total"] / metrics["vllm_readme:pipeline_sent_tokens_total"]
    assert per_token == 2 * config["hidden_size"] * 4 + 4, per_token  # fp32 hidden states + residual, int32 route
