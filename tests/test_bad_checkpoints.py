"""Bad checkpoints fail at start-up with one clear message (docs/design.md,
invariant 5)."""

import re
import shutil

import pytest
from conftest import edit_config, error_chain, vllm_engine
from safetensors.torch import load_file, save_file

from vllm_readme.checkpoint.io import validate_checkpoint
from vllm_readme.configuration_readme import TensorShapeError


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
