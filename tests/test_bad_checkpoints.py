"""Bad checkpoints fail at start-up with one clear message (docs/design.md,
invariant 5)."""

import shutil

import pytest
from conftest import edit_config, error_chain, vllm_engine
from safetensors.torch import load_file, save_file


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
    assert "holds 4 experts" in message and "num_experts=3" in message


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
