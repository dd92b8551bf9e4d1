# SPDX-License-Identifier: Apache-2.0
"""Assemble a Read-ME model from a dense Llama, an expert layout and a router."""

from __future__ import annotations

import torch

from vllm_readme.checkpoint.convert import split_dense_mlp
from vllm_readme.configuration_readme import ReadMEConfig, RouterConfig, readme_config_from_dense
from vllm_readme.modeling_readme import ReadMEForCausalLM
from vllm_readme.refactor.experts import ExpertLayout


def readme_config(dense_config, layout: ExpertLayout, router: RouterConfig) -> ReadMEConfig:
    expert_size = layout.active_size - layout.shared_size
    return readme_config_from_dense(
        dense_config.to_dict(),
        num_experts=layout.num_experts,
        shared_intermediate_size=layout.shared_size,
        expert_intermediate_size=expert_size,
        expert_intermediate_sizes=[expert_size] * layout.num_experts,
        router=router.to_dict(),
    )


@torch.no_grad()
def build_readme_model(dense, layout: ExpertLayout, router_state: dict, router: RouterConfig) -> ReadMEForCausalLM:
    config = readme_config(dense.config, layout, router)
    model = ReadMEForCausalLM(config).to(torch.float32)
    state = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." in name:
            continue
        state[name] = tensor.float().cpu()  # the model is built on the CPU, whatever device dense is on
    for layer, block in enumerate(dense.model.layers):
        split = split_dense_mlp(
            block.mlp.gate_proj.weight.float().cpu(),
            block.mlp.up_proj.weight.float().cpu(),
            block.mlp.down_proj.weight.float().cpu(),
            layout.shared[layer],
            layout.masks[layer],
            expert_intermediate_size=config.expert_intermediate_size,
        )
        state.update(split.weights(f"model.layers.{layer}.mlp."))
    for name, tensor in router_state.items():
        state[f"router.{name}"] = tensor
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"building the Read-ME model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
