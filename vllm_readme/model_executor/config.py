# SPDX-License-Identifier: Apache-2.0
"""Start-up checks of a Read-ME model against how vLLM will serve it.

vLLM runs a per-architecture ``verify_and_update_config`` hook while it
validates its config, in the process that builds the engine, before any model
or worker exists (docs/design.md, "Inside vLLM"). ``vllm_readme.register``
registers :func:`check_serving_config` as this architecture's hook
(``vllm_internals.register_config_checks``), so what would otherwise fail
mid-request fails at start-up with the fix. This module stays light: every
vLLM process imports it through the plugin entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_readme.checkpoint.io import check_tokenizer_fits
from vllm_readme.configuration_readme import ReadMEConfig, ReadMEConfigError
from vllm_readme.options import ExpertCacheOptions, SchedulerOptions
from vllm_readme.vllm_internals import CPU_MOE_CHANNEL_MULTIPLE, pp_layer_range

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig


def check_serving_config(vllm_config: VllmConfig) -> None:
    """vLLM's ``verify_and_update_config`` hook for Read-ME models. The
    plugin's options are parsed here first (``SchedulerOptions.of``), once
    for this process and config."""
    model_config = vllm_config.model_config
    config = model_config.hf_config
    if not isinstance(config, ReadMEConfig):
        raise ReadMEConfigError(
            f"ReadMEForCausalLM needs config.json with model_type 'readme', got {type(config).__name__}."
        )
    router = config.router_config
    max_len = model_config.max_model_len
    if max_len > router.max_position_embeddings:
        raise ReadMEConfigError(
            f"max_model_len={max_len} exceeds the router's max_position_embeddings="
            f"{router.max_position_embeddings}: longer prompts could not be routed. "
            f"Pass --max-model-len {router.max_position_embeddings} (or less)."
        )
    if not model_config.skip_tokenizer_init:
        check_tokenizer_fits(config, model_config.tokenizer)
    parallel = vllm_config.parallel_config
    check_tensor_parallel_split(config, parallel.tensor_parallel_size)
    if parallel.enable_expert_parallel:
        raise ReadMEConfigError(
            "--enable-expert-parallel is not supported for Read-ME models: with it FusedMoE keeps only its "
            "rank's experts, numbered locally, while the router names experts globally, the CPU grouped GEMM "
            "ignores FusedMoE's expert map and the expert cache pages every expert on every rank, so tokens "
            "could reach another expert's weights. Leave "
            "--enable-expert-parallel out; --tensor-parallel-size splits the experts, --pipeline-parallel-size "
            "the layers (docs/scaling.md)."
        )
    # The plugin's serving options (additional_config["vllm_readme"]): a
    # bad value fails here, before any process or weight is started.
    scheduler = SchedulerOptions.of(vllm_config)
    if scheduler.route_source == "router":
        scheduler.check_route_window(router.max_position_embeddings)
    cache = ExpertCacheOptions.of(vllm_config)
    if cache.pool_size() is not None:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise ReadMEConfigError(
                f"expert_pool: the expert cache runs on the CPU grouped GEMM; on {current_platform.device_name} "
                "the routed experts run in FusedMoE's kernel, which reads its own weights (docs/expert_cache.md, "
                'GPU). Leave expert_pool out of additional_config["vllm_readme"].'
            )
        from vllm_readme.experts.cache import minimum_pages

        page_bytes = expert_page_bytes(config, model_config.dtype, parallel.tensor_parallel_size)
        # Each pipeline stage pools its own layers' pages: checked for the
        # stage with the fewest layers.
        cache.pool_pages(
            min(stage_layers(config.num_hidden_layers, parallel.pipeline_parallel_size)),
            config.num_experts,
            page_bytes,
            minimum_pages(config.num_experts),
        )


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vLLM splits them."""
    return [end - start for start, end in (pp_layer_range(num_layers, rank, pp) for rank in range(pp))]


def expert_page_bytes(config: ReadMEConfig, dtype: torch.dtype, tp: int) -> int:
    """Bytes of one (layer, expert) page on one rank, as the expert cache
    holds it: FusedMoE's w13 [2 Ip, H] and w2 [H, Ip], with Ip the rank's
    expert channels padded for the CPU grouped GEMM. Known from the config,
    so a pool given in bytes is checked before any weight loads."""
    channels = config.expert_intermediate_size // tp
    padded = -(-channels // CPU_MOE_CHANNEL_MULTIPLE) * CPU_MOE_CHANNEL_MULTIPLE
    return 3 * padded * config.hidden_size * dtype.itemsize


def check_tensor_parallel_split(config: ReadMEConfig, tp: int) -> None:
    """Heads and intermediate channels split evenly over the ranks."""
    router = config.router_config
    for what, size in (
        ("num_attention_heads", config.num_attention_heads),
        ("expert_intermediate_size", config.expert_intermediate_size),
        ("router.num_attention_heads", router.num_attention_heads),
        ("router.intermediate_size", router.intermediate_size),
    ):
        if size % tp:
            raise ReadMEConfigError(f"config.json: {what}={size} cannot be split over tensor_parallel_size={tp}.")
