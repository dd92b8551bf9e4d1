# SPDX-License-Identifier: Apache-2.0
"""Data parallelism: `vllm-readme serve --data-parallel-size 2` runs two
engines, each with its own scheduler, worker and expert cache, behind vLLM's
load balancer. Every completion equals the reference's greedy tokens
whichever rank served it, both ranks serve, each rank's scheduler publishes
a plan file of its own (the ranks share vLLM's instance id: the plan file's
name adds the rank), and /metrics shows the plugin's figures per rank under
vLLM's own ``engine`` label.

A Read-ME model is a MoE to vLLM, so its ranks step together (vLLM's
DPEngineCoreProc; an idle rank runs dummy steps while the other has work).
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PROMPTS, load_reference, post_json, reference_greedy, served
from parallel_engines import SCHEDULER_CLS, workers_env

pytestmark = pytest.mark.slow  # multi-process vLLM
NEW_TOKENS = 12
COPIES = 4  # of every prompt, sent at once: enough for the balancer to use both ranks
MODEL = "tiny-readme"
# Two API servers, two engine cores, their workers and vLLM's DP coordinator
# start on this machine's two cores: about 100 s alone, longer beside other work.
START_TIMEOUT_S = 600
SERVE_ARGS = (
    "--dtype",
    "float32",
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "8",
    "--served-model-name",
    MODEL,
    "--enforce-eager",
)


def server_env(workers: int) -> dict[str, str]:
    """What ``workers_env`` adds for a server's engines (the server starts
    them in processes of its own)."""
    env = workers_env(workers)
    names = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")
    return {**{name: env[name] for name in names}, "VLLM_LOGGING_LEVEL": "INFO"}  # the checks read INFO lines


def complete_concurrently(url: str, prompts: list[str]) -> list[dict]:
    """One completion request per prompt, all in flight together; each
    choice with its prompt's and its own token ids."""

    def one(prompt: str) -> dict:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        status, text = post_json(url + "/v1/completions", json.dumps(body).encode())
        assert status == 200, text
        return json.loads(text)["choices"][0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def assert_reference_tokens(model, choices: list[dict]) -> None:
    reference = load_reference(model)
    expected: dict[tuple[int, ...], list[int]] = {}
    for choice in choices:
        prompt_ids = tuple(choice["prompt_token_ids"])
        if prompt_ids not in expected:
            expected[prompt_ids] = reference_greedy(reference, list(prompt_ids), NEW_TOKENS)
        assert choice["token_ids"] == expected[prompt_ids], choice


def per_engine(url: str) -> dict[str, dict[str, float]]:
    """/metrics as {sample name: {engine label: value summed over the other
    labels}} (histogram buckets left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            by_engine = out.setdefault(sample.name, {})
            engine = sample.labels.get("engine", "")
            by_engine[engine] = by_engine.get(engine, 0.0) + sample.value
    return out


def ranks_logging(log: str, line: str) -> set[str]:
    """The data-parallel ranks whose processes logged ``line`` (vLLM
    prefixes each line with its process's name, e.g. EngineCore_DP1)."""
    return set(re.findall(r"_DP(\d)\b[^\n]*" + re.escape(line), log))


def assert_no_plan_file_trouble(log: str) -> None:
    """experts/plan.py logs one line when a scheduler cannot make its plan
    file (another file has its name: the ranks would have collided)."""
    assert "cannot create the plan file" not in log, log[-4000:]


@pytest.mark.parametrize("scheduler", ["vllm", "expert-aware"])
@pytest.mark.parametrize("pool", [None, "50%"], ids=["resident", "pool-50"])
def test_dp2_ranks_both_serve_the_reference_tokens(tiny_gqa, tmp_path, scheduler, pool):
    """vLLM's or the expert-aware scheduler, every expert resident or each
    rank's expert cache at half its pages (2 layers x 4 experts: 4 of 8
    pages, the pool's minimum)."""
    args = [*SERVE_ARGS, "--data-parallel-size", "2"]
    if pool:
        args += ["--additional-config", json.dumps({"vllm_readme": {"expert_pool": pool}})]
    if scheduler == "expert-aware":
        args += ["--scheduler-cls", SCHEDULER_CLS]
    log_path = tmp_path / "server.log"
    with served(tiny_gqa, log_path, *args, env=server_env(2), timeout_s=START_TIMEOUT_S) as (_, url):
        choices = complete_concurrently(url, PROMPTS * COPIES)
        metrics = per_engine(url)
    log = log_path.read_text()
    assert_reference_tokens(tiny_gqa, choices)

    finished = metrics["vllm:request_success_total"]
    assert sum(finished.values()) == len(PROMPTS) * COPIES, finished
    assert finished.get("0", 0) > 0 and finished.get("1", 0) > 0, finished
    # The model's metrics, per rank: each rank ran forward steps of its own.
    steps = metrics["vllm_readme:unique_experts_per_step_count"]
    assert steps.get("0", 0) > 0 and steps.get("1", 0) > 0, steps
    routed = metrics["vllm_readme:routed_tokens_total"]
    assert routed.get("0", 0) > 0 and routed.get("1", 0) > 0, routed

    assert_no_plan_file_trouble(log)
    if pool:
        assert ranks_logging(log, "expert cache of layers 0-1: 4 of 8 expert pages") == {"0", "1"}, log[-4000:]
        assert set(metrics["vllm_readme:expert_cache_hits_total"]) == {"0", "1"}, metrics
    if scheduler == "expert-aware" and pool:
        assert ranks_logging(log, "publishing each step's expert plan to the expert cache") == {"0", "1"}, log[-4000:]
    if scheduler == "expert-aware":
        # The scheduler's metrics, per rank.
        name = "vllm_readme:scheduler_unique_experts_per_step_count"
        assert set(metrics[name]) == {"0", "1"}, (name, metrics[name])
        decided = metrics["vllm_readme:scheduler_tokens_per_step_sum"]
        assert decided["0"] > 0 and decided["1"] > 0, decided


def test_dp2_behind_an_external_load_balancer(tiny_gqa, tmp_path):
    """One server per rank (``--data-parallel-rank 0/1``), as an external
    load balancer in front of them addresses them: rank 1 joins rank 0's
    data-parallel group through ``--data-parallel-address``/``-rpc-port``;
    each server's /metrics shows its own rank."""
    from vllm_readme.server_process import free_port, launch, stop, wait_until_healthy

    cores = os.cpu_count() or 1
    common = [
        *SERVE_ARGS,
        "--data-parallel-size",
        "2",
        "--data-parallel-address",
        "127.0.0.1",
        "--data-parallel-rpc-port",
        str(free_port()),
    ]
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ports = [free_port(), free_port()]
    procs = []
    try:
        for rank in (0, 1):
            env = {**server_env(1), "VLLM_CPU_OMP_THREADS_BIND": str(rank % cores)}
            with open(logs[rank], "w") as log:
                procs.append(
                    launch(tiny_gqa, *common, "--data-parallel-rank", str(rank), port=ports[rank], env=env, log=log)
                )
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for proc, url, log in zip(procs, urls, logs, strict=True):
            wait_until_healthy(proc, url, START_TIMEOUT_S, log)
        with ThreadPoolExecutor(2) as pool:
            served_by_rank = list(pool.map(lambda url: complete_concurrently(url, PROMPTS * 2), urls))
        metrics = [per_engine(url) for url in urls]
    finally:
        for proc in procs:
            stop(proc)
    for choices in served_by_rank:
        assert_reference_tokens(tiny_gqa, choices)
    for rank, by_name in enumerate(metrics):
        assert by_name["vllm:request_success_total"] == {str(rank): len(PROMPTS) * 2}, by_name[
            "vllm:request_success_total"
        ]
        assert set(by_name["vllm_readme:unique_experts_per_step_count"]) == {str(rank)}
    for log in logs:
        assert_no_plan_file_trouble(log.read_text())
