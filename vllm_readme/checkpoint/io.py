"""Save and validate Read-ME checkpoint folders without any serving engine."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from vllm_readme.configuration_readme import ReadMEConfig, ReadMEConfigError


def save_readme_checkpoint(model, tokenizer, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer into ``out_dir``."""
    out = Path(out_dir)
    check_writable(out)
    model.config.architectures = ["ReadMEForCausalLM"]
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def check_writable(folder: Path, what: str = "--out") -> None:
    """Create ``folder`` and prove it writable, or name the problem."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ReadMEConfigError(f"cannot write to {what} {folder}: {exc.strerror}. Choose a writable folder.") from exc


def load_readme_config(path: str | Path) -> ReadMEConfig:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ReadMEConfigError(f"{path} is not a Read-ME checkpoint: config.json is missing.")
    data = json.loads(config_file.read_text())
    if data.get("model_type") != ReadMEConfig.model_type:
        raise ReadMEConfigError(
            f"{config_file}: model_type is {data.get('model_type')!r}, expected 'readme'. "
            "Convert a dense model with `vllm-readme refactor` or the authors' checkpoint with `vllm-readme import`."
        )
    return ReadMEConfig.from_pretrained(path)


def validate_checkpoint(path: str | Path) -> ReadMEConfig:
    """Check config, weight names/shapes and tokenizer size; raise
    ReadMEConfigError naming the first problem and its fix."""
    path = Path(path)
    config = load_readme_config(path)
    shapes = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ReadMEConfigError(f"{path}: no *.safetensors weight files.")
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if not any(n.startswith("router.") for n in shapes):
        raise ReadMEConfigError(f"{path}: the checkpoint has no router weights (router.*).")
    for name, shape in shapes.items():
        if ".mlp.experts." in name and shape[0] != config.num_experts:
            raise ReadMEConfigError(
                f"{path}: {name} holds {shape[0]} experts but config.json says num_experts={config.num_experts}."
            )
    check_tokenizer_fits(config, path)
    return config


def check_tokenizer_fits(config: ReadMEConfig, tokenizer_path: str | Path) -> None:
    """Every token id the tokenizer can emit must be routable and embeddable."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    except (OSError, ValueError):
        return  # no tokenizer here (e.g. --skip-tokenizer-init); vLLM reports it
    size = len(tokenizer)
    router_vocab = config.router_config.vocab_size
    if size > router_vocab:
        raise ReadMEConfigError(
            f"the tokenizer has {size} tokens but router.vocab_size is {router_vocab}: token ids "
            f">= {router_vocab} could not be routed. Re-export the router with vocab_size >= {size}."
        )
    if size > config.vocab_size:
        raise ReadMEConfigError(
            f"the tokenizer has {size} tokens but vocab_size is {config.vocab_size}; the embedding is too small."
        )
