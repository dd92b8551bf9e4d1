# SPDX-License-Identifier: Apache-2.0
"""The decoupled router: initialisation and distillation (paper §3.2).

Targets come from the dense model: for every token, the expert whose mask
covers most of the token's activation mass, summed over layers (Eq. 4). The
router sees token ids only and learns to predict that expert with a
cross-entropy loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from vllm_readme.configuration_readme import RouterConfig
from vllm_readme.modeling_readme import ReadMERouter
from vllm_readme.precision import autocast
from vllm_readme.refactor.activations import down_proj_inputs, model_device, normalized
from vllm_readme.refactor.training import TrainSettings, train


@torch.no_grad()
def expert_scores(
    model, blocks: torch.Tensor, masks: torch.Tensor, batch_size: int = 8, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[rows, seq, experts]``: how much of each token's activation mass
    (summed over layers) each expert's mask covers (masks ``[L, E, I]``), on
    the CPU; the model runs on its own device, autocast to ``dtype``. The
    best-covering expert is the router's target (Eq. 4)."""
    device = model_device(model)
    scores = torch.zeros(*blocks.shape, masks.shape[1])
    masks = masks.to(device)
    current = {}

    def accumulate(layer: int, inner: torch.Tensor) -> None:
        current["scores"] += normalized(inner.abs()) @ masks[layer].T.float()

    with down_proj_inputs(model, accumulate), autocast(device, dtype):
        for start in tqdm(range(0, len(blocks), batch_size), desc="router targets", unit="batch"):
            batch = blocks[start : start + batch_size].to(device)
            current["scores"] = torch.zeros(*batch.shape, masks.shape[1], device=device)
            model(batch, logits_to_keep=1)  # activations only: skip the full-sequence LM head
            scores[start : start + batch_size] = current["scores"].cpu()
    return scores


def smoothed_targets(scores: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``[rows, seq]`` router targets: the best-covering expert of each token
    after a causal exponential moving average of the coverage scores over the
    preceding tokens (``s'_t = (1 - a) s_t + a s'_(t-1)``, a = ``smoothing``).
    0 is the paper's per-token target; larger values trade a little
    per-token coverage for runs of one expert (route locality), which expert
    caching and expert-aware batching live on. Causal, so the router (which
    sees tokens up to t) can learn it."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"router target smoothing must be in [0, 1), got {smoothing}.")
    if smoothing == 0.0:
        return scores.argmax(dim=-1)
    # Per-token scores are fractions summing to ~1 per layer; normalise so
    # every token weighs the same in the average.
    s = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
    out = torch.empty_like(s)
    running = s[:, 0]
    out[:, 0] = running
    for t in range(1, s.shape[1]):
        running = (1 - smoothing) * s[:, t] + smoothing * running
        out[:, t] = running
    return out.argmax(dim=-1)


def init_router(config: RouterConfig, backbone_embedding: torch.Tensor, seed: int) -> ReadMERouter:
    """Paper's init: the router's token embedding is the first ``hidden``
    columns of the backbone's (padded with small noise if the backbone is
    narrower)."""
    torch.manual_seed(seed)
    router = ReadMERouter(config)
    for module in router.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    with torch.no_grad():
        width = min(config.hidden_size, backbone_embedding.shape[1])
        rows = min(config.vocab_size, backbone_embedding.shape[0])
        router.embed_tokens.weight.normal_(0, 0.02)
        router.embed_tokens.weight[:rows, :width] = backbone_embedding[:rows, :width].float()
    return router


def train_router(
    router: ReadMERouter,
    blocks: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    checkpoint_dir: Path,
    log=print,
    persistence: float = 0.0,
) -> list[tuple[int, float]]:
    """Cross-entropy to the targets (paper Eq. 4); with ``persistence`` > 0,
    plus that weight times the mean probability that two consecutive tokens
    are routed differently (1 - <p_t, p_t-1>), which favours runs of one
    expert."""
    device = model_device(router)

    def loss_fn(rows: torch.Tensor, _step: int) -> torch.Tensor:
        logits = router(blocks[rows].to(device))
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[rows].to(device).reshape(-1)
        )
        if persistence > 0:
            probs = logits.float().softmax(-1)
            switch = 1 - (probs[:, 1:] * probs[:, :-1]).sum(-1)
            loss = loss + persistence * switch.mean()
        return loss

    router.train()
    history = train("router", list(router.parameters()), router, loss_fn, len(blocks), settings, checkpoint_dir, log)
    router.eval()
    return history


@torch.no_grad()
def predicted_experts(router: ReadMERouter, blocks: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``[rows, seq]`` expert id of every token, on the CPU; the router runs
    on its own device, ``batch_size`` rows at a time."""
    device = model_device(router)
    return torch.cat(
        [router(blocks[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(blocks), batch_size)]
    )


def router_accuracy(router: ReadMERouter, blocks: torch.Tensor, targets: torch.Tensor) -> float:
    return float((predicted_experts(router, blocks) == targets).float().mean())
