# SPDX-License-Identifier: Apache-2.0
"""vLLM's ReadMEForCausalLM against the reference (docs/design.md, invariants
1 and 2): logprobs in fp32, greedy tokens, and the KV-cached router."""

import json
import os

import pytest
import torch
from conftest import PROMPTS, load_reference, start_route_trace, take_route_trace, vllm_engine
from vllm import SamplingParams
from vllm.platforms import current_platform

NEW_TOKENS = 16
# fp32 on CPU: vLLM's fused kernels and plain PyTorch differ by rounding only
# (measured ~4e-6 on both shapes).
LOGPROB_ATOL = 5e-5


def reference_greedy(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full recompute, EOS ignored; log-softmax of
    every position of the final sequence."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return ids[len(prompt_ids) :], logprobs


def max_logprob_error(output, ref_logprobs: torch.Tensor) -> float:
    """Largest |vLLM - reference| over the top-k logprobs vLLM returned, at
    every prompt position (prompt_logprobs) and every generated position."""
    prompt_len = len(output.prompt_token_ids)
    worst = 0.0
    for position, entries in enumerate(output.prompt_logprobs or []):
        if entries is None:  # the first prompt token has no prediction
            continue
        for token, lp in entries.items():
            worst = max(worst, abs(lp.logprob - float(ref_logprobs[position - 1, token])))
    for step, entries in enumerate(output.outputs[0].logprobs):
        for token, lp in entries.items():
            worst = max(worst, abs(lp.logprob - float(ref_logprobs[prompt_len - 1 + step, token])))
    return worst


@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_batched_generation_matches_reference_logprobs_and_greedy_tokens(tiny_checkpoints, shape):
    path = tiny_checkpoints[shape]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    with vllm_engine(path) as llm:
        outputs = llm.generate(PROMPTS, params)  # four prompts of different lengths, one batch
    reference = load_reference(path)
    errors = []
    for output in outputs:
        expected_tokens, ref_logprobs = reference_greedy(reference, output.prompt_token_ids, NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == expected_tokens, output.prompt
        errors.append(max_logprob_error(output, ref_logprobs))
    print(f"\n[{shape}] max |logprob(vLLM) - logprob(reference)| per prompt: {[f'{e:.2e}' for e in errors]}")
    _record("logprob_max_abs_error", shape, max(errors))
    assert max(errors) < LOGPROB_ATOL


def _record(metric: str, shape: str, value: float) -> None:
    """Keep the measured figure where the closing note / README can quote it."""
    path = os.environ.get("VLLM_README_TEST_RECORD")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.exists(path) else {}
    data.setdefault(metric, {})[shape] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


@pytest.mark.parametrize("shape", ["gqa", "mha"])
def test_kv_cached_router_equals_full_recompute_token_by_token(tiny_checkpoints, shape):
    """Chunked prefill (16-token chunks) then decode: every step routes only
    its new tokens, and each token's expert equals the full-sequence router's."""
    path = tiny_checkpoints[shape]
    prompt = " ".join(PROMPTS)  # longer than one chunk
    with vllm_engine(path, max_num_batched_tokens=16, enable_chunked_prefill=True, max_num_seqs=1) as llm:
        llm.apply_model(start_route_trace)
        output = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        trace = llm.apply_model(take_route_trace)[0]
    sequence = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
    assert len(output.prompt_token_ids) > 32, "the prompt must span several prefill chunks"

    routes_by_position: dict[int, int] = {}
    step_sizes = []
    for positions, expert_ids in trace:
        step_sizes.append(len(positions))
        for position, expert in zip(positions.tolist(), expert_ids.tolist(), strict=True):
            routes_by_position[position] = expert
    # Decode steps carry one token each: the router never re-reads the sequence.
    assert max(step_sizes) <= 16 and step_sizes[-11:] == [1] * 11
    _, expected = load_reference(path).route(torch.tensor([sequence]))
    expected = expected[0].tolist()
    # The last sampled token is never fed back, so it has no route yet.
    assert [routes_by_position[p] for p in range(len(sequence) - 1)] == expected[:-1]


def test_torch_compile_gives_the_same_greedy_tokens_as_eager(tiny_gqa):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with vllm_engine(tiny_gqa, enforce_eager=False) as llm:
        compiled = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    reference = load_reference(tiny_gqa)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gqa)
    for prompt, tokens in zip(PROMPTS, compiled, strict=True):
        expected, _ = reference_greedy(reference, tok(prompt).input_ids, NEW_TOKENS)
        assert list(tokens) == expected


def _routed_kernels(model) -> list[str]:
    return [type(layer.mlp.routed_kernel).__name__ for layer in model.model.layers]


@pytest.mark.parametrize("kernel", ["auto", "fused_moe"])
def test_both_routed_expert_paths_match_the_reference(tiny_mha, kernel, monkeypatch):
    """On CPU the default calls vLLM's grouped GEMM directly (kernels.py); the
    FusedMoE layer stays the fallback (and the GPU path). Both must give the
    reference's logprobs, on the shape with unequal, zero-padded experts."""
    monkeypatch.setenv("VLLM_README_ROUTED_KERNEL", kernel)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    with vllm_engine(tiny_mha) as llm:
        chosen = llm.apply_model(_routed_kernels)[0]
        outputs = llm.generate(PROMPTS[:2], params)
    assert set(chosen) == {"CPUGroupedGemm" if kernel == "auto" else "NoneType"}
    reference = load_reference(tiny_mha)
    for output in outputs:
        expected_tokens, ref_logprobs = reference_greedy(reference, output.prompt_token_ids, 8)
        assert list(output.outputs[0].token_ids) == expected_tokens
        assert max_logprob_error(output, ref_logprobs) < LOGPROB_ATOL


def _routed_kernel_reasons(model) -> list[str]:
    from vllm_readme.model_executor.kernels import choose_routed_kernel

    return [choose_routed_kernel(layer.mlp.experts)[1] for layer in model.model.layers]


@pytest.mark.skipif(not current_platform.is_cpu(), reason="the direct grouped-GEMM call is the CPU build's path")
def test_cpu_build_calls_vllms_grouped_gemm_directly(tiny_gqa):
    """kernels.py reads FusedMoE's internals (in one place) to call vLLM's CPU
    grouped GEMM directly. If a vLLM upgrade moves them, the model quietly
    falls back to FusedMoE, right but slower: this test fails then, with why."""
    with vllm_engine(tiny_gqa) as llm:
        chosen = llm.apply_model(_routed_kernels)[0]
        reasons = llm.apply_model(_routed_kernel_reasons)[0]
    assert set(chosen) == {"CPUGroupedGemm"}, reasons


def test_unknown_routed_kernel_setting_is_named(monkeypatch):
    from vllm_readme.model_executor.kernels import choose_routed_kernel

    monkeypatch.setenv("VLLM_README_ROUTED_KERNEL", "triton")
    with pytest.raises(ValueError, match="VLLM_README_ROUTED_KERNEL='triton'.*unset it"):
        choose_routed_kernel(torch.nn.Module())
