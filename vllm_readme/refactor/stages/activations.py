# SPDX-License-Identifier: Apache-2.0
"""Activation statistics of the calibration text, per domain; shared
between builds with the same inputs through ``--stats-cache`` (the builds
of a frontier grid make them once)."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.activations import collect_activations
from vllm_readme.refactor.cache import keyed_file, load_tensors, stage_key, write_whole
from vllm_readme.refactor.options import RefactorOptions
from vllm_readme.refactor.stages import log


def activation_statistics(
    options: RefactorOptions, dense, tokenizer, calib: list[data_mod.Domain], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Per calibration domain ``[tokens, layers, channels]``; read from
    ``--stats-cache`` when a build with the same inputs wrote it there."""
    cached = None
    if options.stats_cache is not None:
        cached = keyed_file(Path(options.stats_cache), "activations", stage_key(options, "activations"), ".pt")
        if cached.is_file():
            log(f"activation statistics: shared cache {cached}")
            return load_tensors(cached)
    per_domain = data_mod.domain_blocks(tokenizer, calib, options.block_len, options.stats_tokens)
    domain_acts = [collect_activations(dense, blocks, dtype=dtype) for blocks in per_domain]
    if cached is not None:
        write_whole(cached, lambda partial: torch.save(domain_acts, partial))
    return domain_acts
