# SPDX-License-Identifier: Apache-2.0
"""How the routed experts of a Read-ME layer are computed (docs/design.md,
"Inside vLLM").

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
forces FusedMoE everywhere (for comparisons); the default is ``auto``
(envs.py).

What the direct path reads of FusedMoE beyond its constructor and forward
(the runner's ``routed_experts`` weights, the kernel FusedMoE chose, the
raw op and its prepacking) is read through vllm_internals.py, the one
module that touches vLLM's internals; tests/model/test_vllm_internals.py fails if
an upgrade moves one, and tests/model/test_vllm_model.py if the CPU build then
falls back to FusedMoE.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.platforms import current_platform

from vllm_readme import envs
from vllm_readme.vllm_internals import (
    cpu_fused_moe_op,
    cpu_grouped_gemm_settings,
    fused_experts_of,
    has_expert_biases,
    is_cpu_grouped_gemm,
    prepack_cpu_moe_weight,
    routed_expert_weights,
    uses_zentorch,
)

# Under vLLM's "vllm" logger: its handler, format and VLLM_LOGGING_LEVEL apply
# (a logger outside that tree has no handler, and INFO lines would be lost).
logger = init_logger(f"vllm.{__name__}")

ROUTED_KERNELS = ("auto", "fused_moe")


def slots_as_given(
    hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedMoE's routing function. The layer passes the slots the model
    gathered once per forward (int32 ``[T, 1]``) where FusedMoE expects
    router logits, and FusedMoE hands them here untouched: they are the
    routes. Weight 1.0: Read-ME does not scale its expert's output."""
    return torch.ones(gating_output.shape, dtype=torch.float32, device=gating_output.device), gating_output


@dataclass(frozen=True)
class CPUGroupedGemm:
    """The direct CPU path over a FusedMoE layer's prepacked weights."""

    isa: str
    activation: str
    op: object = field(repr=False, compare=False)  # torch.ops._C.cpu_fused_moe, bound once

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
        w13, w2 = pool if pool is not None else routed_expert_weights(fused_moe)
        out = torch.empty_like(hidden_states)
        # Traced by torch.compile as is (the op has a meta kernel): no Python
        # wrapper runs per layer at decode time.
        self.op(
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
    wanted = envs.VLLM_README_ROUTED_KERNEL
    if wanted not in ROUTED_KERNELS:
        raise ValueError(
            f"VLLM_README_ROUTED_KERNEL={wanted!r} is not one of {list(ROUTED_KERNELS)}; unset it for the default."
        )
    if wanted == "fused_moe":
        return None, "FusedMoE (forced by VLLM_README_ROUTED_KERNEL=fused_moe)"
    if not current_platform.is_cpu():
        return None, f"{current_platform.device_name}: FusedMoE's grouped GEMM"
    op = cpu_fused_moe_op()
    if op is None:
        return None, "this vLLM build has no _C.cpu_fused_moe"
    impl = fused_experts_of(fused_moe)
    if not is_cpu_grouped_gemm(impl):
        return None, f"FusedMoE chose {type(impl).__name__}, not the CPU grouped GEMM"
    # Unknown (renamed in a later vLLM): assume zentorch, whose weights the
    # direct call must not read; FusedMoE stays correct, and the test says so.
    if uses_zentorch(impl):
        return None, "FusedMoE uses zentorch on this CPU (or this vLLM does not say)"
    if has_expert_biases(fused_moe):
        return None, "experts with biases"
    isa, activation = cpu_grouped_gemm_settings(impl)
    return CPUGroupedGemm(isa=isa, activation=activation, op=op), f"CPU grouped GEMM (isa={isa}) called directly"


def pack_expert_page(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, w13_like: torch.Tensor, w2_like: torch.Tensor, isa: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's checkpoint rows in the CPU grouped GEMM's layout, as
    FusedMoE lays out a whole layer: ``w13 [2Ip, H]`` = gate rows, zero
    padding to the kernel's channel multiple ``Ip``, up rows, padding;
    ``w2 [H, Ip]``; then the kernel's prepacking. ``w13_like``/``w2_like``
    are FusedMoE's prepacked ``[E, ...]`` weights (shapes and dtype). The
    expert cache checks one page against FusedMoE's own at start-up
    (experts/loader.py), so a layout change in vLLM fails loudly."""
    padded = w13_like.shape[1] // 2
    channels = gate.shape[0]
    w13 = w13_like.new_zeros((1, *w13_like.shape[1:]))
    w13[0, :channels] = gate
    w13[0, padded : padded + channels] = up
    w2 = w2_like.new_zeros((1, *w2_like.shape[1:]))
    w2[0, :, :channels] = down
    return prepack_cpu_moe_weight(w13, isa)[0], prepack_cpu_moe_weight(w2, isa)[0]
