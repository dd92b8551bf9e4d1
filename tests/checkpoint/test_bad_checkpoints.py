# SPDX-License-Identifier: Apache-2.0
"""Bad checkpoints fail at start-up with one clear message (docs/design.md,
invariant 5)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import edit_config, error_chain, vllm_engine
from safetensors.torch import load_file, save_file

from vllm_readme.checkpoint.io import validate_checkpoint
from vllm_readme.configuration_readme import ReadMEConfigError, TensorShapeError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    save_file(edit(weights), path / "model.safetensors", metadata={"format": "pt"})


def _engine_error(path, **overrides) -> str:
    with pytest.raises(Exception) as info:
        with vllm_engine(path, **overrides):
            pass
    return error_chain(info.value)


def test_missing_router_weights(tiny_gqa, tmp_path):
    bad = _copy(tiny_gqa, tmp_path / "bad")
    _edit_weights(bad, lambda w: {k: v for k, v in w.items() if not k.startswith("router.layers")})
    message = _engine_error(bad)
    assert "checkpoint is missing" in message and "router weight(s)" in message
    assert "router.layers.0" in message


def test_expert_count_that_disagrees_with_the_weights(tiny_gqa, tmp_path):
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit_config(bad, num_experts=3, expert_intermediate_sizes=[64, 64, 64], **{"router.num_experts": 3})
    _edit_weights(bad, lambda w: {k: (v[:3] if k.startswith("router.expert_head") else v) for k, v in w.items()})
    message = _engine_error(bad)
    assert re.search(r"has shape \[4, \d+, \d+\], but config.json implies \[3, \d+, \d+\] \(\[num_experts,", message)


def test_router_vocab_smaller_than_the_tokenizer(tiny_gqa, tmp_path):
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit_config(bad, vocab_size=300, **{"router.vocab_size": 300})
    message = _engine_error(bad)
    assert "the tokenizer has" in message and "router.vocab_size is 300" in message


def test_unknown_activation(tiny_gqa, tmp_path):
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit_config(bad, hidden_act="swiglu_v9")
    message = _engine_error(bad)
    assert "hidden_act='swiglu_v9' is not supported" in message


def test_context_longer_than_the_router_positions(tiny_gqa, tmp_path):
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit_config(bad, **{"router.max_position_embeddings": 256})
    message = _engine_error(bad, max_model_len=512)
    assert "exceeds the router's max_position_embeddings=256" in message
    assert "--max-model-len 256" in message


def test_a_good_engine_still_starts_after_the_failures(tiny_gqa):
    """Failed start-ups leave nothing behind that breaks the next engine."""
    from vllm import SamplingParams

    with vllm_engine(tiny_gqa) as llm:
        out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


# ---------------------------------------------------------------------------
# A tensor that disagrees with config.json is refused by `validate` and by
# vLLM's loader with the same words, never narrowed into a larger parameter.


def _narrower_experts(path):
    """config.json says 96 channels per expert; the tensors hold 64."""
    edit_config(path, expert_intermediate_size=96)


def _wider_experts(path):
    edit_config(path, expert_intermediate_size=48, expert_intermediate_sizes=[48] * 4)


def _wider_shared_part(path):
    edit_config(path, shared_intermediate_size=48)


def _narrower_router_mlp(path):
    edit_config(path, **{"router.intermediate_size": 96})


def _more_kv_heads(path):
    edit_config(path, num_key_value_heads=4)


def _unexpected_router_bias(path):
    """vLLM's AutoWeightsLoader drops unexpected biases silently."""
    edit_config(path, **{"router.bias": False})


def _missing_shared_weight(path):
    _edit_weights(path, lambda w: {k: v for k, v in w.items() if k != "model.layers.1.mlp.shared.up_proj.weight"})


MISMATCHES = {
    "narrower experts": (
        _narrower_experts,
        r"tensor 'model\.layers\.0\.mlp\.experts\.down_proj' has shape \[4, 128, 64\], "
        r"but config.json implies \[4, 128, 96\] \(\[num_experts, hidden_size, expert_intermediate_size\]\)",
    ),
    "wider experts": (_wider_experts, r"has shape \[4, 128, 64\], but config.json implies \[4, 128, 48\]"),
    "wider shared part": (
        _wider_shared_part,
        r"tensor 'model\.layers\.0\.mlp\.shared\.down_proj\.weight' has shape \[128, 32\], but config.json "
        r"implies \[128, 48\] \(\[hidden_size, shared_intermediate_size\]\)",
    ),
    "router MLP": (
        _narrower_router_mlp,
        r"tensor 'router\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 64\], but config.json implies "
        r"\[64, 96\] \(\[router\.hidden_size, router\.intermediate_size\]\)",
    ),
    "attention": (
        _more_kv_heads,
        r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[64, 128\], but config.json implies "
        r"\[128, 128\] \(\[num_key_value_heads\*head_dim, hidden_size\]\)",
    ),
    "unexpected bias": (
        _unexpected_router_bias,
        r"tensor 'router\.expert_head\.bias' is not part of a Read-ME checkpoint with this config.json",
    ),
    "missing tensor": (
        _missing_shared_weight,
        r"the checkpoint is missing 1 tensor\(s\) that config.json implies, e.g. "
        r"\['model\.layers\.1\.mlp\.shared\.up_proj\.weight'\]",
    ),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_a_tensor_that_disagrees_with_the_config_is_refused_by_validate_and_by_vllm(tiny_gqa, tmp_path, mismatch):
    edit, expected = MISMATCHES[mismatch]
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit(bad)
    with pytest.raises(TensorShapeError, match=expected) as info:
        validate_checkpoint(bad)
    file = "" if mismatch == "missing tensor" else "/model.safetensors"
    assert str(info.value).startswith(f"{bad}{file}: ")
    message = _engine_error(bad)
    assert str(info.value) in message, message


# ---------------------------------------------------------------------------
# The command line: a bad file ends in one line naming the file, what is
# wrong and the fix, with exit code 2; never a traceback.


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_readme.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def cli_error_line(result: subprocess.CompletedProcess, command: str, file) -> str:
    """The one error line of a failed command, which must name ``file``."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"vllm-readme {command}: error: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vllm-readme {command}: error: {file}"), lines[0]
    return lines[0]


def _shard_with_index(path, index) -> None:
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(index)


def _truncate(file) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _without_field(path, field) -> None:
    data = json.loads((path / "config.json").read_text())
    del data[field]
    (path / "config.json").write_text(json.dumps(data))


BAD_FILES = {
    "config.json not JSON": (
        lambda p: (p / "config.json").write_text('{"model_type": "readme",'),
        "config.json",
        r"not valid JSON .* Restore config.json",
    ),
    "config.json without a field": (
        lambda p: _without_field(p, "num_experts"),
        "config.json",
        r"lacks \['num_experts'\], which size the checkpoint's tensors",
    ),
    "config.json with a wrong type": (
        lambda p: edit_config(p, num_experts="four"),
        "config.json",
        r"num_experts='four' is not of type int; correct it in config.json",
    ),
    "truncated safetensors": (
        lambda p: _truncate(p / "model.safetensors"),
        "model.safetensors",
        r"not a readable safetensors file .* truncated or corrupt\. Copy or export the checkpoint again",
    ),
    "index not JSON": (
        lambda p: _shard_with_index(p, "weight_map:"),
        "model.safetensors.index.json",
        r"not valid JSON .* Write the index again",
    ),
    "index without weight_map": (
        lambda p: _shard_with_index(p, '{"metadata": {}}'),
        "model.safetensors.index.json",
        r"has no weight_map object",
    ),
    "index naming a missing file": (
        lambda p: _shard_with_index(p, json.dumps({"weight_map": {"lm_head.weight": "model-2.safetensors"}})),
        "model.safetensors.index.json",
        r"lists file\(s\) \['model-2.safetensors'\] that are not in",
    ),
    "narrower experts": (
        _narrower_experts,
        "model.safetensors",
        r"has shape \[4, 128, 64\], but config.json implies \[4, 128, 96\]",
    ),
}


@pytest.mark.parametrize("bad_file", list(BAD_FILES))
def test_validate_names_a_bad_file_in_one_line(tiny_gqa, tmp_path, bad_file):
    corrupt, file, message = BAD_FILES[bad_file]
    bad = _copy(tiny_gqa, tmp_path / "bad")
    corrupt(bad)
    line = cli_error_line(_cli("validate", bad), "validate", bad / file)
    assert re.search(message, line), line


def test_validate_accepts_a_sharded_checkpoint_with_its_index(tiny_gqa, tmp_path):
    good = _copy(tiny_gqa, tmp_path / "good")
    names = load_file(good / "model.safetensors").keys()
    _shard_with_index(good, json.dumps({"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    assert validate_checkpoint(good).num_experts == 4


def test_the_debug_option_shows_the_traceback(tiny_gqa, tmp_path):
    bad = _copy(tiny_gqa, tmp_path / "bad")
    (bad / "config.json").write_text("{")
    result = _cli("--debug", "validate", bad)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointFileError" in result.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("router.rms_norm_eps", True),
        ("router.gated_mlp", "no"),
        ("expert_intermediate_sizes", [64, 64, 64, "64"]),
        ("num_experts", 4.0),
    ],
)
def test_a_config_value_of_the_wrong_type_is_refused(tiny_gqa, tmp_path, field, value):
    """A value JSON can hold but the field cannot (true as an epsilon, a
    string as a flag) is named, not used as whatever Python makes of it."""
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit_config(bad, **{field: value})
    with pytest.raises(ReadMEConfigError, match=rf"{bad}/config.json: {re.escape(field)}=.* is not of type"):
        validate_checkpoint(bad)


@pytest.mark.parametrize(("field", "value"), [("torch_dtype", []), ("torch_dtype", 0.0), ("dtype", "float33")])
def test_a_dtype_that_is_not_a_torch_dtype_is_refused(tiny_gqa, tmp_path, field, value):
    """transformers reads a dtype with getattr(torch, value): anything but a
    dtype's name fails there, or later when the config is saved, without
    naming the file or the field."""
    bad = _copy(tiny_gqa, tmp_path / "bad")
    edit_config(bad, **{field: value})
    with pytest.raises(ReadMEConfigError, match=rf"{bad}/config.json: {field}=.* is not a torch dtype"):
        validate_checkpoint(bad)


def _dense_folder(tiny_gqa, path):
    """A folder shaped like a dense HF model: config.json and safetensors."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    shutil.copy(tiny_gqa / "model.safetensors", path / "model.safetensors")
    return path


@pytest.mark.parametrize("command", ["refactor", "export-dense"])
@pytest.mark.parametrize("bad_file", ["config.json", "model.safetensors"])
def test_refactor_and_export_dense_name_a_bad_dense_folder_in_one_line(tiny_gqa, tmp_path, command, bad_file):
    dense = _dense_folder(tiny_gqa, tmp_path / "dense")
    if bad_file == "config.json":
        (dense / "config.json").write_text("hidden_size = 128")
    else:
        _truncate(dense / "model.safetensors")
    extra = ["--no-eval"] if command == "refactor" else []
    line = cli_error_line(_cli(command, "--dense", dense, "--out", tmp_path / "out", *extra), command, dense / bad_file)
    assert ("not valid JSON" if bad_file == "config.json" else "truncated or corrupt") in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_eval_names_a_damaged_build_in_one_line(tmp_path):
    options = tmp_path / "build" / ".refactor" / "options.json"
    options.parent.mkdir(parents=True)
    options.write_text('{"out": "build", "dense": ')
    line = cli_error_line(_cli("eval", "--out", tmp_path / "build"), "eval", options)
    assert "not valid JSON" in line and "run `vllm-readme refactor --out" in line
