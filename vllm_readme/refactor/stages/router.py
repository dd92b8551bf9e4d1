# SPDX-License-Identifier: Apache-2.0
"""The router stage: the decoupled router, initialised from the backbone's
token embedding and distilled to predict the expert whose mask best covers
each token (paper Eq. 4; router.py holds the model and its training)."""

from __future__ import annotations

import json
import time

import torch

from vllm_readme.configuration_readme import RouterConfig
from vllm_readme.precision import Precision
from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.cache import StageCache, load_tensors
from vllm_readme.refactor.experts import ExpertLayout
from vllm_readme.refactor.options import RefactorOptions
from vllm_readme.refactor.router import expert_scores, init_router, router_accuracy, smoothed_targets, train_router
from vllm_readme.refactor.stages import log
from vllm_readme.refactor.stages.inputs import BuildInputs
from vllm_readme.refactor.training import TrainSettings


def router_config(options: RefactorOptions, dense_config, num_experts: int) -> RouterConfig:
    head_dim = options.router_hidden // options.router_heads
    config = RouterConfig(
        vocab_size=dense_config.vocab_size,
        num_experts=num_experts,
        num_hidden_layers=options.router_layers,
        hidden_size=options.router_hidden,
        num_attention_heads=options.router_heads,
        num_key_value_heads=options.router_heads,
        head_dim=head_dim,
        intermediate_size=options.router_hidden,
        max_position_embeddings=dense_config.max_position_embeddings,
        rope_theta=float(dense_config.rope_parameters.get("rope_theta", 10000.0)),
        rms_norm_eps=dense_config.rms_norm_eps,
    )
    config.validate()
    return config


def distill_router(
    cache: StageCache, inputs: BuildInputs, layout: ExpertLayout, precision: Precision
) -> tuple[RouterConfig, dict]:
    """The router's config and weights; a new router makes the tuning stale."""
    opts, path = cache.options, cache.path("router.pt")
    dense = inputs.dense
    config = router_config(opts, dense.config, layout.num_experts)
    if cache.reusable("router", "router.pt"):
        log("router: cached")
        return config, load_tensors(path)
    cache.invalidate("tune")
    t = time.time()
    blocks = torch.cat(data_mod.domain_blocks(inputs.tokenizer, inputs.calib, opts.block_len, opts.router_tokens))
    scores_path = cache.path("router_scores.pt")
    # Scores depend on the masks and on the blocks: reuse them only if
    # both are unchanged (the experts stage deletes them when it reruns).
    scores = load_tensors(scores_path) if scores_path.is_file() else None
    if scores is None or scores.shape[:2] != blocks.shape:
        scores = expert_scores(dense, blocks, layout.masks, dtype=precision.dtype)
        torch.save(scores, scores_path)
    targets = smoothed_targets(scores, opts.router_smoothing)
    persistence = float((targets[:, 1:] == targets[:, :-1]).float().mean())
    log(f"router targets: smoothing {opts.router_smoothing}, same expert as the previous token {persistence:.1%}")
    router = init_router(config, dense.model.embed_tokens.weight.detach().cpu(), opts.seed)
    router.to(precision.device)
    settings = TrainSettings(opts.router_steps, opts.router_batch, opts.router_lr, opts.seed, opts.checkpoint_every)
    history = train_router(
        router, blocks, targets, settings, cache.training_dir("router", "router"), log, opts.router_persistence
    )
    acc = router_accuracy(router, blocks[: 4 * opts.router_batch], targets[: 4 * opts.router_batch])
    log(
        f"router: {len(history)} steps this run, final loss {history[-1][1] if history else float('nan'):.4f}, "
        f"training accuracy {acc:.1%}"
    )
    router_state = {name: tensor.cpu() for name, tensor in router.state_dict().items()}
    torch.save(router_state, path)
    cache.path("router_history.json").write_text(json.dumps(history))
    cache.done("router", t)
    return config, router_state
