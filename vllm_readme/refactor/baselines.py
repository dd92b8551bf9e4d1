# SPDX-License-Identifier: Apache-2.0
"""Baselines tuned with the same tokens as the Read-ME model.

Expert tuning also adapts the model to the calibration domain; comparing a
tuned MoE with an untuned dense model would credit routing with what is
domain adaptation. These baselines get the same blocks, steps and learning
rate: the dense model itself, and the dense model pruned to the MoE's active
MLP size (the paper's comparison)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from vllm_readme.precision import autocast
from vllm_readme.refactor.activations import model_device
from vllm_readme.refactor.evaluate import pruned_forward
from vllm_readme.refactor.training import TrainSettings, train


def tune_dense(
    dense,
    blocks: torch.Tensor,
    settings: TrainSettings,
    checkpoint_dir: Path,
    dtype: torch.dtype,
    keep_masks: torch.Tensor | None = None,
    log=print,
):
    """A tuned copy of ``dense`` (pruned to ``keep_masks`` if given); returns
    its forward function (logits) for evaluation. Trains on ``dense``'s
    device, autocast to ``dtype``."""
    model = copy.deepcopy(dense)
    device = model_device(model)
    for name, param in model.named_parameters():
        param.requires_grad = "embed_tokens" not in name and name != "lm_head.weight"
    forward = pruned_forward(model, keep_masks) if keep_masks is not None else (lambda b: model(b).logits)

    def loss_fn(rows: torch.Tensor, _step: int) -> torch.Tensor:
        batch = blocks[rows].to(device)
        with autocast(device, dtype):
            logits = forward(batch)
        return ForCausalLMLoss(logits, batch, logits.shape[-1])

    params = [p for p in model.parameters() if p.requires_grad]
    name = "tuning pruned dense baseline" if keep_masks is not None else "tuning dense baseline"
    model.train()
    train(name, params, model, loss_fn, len(blocks), settings, checkpoint_dir, log)
    model.eval()
    return forward
