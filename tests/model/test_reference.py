# SPDX-License-Identifier: Apache-2.0
"""The reference implementation: causal router, KV-cached generation equal to
full recompute, the MoE equal to its dense-with-mask definition."""

import torch
from conftest import PROMPTS, load_reference
from transformers import AutoTokenizer


def test_router_is_causal_routes_never_depend_on_later_tokens(tiny_gqa):
    model = load_reference(tiny_gqa)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 5) % model.config.vocab_size
    logits, _ = model.route(ids)
    logits2, _ = model.route(changed)
    torch.testing.assert_close(logits[0, :12], logits2[0, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0, 12:], logits2[0, 12:])


def test_routes_use_several_experts(tiny_gqa, tiny_mha):
    for path in (tiny_gqa, tiny_mha):
        model = load_reference(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
        _, expert_ids = model.route(ids)
        assert len(expert_ids.unique()) >= 2, "a degenerate router would make every test below weaker"


def test_cached_generation_equals_full_recompute(tiny_mha):
    model = load_reference(tiny_mha)
    tok = AutoTokenizer.from_pretrained(tiny_mha)
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences).logits[0]
    prompt_len = ids.shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[prompt_len - 1 + step], rtol=1e-4, atol=1e-4)


def test_moe_equals_dense_mlp_masked_to_the_tokens_expert(tiny_gqa):
    """shared + padded expert e == the dense MLP over shared|expert-e channels."""
    model = load_reference(tiny_gqa)
    moe = model.model.layers[0].mlp
    e = moe.experts
    dense_gate = torch.cat([moe.shared.gate_proj.weight, *e.gate_proj])
    dense_up = torch.cat([moe.shared.up_proj.weight, *e.up_proj])
    dense_down = torch.cat([moe.shared.down_proj.weight.T, *e.down_proj.transpose(1, 2)]).T
    s, i = model.config.shared_intermediate_size, model.config.expert_intermediate_size
    x = torch.randn(10, model.config.hidden_size)
    expert_ids = torch.arange(10) % model.config.num_experts
    expected = []
    for row, expert in zip(x, expert_ids, strict=True):
        mask = torch.zeros(dense_gate.shape[0])
        mask[:s] = 1
        mask[s + expert * i : s + (expert + 1) * i] = 1
        inner = torch.nn.functional.silu(dense_gate @ row) * (dense_up @ row) * mask
        expected.append(dense_down @ inner)
    torch.testing.assert_close(moe(x, expert_ids), torch.stack(expected), rtol=1e-5, atol=1e-5)
