# SPDX-License-Identifier: Apache-2.0
"""Save and validate Read-ME checkpoint folders without any serving engine."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer

from vllm_readme.configuration_readme import (
    NOT_WEIGHTS,
    CheckpointFileError,
    ReadMEConfig,
    ReadMEConfigError,
    TensorShapeError,
    check_no_tensor_missing,
    checkpoint_tensor_shapes,
    tensor_shape_problem,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# config.json fields that size the checkpoint's tensors and have no default
# a Read-ME model could rely on.
REQUIRED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "num_experts",
    "expert_intermediate_size",
    "router",
)


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


def read_json_file(path: Path, fix: str) -> Any:
    """The JSON value in ``path``, or a CheckpointFileError naming the file,
    what is wrong and ``fix``."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: the file does not exist. {fix}") from None
    except OSError as exc:
        raise CheckpointFileError(f"{path}: cannot be read ({exc.strerror}). {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{path}: not valid JSON ({exc}). {fix}") from None
    except RecursionError:
        raise CheckpointFileError(f"{path}: JSON nested too deeply to read. {fix}") from None


def read_config_json(path: Path, fix: str) -> dict[str, Any]:
    """A model's config.json as a dict, or a CheckpointFileError naming the
    file: not JSON, not an object, or a dtype transformers cannot read (it
    would fail later with an error that names neither file nor field)."""
    config = read_json_file(path, fix)
    if not isinstance(config, dict):
        raise CheckpointFileError(f"{path}: holds a JSON {type(config).__name__}, not an object. {fix}")
    for field in ("torch_dtype", "dtype"):
        value = config.get(field)
        if value is not None and not (
            isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype)
        ):
            raise CheckpointFileError(
                f'{path}: {field}={value!r} is not a torch dtype; give one such as "float32" or "bfloat16", or null.'
            )
    return config


@contextmanager
def config_errors_named(config_file: Path) -> Iterator[None]:
    """Turn the errors of building a config from ``config_file``'s values
    (ours, or transformers' type checks) into one error naming the file."""
    try:
        yield
    except ReadMEConfigError as exc:
        message = str(exc)
        if message.startswith("config.json"):  # names the file already, without its folder
            raise type(exc)(f"{config_file.parent}/{message}") from exc
        raise type(exc)(f"{config_file}: {message}") from exc
    except (StrictDataclassError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointFileError(
            f"{config_file}: {' '.join(str(exc).split())}. Correct this field of config.json."
        ) from exc


def load_readme_config(path: str | Path) -> ReadMEConfig:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ReadMEConfigError(f"{path} is not a Read-ME checkpoint: config.json is missing.")
    fix = "Restore config.json from the checkpoint's source (`vllm-readme refactor` or `vllm-readme import`)."
    data = read_config_json(config_file, fix)
    if data.get("model_type") != ReadMEConfig.model_type:
        raise ReadMEConfigError(
            f"{config_file}: model_type is {data.get('model_type')!r}, expected 'readme'. "
            "Convert a dense model with `vllm-readme refactor` or the authors' checkpoint with `vllm-readme import`."
        )
    missing = [field for field in REQUIRED_CONFIG_FIELDS if field not in data]
    if missing:
        raise CheckpointFileError(f"{config_file}: lacks {missing}, which size the checkpoint's tensors. {fix}")
    with config_errors_named(config_file):
        return ReadMEConfig.from_pretrained(path)


def read_safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file (its header only)."""
    try:
        with safe_open(file, "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointFileError(
            f"{file}: not a readable safetensors file ({exc}); it is truncated or corrupt. "
            "Copy or export the checkpoint again."
        ) from None


def read_weight_map(index_file: Path, fix: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of a sharded
    checkpoint's index, or a CheckpointFileError naming the file and ``fix``."""
    index = read_json_file(index_file, fix)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFileError(f"{index_file}: has no weight_map object of tensor name -> file name. {fix}")
    return weight_map


def safetensors_files(folder: Path) -> dict[Path, set[str] | None]:
    """The weight files of ``folder``: with ``model.safetensors.index.json``
    the files it lists, each with the names it puts there; without, every
    ``*.safetensors`` (names None: whatever each holds)."""
    index_file = folder / SAFETENSORS_INDEX
    if not index_file.exists():
        return {file: None for file in sorted(folder.glob("*.safetensors"))}
    fix = "Write the index again (transformers' save_pretrained) or remove it for a single model.safetensors."
    weight_map = read_weight_map(index_file, fix)
    files: dict[Path, set[str]] = {}
    for name, file_name in weight_map.items():
        files.setdefault(folder / file_name, set()).add(name)
    missing = sorted(file.name for file in files if not file.is_file())
    if missing:
        raise CheckpointFileError(f"{index_file}: lists file(s) {missing} that are not in {folder}. {fix}")
    return files


def validate_checkpoint(path: str | Path) -> ReadMEConfig:
    """Check config, the tokenizer's size, and every tensor's name and shape
    against the config; raise ReadMEConfigError naming the first problem
    and its fix."""
    path = Path(path)
    config = load_readme_config(path)
    check_tokenizer_fits(config, path)  # the config's own consistency first, as vLLM checks it before weights
    files = safetensors_files(path)
    if not files:
        raise ReadMEConfigError(f"{path}: no *.safetensors weight files.")
    shapes = checkpoint_tensor_shapes(config)
    found: set[str] = set()
    for file, indexed_names in files.items():
        tensors = read_safetensors_shapes(file)
        if indexed_names is not None and not indexed_names <= set(tensors):
            absent = sorted(indexed_names - set(tensors))
            raise CheckpointFileError(
                f"{path / SAFETENSORS_INDEX}: puts {absent[:3]} in {file.name}, which does not hold them. "
                "Write the index again (transformers' save_pretrained)."
            )
        for name, shape in tensors.items():
            if name.endswith(NOT_WEIGHTS):
                continue
            problem = tensor_shape_problem(shapes, name, shape)
            if problem:
                raise TensorShapeError(f"{file}: {problem}")
            found.add(name)
    check_no_tensor_missing(shapes, found, str(path))
    return config


def weights_file_of(folder: Path, name: str) -> Path:
    """The safetensors file of ``folder`` that holds tensor ``name`` (for
    error messages); ``folder`` itself when no file can be told."""
    try:
        for file, names in safetensors_files(folder).items():
            if name in (names if names is not None else read_safetensors_shapes(file)):
                return file
    except ReadMEConfigError:
        pass
    return folder


def check_dense_folder(path: Path) -> None:
    """Refuse a dense model (``--dense`` of refactor / export-dense) whose
    files cannot be read, before any work starts. A .gguf file is read by
    transformers as it is."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointFileError(f"{path}: the .gguf file does not exist. Pass an existing file with --dense.")
        return
    if not path.is_dir():
        raise CheckpointFileError(f"{path}: no such folder. Pass an HF model folder or a .gguf file with --dense.")
    read_config_json(path / "config.json", "Pass the folder an HF model was saved to (save_pretrained).")
    for file in safetensors_files(path):
        read_safetensors_shapes(file)


def write_folder_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary sibling of ``out`` and rename it to
    ``out`` at the end, so that a failure leaves no half-written folder
    that looks like a finished one (the temporary folder is removed)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReadMEConfigError(f"{out}: already exists and is not empty. Remove it or choose another --out.")
    check_writable(out.parent, "the parent of --out")
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        write(partial)
        os.replace(partial, out)  # an empty ``out`` is replaced too
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


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
            f"{tokenizer_path}: the tokenizer has {size} tokens but router.vocab_size is {router_vocab}: token ids "
            f">= {router_vocab} could not be routed. Re-export the router with vocab_size >= {size}."
        )
    if size > config.vocab_size:
        raise ReadMEConfigError(
            f"{tokenizer_path}: the tokenizer has {size} tokens but vocab_size is {config.vocab_size}; the "
            "embedding is too small. Re-export the checkpoint with vocab_size >= the tokenizer's size."
        )
