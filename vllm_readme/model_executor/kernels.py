"""How the routed experts of a Read-ME layer are computed (issue 8).

Read-ME knows every token's expert before the backbone runs, so a layer needs
no gate: only "token t uses weight slot s". Two paths do that:

* ``fused_moe``: vLLM's FusedMoE layer, given the router's logits and a custom
  routing function (argmax -> slot). Used on GPU (Triton/CUTLASS grouped GEMM,
  CUDA graphs) and wherever the direct path does not apply.
* ``cpu_grouped_gemm``: vLLM's CPU grouped-GEMM kernel (``_C.cpu_fused_moe``)
  called directly on the weights FusedMoE already loaded and prepacked, with
  the slots computed once per forward instead of a routing function per
  layer. The op is traced by torch.compile (it has a meta kernel); no host
  sync. Measured (benchmarks/decode.py, README): the same speed as FusedMoE
  under torch.compile, 1.1-1.4x faster decode from batch 8 on in eager mode,
  where FusedMoE's Python runner (routing, prepare/finalize) runs per layer.

The choice is made once after the weights are loaded
(``choose_routed_kernel``) and logged. ``VLLM_README_ROUTED_KERNEL=fused_moe``
forces FusedMoE everywhere (for comparisons); the default is ``auto``.
"""

import os
from dataclasses import dataclass

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform

# Under vLLM's "vllm" logger: its handler, format and VLLM_LOGGING_LEVEL apply
# (a logger outside that tree has no handler, and INFO lines would be lost).
logger = init_logger(f"vllm.{__name__}")

ROUTED_KERNELS = ("auto", "fused_moe")


@dataclass(frozen=True)
class CPUGroupedGemm:
    """The direct CPU path: prepacked weights live on ``experts`` (FusedMoE's
    RoutedExperts module) as ``w13_weight`` / ``w2_weight``."""

    isa: str
    activation: str

    def __call__(
        self, experts: torch.nn.Module, hidden_states: torch.Tensor, slots: torch.Tensor, route_weights: torch.Tensor
    ) -> torch.Tensor:
        """``out[t] = expert_{slots[t]}(hidden_states[t])``; ``slots`` int32
        [T, 1], ``route_weights`` float32 [T, 1] ones."""
        out = torch.empty_like(hidden_states)
        # Traced by torch.compile as is (the op has a meta kernel): no Python
        # wrapper runs per layer at decode time.
        torch.ops._C.cpu_fused_moe(
            out,
            hidden_states,
            experts.w13_weight,
            experts.w2_weight,
            None,
            None,
            route_weights,
            slots,
            False,
            self.activation,
            self.isa,
        )
        return out


def choose_routed_kernel(fused_moe: torch.nn.Module) -> tuple[CPUGroupedGemm | None, str]:
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
    impl = getattr(
        getattr(getattr(getattr(routed, "quant_method", None), "moe_kernel", None), "impl", None), "fused_experts", None
    )
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    if not isinstance(impl, CPUUnquantizedExperts):
        return None, f"FusedMoE chose {type(impl).__name__}, not the CPU grouped GEMM"
    if getattr(impl, "_use_zentorch", False):
        return None, "FusedMoE uses zentorch on this CPU"
    if getattr(routed, "w13_bias", None) is not None:
        return None, "experts with biases"
    activation = impl.moe_config.activation.value
    return CPUGroupedGemm(isa=impl.isa, activation=activation), f"CPU grouped GEMM (isa={impl.isa}) called directly"
