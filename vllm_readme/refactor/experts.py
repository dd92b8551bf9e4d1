# SPDX-License-Identifier: Apache-2.0
"""Expert masks from activation sparsity (paper §3.1) and per-token targets.

A mask keeps ``keep`` channels of a layer's MLP. Expert e of layer l is the
mask ``masks[l, e]``; the channels every expert keeps form the shared part.
A token is best served by the expert whose mask covers most of its
activation mass, summed over layers (paper Eq. 4): that is the router's
target and the assignment step of the clustering below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from vllm_readme.configuration_readme import ReadMEConfigError
from vllm_readme.refactor.activations import normalized


@dataclass
class ExpertLayout:
    """``masks``: bool ``[layers, experts, channels]``, each row keeping the
    same number of channels; ``shared``: bool ``[layers, channels]``, a subset
    of every expert's mask, the same size in every layer."""

    masks: torch.Tensor
    shared: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.masks.shape[1]

    @property
    def active_size(self) -> int:
        return int(self.masks[0, 0].sum())

    @property
    def shared_size(self) -> int:
        return int(self.shared[0].sum())


def kept_channels(inter: int, keep_fraction: float, num_experts: int) -> int:
    if not 0 < keep_fraction <= 1:
        raise ReadMEConfigError(f"--keep must lie in (0, 1], got {keep_fraction}.")
    keep = max(1, round(inter * keep_fraction))
    if num_experts < 1 or num_experts > inter:
        raise ReadMEConfigError(
            f"--num-experts {num_experts} is not possible: the MLP has {inter} channels "
            "(need 1 <= experts <= channels)."
        )
    return keep


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the ``keep`` highest scores along the last dim."""
    idx = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def coverage(acts: torch.Tensor, masks: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``[tokens, experts]``: activation mass each expert's masks keep,
    summed over layers (acts ``[tokens, layers, channels]``)."""
    n, num_layers, _ = acts.shape
    out = torch.zeros(n, masks.shape[1])
    for start in range(0, n, chunk):
        part = acts[start : start + chunk]
        for layer in range(num_layers):
            out[start : start + chunk] += normalized(part[:, layer]) @ masks[layer].T.float()
    return out


def layer_means(acts: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[layers, channels]`` mean normalized activation over (some) tokens."""
    part = acts if rows is None else acts[rows]
    return torch.stack([normalized(part[:, layer]).mean(0) for layer in range(acts.shape[1])])


def fit_masks_by_clustering(
    acts: torch.Tensor, num_experts: int, keep: int, iterations: int = 15, seed: int = 0
) -> torch.Tensor:
    """Coverage k-means: assign each token to the expert covering most of its
    activation mass, then re-pick each expert's top channels from its tokens'
    mean activation. Seeds are tokens picked far apart (k-means++ style)."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    sample = acts[torch.randperm(n, generator=gen)[: min(n, 4096)]]
    first = int(torch.randint(len(sample), (1,), generator=gen))
    seeds = [top_channels(layer_means(sample, torch.tensor([first])), keep)]
    for _ in range(1, num_experts):
        best = coverage(sample, torch.stack(seeds, dim=1)).max(dim=1).values
        weights = (best.max() - best + 1e-6) ** 2
        pick = int(torch.multinomial(weights, 1, generator=gen))
        seeds.append(top_channels(layer_means(sample, torch.tensor([pick])), keep))
    masks = torch.stack(seeds, dim=1)  # [L, E, I]
    for _ in tqdm(range(iterations), desc="clustering tokens into experts", unit="iter"):
        assignment = coverage(acts, masks).argmax(dim=1)
        new = []
        for expert in range(num_experts):
            rows = (assignment == expert).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:  # reseed an empty expert from the worst-covered tokens
                worst = coverage(acts, masks).max(dim=1).values.argsort()[: max(1, n // (4 * num_experts))]
                rows = worst
            new.append(top_channels(layer_means(acts, rows), keep))
        masks = torch.stack(new, dim=1)
    return masks


def masks_from_domains(domain_means: list[torch.Tensor], keep: int) -> torch.Tensor:
    """The paper's recipe: expert d keeps domain d's top channels by mean
    activation (``domain_means``: one ``[layers, channels]`` per domain)."""
    return torch.stack([top_channels(means, keep) for means in domain_means], dim=1)


def layout_from_masks(masks: torch.Tensor, channel_scores: torch.Tensor) -> ExpertLayout:
    """Shared part = channels every expert keeps, cut to the smallest
    intersection over layers (by ``channel_scores`` ``[layers, channels]``) so
    that every layer has the same shared and expert sizes: no padding."""
    intersection = masks.all(dim=1)  # [L, I]
    shared_size = int(intersection.sum(dim=1).min())
    if shared_size == 0:
        return ExpertLayout(masks=masks, shared=torch.zeros_like(intersection))
    scores = channel_scores.masked_fill(~intersection, float("-inf"))
    return ExpertLayout(masks=masks, shared=top_channels(scores, shared_size))


def disjoint_sizes(inter: int, keep: int, num_experts: int) -> tuple[int, int]:
    """(shared, own per expert) channels when the experts partition the
    non-shared channels: shared + own = keep and shared + E * own = inter."""
    if num_experts < 2:
        return keep, 0
    own = (inter - keep) // (num_experts - 1)
    return keep - own, own


def fit_disjoint_masks(
    acts: torch.Tensor, num_experts: int, keep: int, iterations: int = 10, seed: int = 0
) -> torch.Tensor:
    """Experts that partition the MLP: a shared part of the channels with the
    highest mean activation, the rest split into ``num_experts`` disjoint
    groups (every channel stored once, so the model has the dense model's
    size). Coverage k-means as in :func:`fit_masks_by_clustering`, with a
    balanced assignment of channels: per layer, (expert, channel) pairs by
    descending mean activation of the expert's tokens, each channel to one
    expert, each expert exactly ``own`` channels."""
    n, num_layers, inter = acts.shape
    shared_size, own = disjoint_sizes(inter, keep, num_experts)
    if own < 1:
        raise ReadMEConfigError(
            f"disjoint experts: keep={keep} of {inter} channels leaves no channel of their own to "
            f"{num_experts} experts; lower --keep or the number of experts."
        )
    means = layer_means(acts)
    shared = top_channels(means, shared_size)  # [L, I]
    gen = torch.Generator().manual_seed(seed)
    assignment = torch.randint(num_experts, (n,), generator=gen)
    masks = None
    for _ in tqdm(range(iterations), desc="partitioning channels into experts", unit="iter"):
        scores = torch.stack(
            [layer_means(acts, (assignment == e).nonzero(as_tuple=True)[0]) for e in range(num_experts)], dim=1
        )  # [L, E, I]
        scores = torch.nan_to_num(scores, nan=0.0).masked_fill(shared[:, None, :], float("-inf"))
        masks = torch.zeros(num_layers, num_experts, inter, dtype=torch.bool)
        for layer in range(num_layers):
            masks[layer] = _balanced_partition(scores[layer], own)
        masks |= shared[:, None, :]
        assignment = coverage(acts, masks).argmax(dim=1)
    return masks


def _balanced_partition(scores: torch.Tensor, own: int) -> torch.Tensor:
    """``[E, I]`` scores (-inf = not available) -> bool ``[E, I]``: each
    channel to at most one expert, each expert exactly ``own`` channels,
    greedily by descending score."""
    num_experts, inter = scores.shape
    values = scores.flatten().tolist()
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
    taken, count, chosen = [False] * inter, [0] * num_experts, []
    for index in order:
        if values[index] == float("-inf"):
            break
        expert, channel = divmod(index, inter)
        if count[expert] < own and not taken[channel]:
            chosen.append(index)
            taken[channel] = True
            count[expert] += 1
    out = torch.zeros(num_experts * inter, dtype=torch.bool)
    out[chosen] = True
    return out.view(num_experts, inter)
