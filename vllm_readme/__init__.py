# SPDX-License-Identifier: Apache-2.0
"""vllm-readme: serve router-decoupled Mixture-of-Experts (Read-ME) models in vLLM.

Importing the package registers the Read-ME format with transformers' Auto
classes (no vLLM needed). vLLM calls :func:`register` through the
``vllm.general_plugins`` entry point in every process it starts, so the
import stays light: the reference model (``vllm_readme.ReadMEForCausalLM``,
``modeling_readme.py``) is imported on first use, by name or through
``AutoModelForCausalLM``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from vllm_readme.configuration_readme import ReadMEConfig, ReadMEConfigError, RouterConfig

__version__ = "0.1.0"
__all__ = ["ReadMEConfig", "ReadMEConfigError", "ReadMEForCausalLM", "RouterConfig", "register"]

ARCHITECTURE = "ReadMEForCausalLM"
VLLM_MODEL_CLASS = "vllm_readme.model_executor.readme:ReadMEForCausalLM"


def __getattr__(name: str):
    if name == "ReadMEForCausalLM":
        return _reference_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _reference_model() -> type:
    """The reference model class, registered with AutoModelForCausalLM in
    place of the stand-in below once imported."""
    from vllm_readme.modeling_readme import ReadMEForCausalLM

    AutoModelForCausalLM.register(ReadMEConfig, ReadMEForCausalLM, exist_ok=True)
    return ReadMEForCausalLM


class _ReferenceModelOnFirstUse:
    """What AutoModelForCausalLM maps ReadMEConfig to until the reference
    model is first used: transformers only calls these two class methods."""

    config_class = ReadMEConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _reference_model().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return _reference_model()._from_config(*args, **kwargs)


AutoConfig.register(ReadMEConfig.model_type, ReadMEConfig, exist_ok=True)
AutoModelForCausalLM.register(ReadMEConfig, _ReferenceModelOnFirstUse, exist_ok=True)


def register() -> None:
    """vLLM plugin entry point. Idempotent; imports vLLM lazily."""
    from vllm import ModelRegistry

    from vllm_readme.model_executor.config import check_serving_config
    from vllm_readme.vllm_internals import register_config_checks

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:Class" string: vLLM imports the model only where it runs.
        ModelRegistry.register_model(ARCHITECTURE, VLLM_MODEL_CLASS)
    # Run by vLLM while it validates its config, before the model is built.
    register_config_checks(ARCHITECTURE, check_serving_config)
