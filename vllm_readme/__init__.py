"""vllm-readme: serve router-decoupled Mixture-of-Experts (Read-ME) models in vLLM.

Importing the package registers the Read-ME format with transformers' Auto
classes (no vLLM needed). vLLM calls :func:`register` through the
``vllm.general_plugins`` entry point in every process it starts.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from vllm_readme.configuration_readme import ReadMEConfig, ReadMEConfigError, RouterConfig
from vllm_readme.modeling_readme import ReadMEForCausalLM

__version__ = "0.1.0"
__all__ = ["ReadMEConfig", "ReadMEConfigError", "ReadMEForCausalLM", "RouterConfig", "register"]

ARCHITECTURE = "ReadMEForCausalLM"
VLLM_MODEL_CLASS = "vllm_readme.model_executor.readme:ReadMEForCausalLM"


def _register_with_transformers() -> None:
    try:
        AutoConfig.register(ReadMEConfig.model_type, ReadMEConfig)
    except ValueError:  # already registered (module re-imported)
        pass
    try:
        AutoModelForCausalLM.register(ReadMEConfig, ReadMEForCausalLM)
    except ValueError:
        pass


_register_with_transformers()


def register() -> None:
    """vLLM plugin entry point. Idempotent; imports vLLM lazily."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:Class" string: vLLM imports the model only where it runs.
        ModelRegistry.register_model(ARCHITECTURE, VLLM_MODEL_CLASS)
