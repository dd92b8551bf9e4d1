"""Evaluation: perplexity of the dense model, the Read-ME MoE and a dense
model pruned to the same active MLP size (the paper's comparison), plus
routing statistics; written as JSON and a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.loss.loss_utils import ForCausalLMLoss

from vllm_readme.refactor.router import predicted_experts


@torch.no_grad()
def perplexity(
    forward, blocks: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu", desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) over ``[rows, seq]`` blocks; ``forward(batch)``
    returns logits for a batch on ``device``. Always fp32 (no autocast), so
    perplexities compare across machines and build precisions."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch"):
        batch = blocks[start : start + batch_size].to(device)
        logits = forward(batch)
        # num_items_in_batch=1: the summed NLL (the mean over the whole set is taken below).
        total += float(ForCausalLMLoss(logits, batch, logits.shape[-1], num_items_in_batch=1))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def pruned_forward(dense, keep_masks: torch.Tensor):
    """Dense model whose every MLP keeps only ``keep_masks[layer]`` channels."""

    def forward(batch):
        hooks = [
            block.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args, mask=keep_masks[layer]: (args[0] * mask.to(args[0].device, args[0].dtype),)
            )
            for layer, block in enumerate(dense.model.layers)
        ]
        try:
            return dense(batch).logits
        finally:
            for hook in hooks:
                hook.remove()

    return forward


@torch.no_grad()
def routing_statistics(model, blocks: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Expert load, how often a token keeps the previous token's expert (the
    paper: 2921 of 4096 for Read-ME vs 850 for Mixtral) and, with targets,
    the router's accuracy against the best-covering expert."""
    routes = predicted_experts(model.router, blocks)
    num_experts = model.config.num_experts
    load = torch.bincount(routes.flatten(), minlength=num_experts).float()
    same = (routes[:, 1:] == routes[:, :-1]).float().mean()
    stats = {
        "tokens": routes.numel(),
        "expert_load_fraction": (load / load.sum()).tolist(),
        "load_max_over_mean": float(load.max() / load.mean()),
        "same_expert_as_previous_token": float(same),
        "same_expert_per_4096_tokens": round(float(same) * 4096),
    }
    if targets is not None:
        stats["router_accuracy"] = float((routes == targets).float().mean())
    return stats


def write_report(results: dict, out_dir: Path, name: str = "refactor") -> tuple[Path, Path]:
    """``name.json`` and ``name.png`` (perplexities, tuning curve, expert load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ppl = results["perplexity"]
    labels = list(ppl)[::-1]
    colors = ["#dd8452" if k.startswith("Read-ME") else "#4c72b0" for k in labels]
    axes[0].barh(labels, [ppl[k] for k in labels], color=colors)
    for i, key in enumerate(labels):
        axes[0].text(ppl[key], i, f" {ppl[key]:.2f}", va="center")
    axes[0].set_xlabel("held-out perplexity (lower is better)")
    axes[0].set_xlim(0, max(ppl.values()) * 1.18)
    axes[0].set_title(f"{results.get('model', '')}: active MLP {results.get('active_mlp_fraction', 0):.0%}")
    curve = results.get("tuning_curve") or []
    if curve:
        axes[1].plot(
            [c["tokens"] for c in curve],
            [c["perplexity"] for c in curve],
            marker="o",
            color="#dd8452",
            label="Read-ME MoE",
        )
        axes[1].axhline(ppl["dense"], color="gray", ls="--", label="dense (untuned)")
        tuned = ppl.get("dense (tuned, same tokens)")
        if tuned is not None:
            axes[1].axhline(tuned, color="#4c72b0", ls="--", label="dense tuned, same tokens")
            axes[1].axhline(tuned * 1.25, color="#4c72b0", ls=":", label="x 1.25")
        axes[1].set_xlabel("expert-tuning tokens")
        axes[1].set_ylabel("held-out perplexity")
        axes[1].legend(fontsize=8)
    axes[1].set_title("perplexity vs tuning tokens")
    load = results["routing"]["expert_load_fraction"]
    axes[2].bar(range(len(load)), load)
    axes[2].set_xlabel("expert")
    axes[2].set_ylabel("fraction of held-out tokens")
    axes[2].set_title(
        f"expert load; same expert as previous token: {results['routing']['same_expert_as_previous_token']:.0%}"
    )
    fig.tight_layout()
    png_path = out_dir / f"{name}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
