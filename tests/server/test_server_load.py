# SPDX-License-Identifier: Apache-2.0
"""The served Read-ME model under load and bad input, at CI scale:
many concurrent streaming clients, clients that vanish mid-stream, malformed
requests, SIGTERM. Stock vLLM handles these; the tests make sure the
plugin's parts never break that. The full-scale run is benchmarks/serve.py."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from conftest import post_json, scrape, served

pytestmark = pytest.mark.slow  # multi-process vLLM

MODEL = "tiny-readme"
MAX_MODEL_LEN = 512
CLIENTS = 64
CLIENT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(tiny_gqa, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("load") / "server.log"
    args = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", MODEL)
    with served(tiny_gqa, log_path, *args, "--enforce-eager", "--max-num-seqs", "16") as (_, url):
        yield url


def total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


async def _stream_one(client, i: int) -> tuple[str, int]:
    from openai import APIStatusError

    try:
        tokens = 0
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Request {i}: the logging module",
            max_tokens=16,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:  # a chunk may carry several tokens: count from the usage at the end
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return "completed", tokens
    except APIStatusError as exc:  # a clear refusal counts as accounted for
        return f"refused {exc.status_code}", 0


def test_64_concurrent_streaming_clients_are_all_accounted_for(server):
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
        tasks = [asyncio.wait_for(_stream_one(client, i), CLIENT_TIMEOUT_S) for i in range(CLIENTS)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    start = time.time()
    results = asyncio.run(run())
    outcomes: dict[str, int] = {}
    for result in results:
        key = result[0] if isinstance(result, tuple) else f"lost: {type(result).__name__}: {result}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n{CLIENTS} streaming clients in {time.time() - start:.1f} s: {outcomes}")
    assert sum(outcomes.values()) == CLIENTS
    assert not [k for k in outcomes if k.startswith("lost")], outcomes
    assert outcomes.get("completed", 0) == CLIENTS, "the server should serve, not refuse, 64 small requests"
    assert all(r[1] == 16 for r in results if r[0] == "completed")


def test_expert_metrics_reach_the_servers_metrics_endpoint(server):
    """The model runs in the engine-core process; its expert metrics must
    appear in the API server's /metrics beside vLLM's own."""
    from openai import OpenAI

    before = scrape(server)
    OpenAI(base_url=server + "/v1", api_key="unused").completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
    )
    after = scrape(server)
    steps = after["vllm_readme:unique_experts_per_step_count"] - before.get(
        "vllm_readme:unique_experts_per_step_count", 0
    )
    routed = total(after, "vllm_readme:routed_tokens_total") - total(before, "vllm_readme:routed_tokens_total")
    mean_unique = (
        after["vllm_readme:unique_experts_per_step_sum"] - before.get("vllm_readme:unique_experts_per_step_sum", 0)
    ) / steps
    print(f"\none request: {steps:.0f} steps, {routed:.0f} routed tokens, {mean_unique:.2f} unique experts per step")
    assert steps >= 8  # prefill + 7 decode steps at least
    assert routed >= 4 + 7  # prompt tokens + fed-back tokens
    assert 1.0 <= mean_unique <= 8.0
    assert "vllm:num_requests_running" in after, "vLLM's own metrics must still be exported"


def test_clients_that_disconnect_mid_stream_are_aborted_and_their_blocks_freed(server):
    import httpx

    before = scrape(server)
    body = {"model": MODEL, "prompt": "Logging is performed by", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        for _ in range(8):
            with client.stream("POST", server + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for i, _line in enumerate(response.iter_lines()):
                    if i >= 3:
                        break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 60
    while True:
        after = scrape(server)
        idle = total(after, "vllm:num_requests_running") == 0 and total(after, "vllm:kv_cache_usage_perc") == 0
        if idle or time.time() > deadline:
            break
        time.sleep(0.5)
    generated = total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total")
    finished = total(after, "vllm:request_success_total") - total(before, "vllm:request_success_total")
    print(
        f"\n8 streams dropped after 3 chunks: {generated:.0f} tokens generated of 8 x 400 asked; "
        f"{finished:.0f} finished normally; idle again: {idle}"
    )
    assert idle, "running requests or KV blocks left behind after the clients went away"
    assert generated < 8 * 400 / 2, "requests kept generating after their clients went away"


BAD_REQUESTS = {
    "prompt longer than the model allows": {"prompt": "word " * (MAX_MODEL_LEN * 2), "max_tokens": 4},
    "empty prompt": {"prompt": "", "max_tokens": 4},
    "absurd max_tokens": {"prompt": "Hello", "max_tokens": 10**12},
    "negative temperature": {"prompt": "Hello", "max_tokens": 4, "temperature": -1.0},
    "top_p above 1": {"prompt": "Hello", "max_tokens": 4, "top_p": 5.0},
    "wrong type": {"prompt": "Hello", "max_tokens": "many"},
}


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
        background = asyncio.create_task(_stream_one(client, 0))  # in flight while the bad ones arrive
        loop = asyncio.get_running_loop()
        answers = {}
        for name, body in BAD_REQUESTS.items():
            data = json.dumps({"model": MODEL, **body}).encode()
            answers[name] = await loop.run_in_executor(None, post_json, server + "/v1/completions", data)
        answers["malformed JSON"] = await loop.run_in_executor(
            None, post_json, server + "/v1/completions", b'{"model": "tiny-readme", "prompt": "Hi",'
        )
        return answers, await background

    answers, background = asyncio.run(run())
    for name, (status, text) in answers.items():
        print(f"\n{name}: HTTP {status}: {text[:160]}")
    wrong = {name: status for name, (status, _) in answers.items() if not 400 <= status < 500}
    assert not wrong, f"expected a 4xx for each bad request, got {wrong}"
    assert all(json.loads(text).get("error", {}).get("message") for _, text in answers.values())
    assert background == ("completed", 16), "a request in flight was hurt by the bad ones"
    status, _ = post_json(
        server + "/v1/completions", json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    )
    assert status == 200


def test_sigterm_shuts_the_server_down_with_nothing_left_running(tiny_gqa, tmp_path):
    import psutil

    args = ("--dtype", "float32", "--max-model-len", "256", "--enforce-eager")
    with served(tiny_gqa, tmp_path / "server.log", *args) as (proc, _):
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "vLLM's engine core should run in a child process"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    print(f"\nSIGTERM: exit code {code}; {len(gone)} child process(es) ended, {len(alive)} left")
    assert code == 0
    assert not alive, f"left running: {[p.pid for p in alive]}"
