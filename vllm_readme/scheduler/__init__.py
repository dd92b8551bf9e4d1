# SPDX-License-Identifier: Apache-2.0
"""Expert-aware scheduling (paper §4.2, Algorithm 1).

Plain-Python algorithms (``policy``, ``cost_model``: no vLLM, no torch;
benchmarks/simulation.py replays them offline), the router copy that knows
routes ahead (``routes_ahead``, torch) and the vLLM scheduler classes,
imported on first use so that the plain parts stay importable without vLLM::

    --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler
    --scheduler-cls vllm_readme.scheduler.ExpertAwareAsyncScheduler
"""

_VLLM_CLASSES = ("ExpertAwareScheduler", "ExpertAwareAsyncScheduler", "ExpertAwareMixin")


def __getattr__(name: str):
    if name in _VLLM_CLASSES:
        from vllm_readme.scheduler import vllm_scheduler

        return getattr(vllm_scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
