# SPDX-License-Identifier: Apache-2.0
"""Statistics of the MLP's inner activation: the input of ``down_proj``,
``act(gate(x)) * up(x)``, whose magnitude says which channels a token uses."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from tqdm import tqdm

from vllm_readme.precision import autocast


@contextmanager
def down_proj_inputs(model, callback: Callable[[int, torch.Tensor], None]):
    """Call ``callback(layer, inner)`` with every layer's ``down_proj`` input."""
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args, layer=i: callback(layer, args[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` computes; the stages send their batches there."""
    return next(model.parameters()).device


@torch.no_grad()
def collect_activations(
    model, blocks: torch.Tensor, batch_size: int = 8, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[tokens, layers, channels]`` of ``|down_proj input|`` as float16 on
    the CPU; the model runs on its own device, autocast to ``dtype``."""
    device = model_device(model)
    num_layers = len(model.model.layers)
    inter = model.config.intermediate_size
    out = torch.empty(blocks.numel(), num_layers, inter, dtype=torch.float16)
    cursor = {"row": 0}

    def record(layer: int, inner: torch.Tensor) -> None:
        flat = inner.reshape(-1, inter).abs().to("cpu", torch.float16)
        out[cursor["row"] : cursor["row"] + flat.shape[0], layer] = flat

    with down_proj_inputs(model, record), autocast(device, dtype):
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="activation statistics", unit="batch"):
            batch = blocks[start : start + batch_size]
            # Only the layers' activations are wanted: logits for one position,
            # not [batch, seq, vocab] (the LM head is ~20% of SmolLM2's FLOPs).
            model(batch.to(device), logits_to_keep=1)
            cursor["row"] += batch.numel()
    return out


def normalized(acts_layer: torch.Tensor) -> torch.Tensor:
    """Each token's activation mass in one layer, summing to 1."""
    a = acts_layer.float()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
