"""Expert tuning (paper §3.2, expert stage): the router is frozen and the
backbone learns through the routed MLPs, with the LM loss (the paper's) or
by distillation from the dense model (KL to its next-token distribution:
needs no labels, and carries the dense model's behaviour, an instruct
model's included, to every domain instead of teaching it the calibration
text)."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_readme.modeling_readme import ReadMEForCausalLM
from vllm_readme.precision import autocast
from vllm_readme.refactor.activations import model_device
from vllm_readme.refactor.router import predicted_experts
from vllm_readme.refactor.training import TrainSettings, train


def tune_experts(
    model: ReadMEForCausalLM,
    blocks: torch.Tensor,
    settings: TrainSettings,
    checkpoint_dir: Path,
    dtype: torch.dtype,
    log=print,
    on_step=None,
    teacher=None,
) -> list[tuple[int, float]]:
    """Train attention, norms and MLPs; the router and the (tied) token
    embedding stay fixed. Routes come from the frozen router. The model
    trains on its own device, autocast to ``dtype``. With ``teacher`` (the
    dense model) the loss is KL(teacher || student) per token."""
    device = model_device(model)
    for name, param in model.named_parameters():
        param.requires_grad = not (name.startswith("router.") or "embed_tokens" in name or name == "lm_head.weight")
    routes = predicted_experts(model.router, blocks)

    def loss_fn(rows: torch.Tensor) -> torch.Tensor:
        batch = blocks[rows].to(device)
        with autocast(device, dtype):
            if teacher is None:
                return model(batch, expert_ids=routes[rows].to(device), labels=batch).loss
            with torch.no_grad():
                target = teacher(batch).logits.float().log_softmax(-1)
            student = model(batch, expert_ids=routes[rows].to(device)).logits.float().log_softmax(-1)
        return torch.nn.functional.kl_div(
            student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    history = train(
        "expert tuning", params, model, loss_fn, len(blocks), settings, checkpoint_dir, log, on_step=on_step
    )
    model.eval()
    for param in model.parameters():
        param.requires_grad = True
    return history
