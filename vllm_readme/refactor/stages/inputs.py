# SPDX-License-Identifier: Apache-2.0
"""What every stage reads: the dense model, the calibration text and the
held-out blocks, loaded once per build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.dense import load_dense, load_dense_config
from vllm_readme.refactor.experts import kept_channels
from vllm_readme.refactor.options import RefactorOptions
from vllm_readme.refactor.stages import log


@dataclass
class BuildInputs:
    dense: torch.nn.Module
    tokenizer: object
    calib: list[data_mod.Domain]
    held_blocks: torch.Tensor  # held-out documents, disjoint from calib's
    intermediate_size: int  # the dense MLP's channels
    keep: int  # MLP channels a token uses (kept_channels)


def load_inputs(options: RefactorOptions, dense_path: Path, device: str) -> BuildInputs:
    """The calibration sources and the dense config are read before any weight."""
    domains = data_mod.load_domains(options.calib)
    inter = load_dense_config(dense_path).intermediate_size
    keep = kept_channels(inter, options.keep, options.num_experts)
    log(f"dense model: {dense_path}")
    dense, tokenizer = load_dense(dense_path)
    dense.to(device)
    calib, held = data_mod.split_domains(domains, options.held_out_fraction)
    held_blocks = torch.cat(
        data_mod.domain_blocks(tokenizer, [d for d in held if d.documents], options.block_len, options.held_out_tokens)
    )
    log(f"calibration: {', '.join(d.name for d in calib)}; held-out {held_blocks.numel()} tokens (disjoint documents)")
    return BuildInputs(dense, tokenizer, calib, held_blocks, inter, keep)
