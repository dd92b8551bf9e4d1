"""How the routed experts of a Read-ME layer are computed, and the one place
that reads vLLM's FusedMoE internals (docs/design.md, "Inside vLLM").

Read-ME knows every token's expert before the backbone runs, so a layer needs
no gate: only "token t uses weight slot s". Two paths do that:

* ``fused_moe``: vLLM's FusedMoE layer, handed the slots where it expects
  router logits and a routing function that returns them as they are. Used
  on GPU (Triton/CUTLASS grouped GEMM, CUDA graphs) and wherever the direct
  path does not apply.
* ``cpu_grouped_gemm``: vLLM's CPU grouped-GEMM kernel (``_C.cpu_fused_moe``)
  called directly on the weights FusedMoE already loaded and prepacked. The
  op is traced by torch.compile (it has a meta kernel); no host sync. It
  skips FusedMoE's Python runner (routing, prepare/finalize), which costs
  most in eager mode, where it runs for every layer of every step.
  ``benchmarks/decode.py`` compares the two paths
  (``VLLM_README_ROUTED_KERNEL=fused_moe``).

The choice is made once after the weights are loaded
(``choose_routed_kernel``) and logged. ``VLLM_README_ROUTED_KERNEL=fused_moe``
forces FusedMoE everywhere (for comparisons); the default is ``auto``.

What the plugin reads from FusedMoE beyond its constructor and forward
(vLLM 0.32): ``FusedMoEFactory`` returns a runner whose ``routed_experts``
module holds the weights ``w13_weight`` ``[E, 2I, H]`` and ``w2_weight``
``[E, H, I]``, their ``weight_loader`` (which takes a stacked ``[E, ...]``
tensor whole) and the kernel FusedMoE chose
(``quant_method.moe_kernel.fused_experts``). Only this module names them;
tests/test_vllm_model.py fails if an upgrade moves them and the CPU build
falls back to FusedMoE.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.platforms import current_platform

# Under vLLM's "vllm" logger: its handler, format and VLLM_LOGGING_LEVEL apply
# (a logger outside that tree has no handler, and INFO lines would be lost).
logger = init_logger(f"vllm.{__name__}")

ROUTED_KERNELS = ("auto", "fused_moe")
# Checkpoint projection -> FusedMoE's shard and parameter.
_EXPERT_SHARDS = {"gate_proj": ("w1", "w13_weight"), "up_proj": ("w3", "w13_weight"), "down_proj": ("w2", "w2_weight")}


def slots_as_given(
    hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedMoE's routing function. The layer passes the slots the model
    gathered once per forward (int32 ``[T, 1]``) where FusedMoE expects
    router logits, and FusedMoE hands them here untouched: they are the
    routes. Weight 1.0: Read-ME does not scale its expert's output."""
    return torch.ones(gating_output.shape, dtype=torch.float32, device=gating_output.device), gating_output


def load_stacked_experts(fused_moe: nn.Module, projection: str, tensor: torch.Tensor) -> str:
    """Load one stacked ``[E, ...]`` checkpoint tensor (``gate_proj``,
    ``up_proj`` or ``down_proj``) with FusedMoE's own weight loader, every
    expert in one call; returns the parameter's name under ``fused_moe``.
    Tensor parallelism slices it there, as for any FusedMoE weight."""
    shard, name = _EXPERT_SHARDS[projection]
    param = getattr(fused_moe.routed_experts, name)
    # A 3-D tensor is loaded whole ("full load"): expert_id is not used.
    param.weight_loader(param, tensor, name, shard_id=shard, expert_id=0)
    return f"routed_experts.{name}"


@dataclass(frozen=True)
class CPUGroupedGemm:
    """The direct CPU path over a FusedMoE layer's prepacked weights."""

    isa: str
    activation: str

    def __call__(
        self,
        fused_moe: nn.Module,
        hidden_states: torch.Tensor,
        slots: torch.Tensor,
        route_weights: torch.Tensor,
        pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``out[t] = expert_{slots[t]}(hidden_states[t])``; ``slots`` int32
        [T, 1], ``route_weights`` float32 [T, 1] ones. ``pool``: the expert
        cache's ``(w13, w2)`` slots shared by every layer, read instead of
        the layer's own weights."""
        experts = fused_moe.routed_experts
        w13, w2 = pool if pool is not None else (experts.w13_weight, experts.w2_weight)
        out = torch.empty_like(hidden_states)
        # Traced by torch.compile as is (the op has a meta kernel): no Python
        # wrapper runs per layer at decode time.
        torch.ops._C.cpu_fused_moe(
            out,
            hidden_states,
            w13,
            w2,
            None,
            None,
            route_weights,
            slots,
            False,
            self.activation,
            self.isa,
        )
        return out


def choose_routed_kernel(fused_moe: nn.Module) -> tuple[CPUGroupedGemm | None, str]:
    """The direct CPU kernel for this FusedMoE layer, or None (keep FusedMoE),
    with the reason either way. Call after FusedMoE processed its weights."""
    wanted = os.environ.get("VLLM_README_ROUTED_KERNEL", "auto")
    if wanted not in ROUTED_KERNELS:
        raise ValueError(
            f"VLLM_README_ROUTED_KERNEL={wanted!r} is not one of {list(ROUTED_KERNELS)}; unset it for the default."
        )
    if wanted == "fused_moe":
        return None, "FusedMoE (forced by VLLM_README_ROUTED_KERNEL=fused_moe)"
    if not current_platform.is_cpu():
        return None, f"{current_platform.device_name}: FusedMoE's grouped GEMM"
    if not hasattr(torch.ops._C, "cpu_fused_moe"):
        return None, "this vLLM build has no _C.cpu_fused_moe"
    routed = getattr(fused_moe, "routed_experts", None)
    moe_kernel = getattr(getattr(routed, "quant_method", None), "moe_kernel", None)
    impl = getattr(moe_kernel, "fused_experts", None)
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    if not isinstance(impl, CPUUnquantizedExperts):
        return None, f"FusedMoE chose {type(impl).__name__}, not the CPU grouped GEMM"
    # Unknown (renamed in a later vLLM): assume zentorch, whose weights the
    # direct call must not read; FusedMoE stays correct, and the test says so.
    if getattr(impl, "_use_zentorch", True):
        return None, "FusedMoE uses zentorch on this CPU (or this vLLM does not say)"
    if getattr(routed, "w13_bias", None) is not None:
        return None, "experts with biases"
    activation = impl.moe_config.activation.value
    return CPUGroupedGemm(isa=impl.isa, activation=activation), f"CPU grouped GEMM (isa={impl.isa}) called directly"


def pack_expert_page(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, w13_like: torch.Tensor, w2_like: torch.Tensor, isa: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's checkpoint rows in the CPU grouped GEMM's layout, as
    FusedMoE lays out a whole layer: ``w13 [2Ip, H]`` = gate rows, zero
    padding to the kernel's channel multiple ``Ip``, up rows, padding;
    ``w2 [H, Ip]``; then the kernel's prepacking. ``w13_like``/``w2_like``
    are FusedMoE's prepacked ``[E, ...]`` weights (shapes and dtype). The
    expert cache checks one page against FusedMoE's own at start-up
    (experts/cache.py), so a layout change in vLLM fails loudly."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import cpu_prepack_moe_weight

    padded = w13_like.shape[1] // 2
    channels = gate.shape[0]
    w13 = w13_like.new_zeros((1, *w13_like.shape[1:]))
    w13[0, :channels] = gate
    w13[0, padded : padded + channels] = up
    w2 = w2_like.new_zeros((1, *w2_like.shape[1:]))
    w2[0, :, :channels] = down
    return cpu_prepack_moe_weight(w13, isa)[0], cpu_prepack_moe_weight(w2, isa)[0]
