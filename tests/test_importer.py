"""Importing the authors' layout: dense Llama + cluster_predictor + mask.pt."""

import json

import pytest
import torch
from conftest import load_reference, vllm_engine
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_readme import ReadMEConfigError
from vllm_readme.checkpoint.authors import import_authors_checkpoint
from vllm_readme.checkpoint.tiny import train_tokenizer

NUM_EXPERTS, INTER, ROUTER_HIDDEN, ROUTER_HEADS = 3, 96, 64, 2


def _authors_checkpoint(root):
    """A tiny checkpoint in the authors' layout, with per-layer masks whose
    shared part differs in size between layers (so padding is exercised)."""
    torch.manual_seed(3)
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    dense = LlamaForCausalLM(config).eval()
    weights = {k: v.contiguous() for k, v in dense.state_dict().items()}
    v, h = config.vocab_size, ROUTER_HIDDEN
    predictor = {
        "embed_tokens.weight": torch.randn(v, h) * 0.3,
        "layers.0.input_layernorm.weight": torch.ones(h),
        "layers.0.post_attention_layernorm.weight": torch.ones(h),
        "norm.weight": torch.ones(h),
        "proj_out.weight": torch.randn(NUM_EXPERTS, h) * 0.3,
        "proj_out.bias": torch.randn(NUM_EXPERTS) * 0.1,
        "layers.0.mlp.proj_1.weight": torch.randn(h, h) * 0.1,
        "layers.0.mlp.proj_1.bias": torch.randn(h) * 0.1,
        "layers.0.mlp.proj_2.weight": torch.randn(h, h) * 0.1,
        "layers.0.mlp.proj_2.bias": torch.randn(h) * 0.1,
    }
    for proj in "qkvo":
        predictor[f"layers.0.self_attn.{proj}_proj.weight"] = torch.randn(h, h) * 0.1
        predictor[f"layers.0.self_attn.{proj}_proj.bias"] = torch.randn(h) * 0.1
    weights.update({"cluster_predictor." + k: v for k, v in predictor.items()})
    save_file(weights, root / "model.safetensors", metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    tokenizer.save_pretrained(root)
    masks = {}
    for layer in range(config.num_hidden_layers):
        residual = torch.rand(INTER) < (0.2 + 0.1 * layer)
        # As released, expert masks include the shared channels.
        masks[layer] = {"residual": residual, **{e: (torch.rand(INTER) < 0.4) | residual for e in range(NUM_EXPERTS)}}
    torch.save(masks, root / "mask.pt")
    return dense, masks


def _authors_forward(dense, masks, input_ids, expert_ids):
    """The authors' semantics: the dense model with the input of each
    down_proj masked to the token's expert channels."""
    hooks = []
    for layer, block in enumerate(dense.model.layers):
        keep = torch.stack([masks[layer][e] for e in range(NUM_EXPERTS)]).float()[expert_ids[0]]
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(lambda m, args, keep=keep: (args[0] * keep,)))
    try:
        with torch.no_grad():
            return dense(input_ids).logits
    finally:
        for hook in hooks:
            hook.remove()


def test_import_is_exact_against_the_masked_dense_model(tmp_path):
    src = tmp_path / "authors"
    src.mkdir()
    dense, masks = _authors_checkpoint(src)
    out = import_authors_checkpoint(src, src / "mask.pt", tmp_path / "readme", router_heads=ROUTER_HEADS)
    model = load_reference(out)
    assert model.config.shared_intermediate_size == max(int(m["residual"].sum()) for m in masks.values())
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    assert len(ours.expert_ids.unique()) >= 2
    expected = _authors_forward(dense, masks, ids, ours.expert_ids)
    torch.testing.assert_close(ours.logits, expected, rtol=1e-5, atol=1e-5)


def test_imported_checkpoint_serves_in_vllm(tmp_path):
    from vllm import SamplingParams

    src = tmp_path / "authors"
    src.mkdir()
    _authors_checkpoint(src)
    out = import_authors_checkpoint(src, src / "mask.pt", tmp_path / "readme", router_heads=ROUTER_HEADS)
    reference = load_reference(out)
    with vllm_engine(out, max_model_len=256) as llm:
        result = llm.generate(["The logger"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    ids = list(result.prompt_token_ids)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    assert list(result.outputs[0].token_ids) == ids[len(result.prompt_token_ids) :]


def test_missing_predictor_is_reported(tmp_path):
    src = tmp_path / "authors"
    src.mkdir()
    _authors_checkpoint(src)
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("cluster_predictor")}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReadMEConfigError, match="no cluster_predictor"):
        import_authors_checkpoint(src, src / "mask.pt", tmp_path / "out")
