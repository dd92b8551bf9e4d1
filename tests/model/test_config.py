# SPDX-License-Identifier: Apache-2.0
"""The checkpoint format: config round trip, Auto classes, validation."""

import pytest
from conftest import edit_config
from transformers import AutoConfig, AutoModelForCausalLM

import vllm_readme
from vllm_readme import ReadMEConfig, ReadMEConfigError
from vllm_readme.checkpoint.io import validate_checkpoint


def test_auto_classes_load_a_readme_checkpoint_after_import(tiny_gqa):
    config = AutoConfig.from_pretrained(tiny_gqa)
    assert isinstance(config, ReadMEConfig)
    model = AutoModelForCausalLM.from_pretrained(tiny_gqa)
    assert isinstance(model, vllm_readme.ReadMEForCausalLM)
    assert config.router_config.num_experts == config.num_experts == 4


def test_config_round_trips_every_field(tiny_mha, tmp_path):
    config = ReadMEConfig.from_pretrained(tiny_mha)
    config.save_pretrained(tmp_path)
    again = ReadMEConfig.from_pretrained(tmp_path)
    for field in (
        "num_experts",
        "shared_intermediate_size",
        "expert_intermediate_size",
        "expert_intermediate_sizes",
        "router",
        "num_key_value_heads",
        "tie_word_embeddings",
    ):
        assert getattr(again, field) == getattr(config, field), field
    assert again.router_config.attention_scale is None and again.router_config.gated_mlp


def test_shared_part_is_stored_once_and_experts_are_stacked(tiny_gqa):
    from safetensors import safe_open

    with safe_open(tiny_gqa / "model.safetensors", "pt") as f:
        names = list(f.keys())
        shared = f.get_tensor("model.layers.0.mlp.shared.gate_proj.weight")
        experts = f.get_tensor("model.layers.0.mlp.experts.gate_proj")
    config = ReadMEConfig.from_pretrained(tiny_gqa)
    assert shared.shape == (config.shared_intermediate_size, config.hidden_size)
    assert experts.shape == (config.num_experts, config.expert_intermediate_size, config.hidden_size)
    assert not any("experts.0" in n for n in names)
    assert sum(".mlp.shared.gate_proj" in n for n in names) == config.num_hidden_layers


def test_unequal_experts_are_zero_padded(tiny_mha):
    from safetensors import safe_open

    config = ReadMEConfig.from_pretrained(tiny_mha)
    with safe_open(tiny_mha / "model.safetensors", "pt") as f:
        gate = f.get_tensor("model.layers.1.mlp.experts.gate_proj")
        down = f.get_tensor("model.layers.1.mlp.experts.down_proj")
    for expert, size in enumerate(config.expert_intermediate_sizes):
        assert gate[expert, size:].abs().sum() == 0
        assert down[expert, :, size:].abs().sum() == 0
        assert gate[expert, :size].abs().sum() > 0


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    edit_config(dst, **changes)
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "swish2"}, "hidden_act='swish2' is not supported"),
        ({"router.hidden_act": "mish"}, "router.hidden_act='mish' is not supported"),
        ({"router.vocab_size": 100}, r"router.vocab_size \(100\) is smaller than the backbone's vocab_size"),
        ({"router.num_experts": 5}, r"router.num_experts \(5\) differs from num_experts \(4\)"),
        ({"expert_intermediate_sizes": [64, 64]}, "lists 2 experts but num_experts=4"),
        ({"router.heads": 3}, "unknown router field"),
    ],
)
def test_bad_config_fields_name_the_problem(tiny_gqa, tmp_path, changes, message):
    bad = _edit_config(tiny_gqa, tmp_path / "bad", **changes)
    with pytest.raises(ReadMEConfigError, match=message):
        AutoConfig.from_pretrained(bad)


def test_validate_reports_expert_count_that_disagrees_with_weights(tiny_gqa, tmp_path):
    bad = _edit_config(
        tiny_gqa, tmp_path / "bad", num_experts=3, **{"router.num_experts": 3}, expert_intermediate_sizes=[64, 64, 64]
    )
    with pytest.raises(ReadMEConfigError, match=r"has shape \[4, \d+, \d+\], but config.json implies \[3, \d+, \d+\]"):
        validate_checkpoint(bad)


def test_validate_reports_tokenizer_larger_than_router_vocab(tiny_gqa, tmp_path):
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(tiny_gqa))
    bad = _edit_config(tiny_gqa, tmp_path / "bad", vocab_size=size - 10, **{"router.vocab_size": size - 10})
    with pytest.raises(
        ReadMEConfigError, match=f"the tokenizer has {size} tokens but router.vocab_size is {size - 10}"
    ):
        validate_checkpoint(bad)


def test_importing_the_plugin_leaves_the_models_unloaded():
    """Every vLLM process imports the package and calls register() (plugin
    entry point): neither the reference model nor vLLM's model is imported
    until used; AutoModelForCausalLM still finds the reference (test above)."""
    import subprocess
    import sys

    code = (
        "import sys, vllm_readme; vllm_readme.register(); "
        "print([m for m in ('vllm_readme.modeling_readme', 'vllm_readme.model_executor.readme') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_plugin_logs_go_through_vllms_handler():
    """What the plugin decides (kernel, model shape) is logged at INFO; vLLM
    only configures its own "vllm" logger tree, so ours must sit inside it."""
    import logging

    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    from vllm_readme.model_executor import kernels, readme

    configure_logging_if_needed(LoggingConfig())  # what every engine does at start
    for module in (kernels, readme):
        logger = module.logger
        while logger.propagate and not logger.handlers and logger.parent is not None:
            logger = logger.parent
        assert logger.name == "vllm" and logger.handlers, (module.__name__, logger.name)
        assert module.logger.getEffectiveLevel() == logging.getLogger("vllm").level
