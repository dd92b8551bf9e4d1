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

SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, dtype="float32", enforce_eager=True,
          max_model_len=512, kv_cache_memory_bytes=32 << 20, max_num_seqs=4,
          additional_config=json.loads(sys.argv[3]))
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1))
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
    env = dict(
        os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tiny_gqa),
            json.dumps(PROMPTS[:2]),
            json.dumps({"vllm_readme": plugin_options}),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    reference = load_reference(tiny_gqa)
    for result in json.loads(lines[0][len("RESULT ") :]):
        ids = list(result["prompt_ids"])
        logprobs = []
        with torch.no_grad():
            for _ in range(12):
                lp = reference(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
                ids.append(int(lp.argmax()))
                logprobs.append(float(lp.max()))
        assert result["tokens"] == ids[len(result["prompt_ids"]) :]
        assert max(abs(a - b) for a, b in zip(result["logprobs"], logprobs, strict=True)) < 5e-5
