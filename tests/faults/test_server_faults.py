# SPDX-License-Identifier: Apache-2.0
"""The whole plugin on at once under load and bad input: `vllm-readme serve`
with the expert-aware scheduler and an expert pool of half the pages, 64
streaming clients at once while malformed requests arrive among them.

Every client must get exactly the reference model's greedy tokens (the
scheduler and the pool change when tokens run, never which), every bad
request a 4xx with a message, nothing lost or hung, and the server must
leave no page file or plan file behind when it stops."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from conftest import post_json, served, stream_greedy, streams_off_reference, varied_prompt

pytestmark = pytest.mark.slow  # multi-process vLLM

MODEL = "tiny-readme"
CLIENTS = 64
NEW_TOKENS = 12
CLIENT_TIMEOUT_S = 300
SHM = Path("/dev/shm")

BAD_BODIES = [
    b'{"model": "tiny-readme", "prompt": "Hi",',  # truncated JSON
    json.dumps({"model": MODEL, "prompt": "word " * 1200, "max_tokens": 4}).encode(),  # longer than the model
    json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": -3}).encode(),
    json.dumps({"model": MODEL, "prompt": "Hello", "temperature": -1.0}).encode(),
    json.dumps({"model": MODEL, "prompt": [[-5, 10**9]], "max_tokens": 4}).encode(),  # token ids out of range
    json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": "many"}).encode(),
    json.dumps({"model": "no-such-model", "prompt": "Hello", "max_tokens": 4}).encode(),
    json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "top_p": 5.0}).encode(),
]


def _plan_files() -> set[str]:
    return {p.name for p in SHM.glob("vllm_readme*")} if SHM.is_dir() else set()


def test_64_streams_with_scheduler_and_half_pool_amid_bad_requests(tiny_gqa, tmp_path):
    from openai import AsyncOpenAI

    page_dir = tmp_path / "pages"
    page_dir.mkdir()
    plans_before = _plan_files()
    options = json.dumps({"vllm_readme": {"expert_pool": "50%"}})
    args = (
        *("--dtype", "float32", "--max-model-len", "512", "--served-model-name", MODEL, "--enforce-eager"),
        *("--max-num-seqs", "16", "--scheduler-cls", "vllm_readme.scheduler.ExpertAwareScheduler"),
        *("--additional-config", options),
    )
    env = {"VLLM_README_PAGE_DIR": str(page_dir), "VLLM_LOGGING_LEVEL": "INFO"}  # the start-up lines

    async def run(url: str):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
        streams = [
            asyncio.create_task(
                asyncio.wait_for(stream_greedy(client, MODEL, varied_prompt(i), NEW_TOKENS), CLIENT_TIMEOUT_S)
            )
            for i in range(CLIENTS)
        ]
        loop = asyncio.get_running_loop()
        bad = []
        for body in BAD_BODIES:  # while the streams are in flight
            bad.append(await loop.run_in_executor(None, post_json, url + "/v1/completions", body))
            await asyncio.sleep(0.05)
        return await asyncio.gather(*streams, return_exceptions=True), bad

    with served(tiny_gqa, tmp_path / "server.log", *args, env=env) as (proc, url):
        started = time.time()
        results, bad = asyncio.run(run(url))
        elapsed = time.time() - started
        after, _ = post_json(
            url + "/v1/completions", json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
        )
        log = (tmp_path / "server.log").read_text()
    outcomes: dict[str, int] = {}
    for result in results:
        key = result[0] if isinstance(result, tuple) else f"lost: {type(result).__name__}: {result}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n{CLIENTS} streams and {len(bad)} bad requests in {elapsed:.1f} s: {outcomes}")
    for status, text in bad:
        print(f"  HTTP {status}: {text[:120]}")
    assert outcomes == {"completed": CLIENTS}, outcomes
    assert all(400 <= status < 500 and json.loads(text)["error"]["message"] for status, text in bad), bad
    assert after == 200, "the server stopped serving after the bad requests"
    assert "expert cache of layers 0-1:" in log, "the expert pool did not start"
    assert "vllm-readme scheduler" in log, "the expert-aware scheduler did not start"

    wrong = streams_off_reference(tiny_gqa, results, [varied_prompt(i) for i in range(CLIENTS)], NEW_TOKENS)
    assert not wrong, f"{len(wrong)} of {CLIENTS} streams differ from the reference's greedy tokens: {wrong}"

    assert proc.poll() is not None, "the server is still running"
    assert not os.listdir(page_dir), f"page files left behind: {os.listdir(page_dir)}"
    assert _plan_files() <= plans_before, f"plan files left behind: {_plan_files() - plans_before}"
