"""Statistics of the MLP's inner activation: the input of ``down_proj``,
``act(gate(x)) * up(x)``, whose magnitude says which channels a token uses."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm


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


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def collect_activations(model, blocks: torch.Tensor, batch_size: int = 8, bf16: bool = True) -> torch.Tensor:
    """``[tokens, layers, channels]`` of ``|down_proj input|`` as float16."""
    num_layers = len(model.model.layers)
    inter = model.config.intermediate_size
    out = torch.empty(blocks.numel(), num_layers, inter, dtype=torch.float16)
    cursor = {"row": 0}

    def record(layer: int, inner: torch.Tensor) -> None:
        flat = inner.reshape(-1, inter).abs().to(torch.float16)
        out[cursor["row"] : cursor["row"] + flat.shape[0], layer] = flat

    with down_proj_inputs(model, record), autocast(bf16):
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="activation statistics", unit="batch"):
            batch = blocks[start : start + batch_size]
            model(batch)
            cursor["row"] += batch.numel()
    return out


def normalized(acts_layer: torch.Tensor) -> torch.Tensor:
    """Each token's activation mass in one layer, summing to 1."""
    a = acts_layer.float()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
