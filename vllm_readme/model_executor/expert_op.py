# SPDX-License-Identifier: Apache-2.0
"""The custom op through which the model asks the expert cache for a layer's
slots (experts/cache.py): ``torch.ops.vllm.readme_expert_slots(expert_ids,
hidden_states, cache_id, layer)``. torch.compile keeps it as one opaque call;
it takes the layer's input hidden states only so that it is ordered after the
previous layer's experts ran (a slot is never rewritten mid-read)."""

from __future__ import annotations

import torch

from vllm_readme.experts.cache import cache_by_id
from vllm_readme.vllm_internals import register_custom_op


def _expert_slots(expert_ids: torch.Tensor, hidden_states: torch.Tensor, cache_id: int, layer: int) -> torch.Tensor:
    return cache_by_id(cache_id).layer_slots(layer, expert_ids)


def _expert_slots_fake(expert_ids: torch.Tensor, hidden_states: torch.Tensor, cache_id: int, layer: int):
    return torch.empty((expert_ids.shape[0], 1), dtype=torch.int32, device=expert_ids.device)


register_custom_op("readme_expert_slots", _expert_slots, fake_impl=_expert_slots_fake)
