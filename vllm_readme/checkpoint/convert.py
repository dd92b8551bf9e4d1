"""Dense MLP + channel masks -> Read-ME's shared/expert layout (DESIGN.md §2).

The paper's experts are masks over one dense MLP: expert e keeps the shared
("residual") channels plus its own. Read-ME stores the shared channels once
and each expert's own channels zero-padded to one size, which is exact: a
zero row of gate/up and a zero column of down add nothing.
"""

from __future__ import annotations

import torch


def split_dense_mlp(
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared_mask: torch.Tensor,
    expert_masks: torch.Tensor,
    expert_intermediate_size: int | None = None,
    additive: bool = False,
) -> dict[str, torch.Tensor | list[int]]:
    """Split one layer's dense MLP.

    gate_proj/up_proj: ``[I, H]``; down_proj: ``[H, I]``; shared_mask: bool
    ``[I]``; expert_masks: bool ``[E, I]``. By default expert e is the union
    shared | expert_masks[e], so shared channels in an expert mask are
    removed from the expert. ``additive=True`` is the authors' semantics
    (their MLP multiplies by ``residual + mask_e``): a channel in both masks
    counts twice, so it is kept in the expert as well. Returns shared ``[S, H]``/``[H, S]`` weights,
    stacked expert weights ``[E, P, H]``/``[E, H, P]`` and each expert's true
    channel count.
    """
    inter = gate_proj.shape[0]
    shared_mask = shared_mask.bool()
    expert_masks = expert_masks.bool()
    if shared_mask.shape != (inter,) or expert_masks.dim() != 2 or expert_masks.shape[1] != inter:
        raise ValueError(
            f"masks do not match the MLP: intermediate size {inter}, shared mask {tuple(shared_mask.shape)}, "
            f"expert masks {tuple(expert_masks.shape)}"
        )
    own = expert_masks if additive else expert_masks & ~shared_mask
    sizes = [int(n) for n in own.sum(dim=1)]
    padded = expert_intermediate_size or max(max(sizes), 1)
    if max(sizes) > padded:
        raise ValueError(f"an expert has {max(sizes)} channels, more than expert_intermediate_size={padded}")
    hidden = gate_proj.shape[1]
    num_experts = expert_masks.shape[0]
    experts_gate = gate_proj.new_zeros(num_experts, padded, hidden)
    experts_up = up_proj.new_zeros(num_experts, padded, hidden)
    experts_down = down_proj.new_zeros(num_experts, hidden, padded)
    for expert, channels in enumerate(own):
        idx = channels.nonzero(as_tuple=True)[0]
        n = idx.numel()
        experts_gate[expert, :n] = gate_proj[idx]
        experts_up[expert, :n] = up_proj[idx]
        experts_down[expert, :, :n] = down_proj[:, idx]
    shared_idx = shared_mask.nonzero(as_tuple=True)[0]
    return {
        "shared.gate_proj.weight": gate_proj[shared_idx].clone(),
        "shared.up_proj.weight": up_proj[shared_idx].clone(),
        "shared.down_proj.weight": down_proj[:, shared_idx].clone(),
        "experts.gate_proj": experts_gate,
        "experts.up_proj": experts_up,
        "experts.down_proj": experts_down,
        "sizes": sizes,
    }
