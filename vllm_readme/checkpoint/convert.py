# SPDX-License-Identifier: Apache-2.0
"""Dense MLP + channel masks -> Read-ME's shared/expert layout
(docs/design.md, "Checkpoint format").

The paper's experts are masks over one dense MLP: expert e keeps the shared
("residual") channels plus its own. Read-ME stores the shared channels once
and each expert's own channels zero-padded to one size, which is exact: a
zero row of gate/up and a zero column of down add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SplitMLP:
    """One layer's MLP in the Read-ME layout."""

    shared: dict[str, torch.Tensor]  # gate_proj, up_proj [S, H]; down_proj [H, S]
    experts: dict[str, torch.Tensor]  # gate_proj, up_proj [E, P, H]; down_proj [E, H, P]
    sizes: list[int]  # each expert's true channel count (the rest of P is zero)

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint's names under ``prefix`` (``model.layers.N.mlp.``);
        an empty shared part has no weights."""
        out = {}
        if self.shared["gate_proj"].shape[0]:
            out.update({f"{prefix}shared.{proj}.weight": w for proj, w in self.shared.items()})
        out.update({f"{prefix}experts.{proj}": w for proj, w in self.experts.items()})
        return out


def split_dense_mlp(
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared_mask: torch.Tensor,
    expert_masks: torch.Tensor,
    expert_intermediate_size: int | None = None,
    shared_intermediate_size: int | None = None,
    additive: bool = False,
) -> SplitMLP:
    """Split one layer's dense MLP.

    gate_proj/up_proj: ``[I, H]``; down_proj: ``[H, I]``; shared_mask: bool
    ``[I]``; expert_masks: bool ``[E, I]``. By default expert e is the union
    shared | expert_masks[e], so shared channels in an expert mask are
    removed from the expert. ``additive=True`` is the authors' semantics
    (their MLP multiplies by ``residual + mask_e``): a channel in both masks
    counts twice, so it is kept in the expert as well. Experts are padded to
    ``expert_intermediate_size`` (default: the largest), the shared part to
    ``shared_intermediate_size`` (default: its size).
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
    shared_idx = shared_mask.nonzero(as_tuple=True)[0]
    shared_size = shared_intermediate_size if shared_intermediate_size is not None else shared_idx.numel()
    mlp = (gate_proj, up_proj, down_proj)
    shared = _take_channels(*mlp, [shared_idx], shared_size)
    experts = _take_channels(*mlp, [channels.nonzero(as_tuple=True)[0] for channels in own], padded)
    return SplitMLP(shared={proj: w[0] for proj, w in shared.items()}, experts=experts, sizes=sizes)


def _take_channels(
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, channel_sets: list[torch.Tensor], size: int
) -> dict[str, torch.Tensor]:
    """For each set of channel indices: its gate/up rows ``[N, size, H]`` and
    down columns ``[N, H, size]``, zero-padded to ``size``."""
    hidden = gate_proj.shape[1]
    gate = gate_proj.new_zeros(len(channel_sets), size, hidden)
    up = up_proj.new_zeros(len(channel_sets), size, hidden)
    down = down_proj.new_zeros(len(channel_sets), hidden, size)
    for i, idx in enumerate(channel_sets):
        n = idx.numel()
        gate[i, :n] = gate_proj[idx]
        up[i, :n] = up_proj[idx]
        down[i, :, :n] = down_proj[:, idx]
    return {"gate_proj": gate, "up_proj": up, "down_proj": down}
