# SPDX-License-Identifier: Apache-2.0
"""The experts stage: per-layer channel masks of the experts, and the
shared part every expert keeps (paper §3; experts.py holds the cuts)."""

from __future__ import annotations

import time

import torch

from vllm_readme.configuration_readme import ReadMEConfigError
from vllm_readme.refactor.cache import StageCache, load_tensors
from vllm_readme.refactor.experts import (
    ExpertLayout,
    disjoint_sizes,
    fit_disjoint_masks,
    fit_masks_by_clustering,
    layer_means,
    layout_from_masks,
    masks_from_domains,
)
from vllm_readme.refactor.stages import log
from vllm_readme.refactor.stages.activations import activation_statistics
from vllm_readme.refactor.stages.inputs import BuildInputs


def cut_experts(cache: StageCache, inputs: BuildInputs, dtype: torch.dtype) -> tuple[ExpertLayout, torch.Tensor]:
    """The expert layout and each layer's mean activation per channel;
    new experts make the router and the tuning stale."""
    opts, path = cache.options, cache.path("experts.pt")
    if cache.reusable("experts", "experts.pt"):
        saved = load_tensors(path)
        log("experts: cached")
        return ExpertLayout(saved["masks"], saved["shared"]), saved["means"]
    cache.invalidate("router")
    cache.invalidate("tune")
    cache.path("router_scores.pt").unlink(missing_ok=True)
    t = time.time()
    calib, keep = inputs.calib, inputs.keep
    domain_acts = activation_statistics(opts, inputs.dense, inputs.tokenizer, calib, dtype)
    acts = torch.cat(domain_acts)
    means = layer_means(acts)
    if opts.experts_from == "domains":
        if len(calib) < 2:
            raise ReadMEConfigError("--experts-from domains needs at least two calibration sources (one per expert).")
        masks = masks_from_domains([layer_means(a) for a in domain_acts], keep)
        log(f"experts: one per domain ({len(calib)}), top {keep} channels of each domain's mean activation")
    elif opts.experts_from == "clusters" and opts.expert_cut == "disjoint":
        masks = fit_disjoint_masks(acts, opts.num_experts, keep, opts.cluster_iterations, opts.seed)
        shared, own = disjoint_sizes(acts.shape[-1], keep, opts.num_experts)
        log(f"experts: {opts.num_experts} disjoint parts of {own} channels + {shared} shared (dense size)")
    elif opts.experts_from == "clusters":
        masks = fit_masks_by_clustering(acts, opts.num_experts, keep, opts.cluster_iterations, opts.seed)
        log(f"experts: {opts.num_experts} clusters of tokens by activation coverage, {keep} channels each")
    else:
        raise ReadMEConfigError(f"--experts-from must be 'clusters' or 'domains', got {opts.experts_from!r}.")
    layout = layout_from_masks(masks, means)
    torch.save({"masks": layout.masks, "shared": layout.shared, "means": means}, path)
    cache.done("experts", t)
    return layout, means
