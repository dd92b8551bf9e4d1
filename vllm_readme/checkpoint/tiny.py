# SPDX-License-Identifier: Apache-2.0
"""Tiny random Read-ME checkpoints with a locally trained tokenizer.

Tests and examples build what they need here; nothing is downloaded. The
tokenizer is a byte-level BPE trained on docstrings of Python's standard
library, so it is the same on every machine with the same Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vllm_readme.checkpoint.io import save_readme_checkpoint
from vllm_readme.configuration_readme import ReadMEConfig, RouterConfig, readme_config_from_dense
from vllm_readme.modeling_readme import ReadMEForCausalLM
from vllm_readme.refactor.data import stdlib_docstrings

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
_CORPUS_MODULES = (
    "argparse",
    "collections",
    "functools",
    "json",
    "logging",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "threading",
)


def local_corpus(max_chars: int = 400_000) -> list[str]:
    """Plain English text shipped with Python itself (stdlib docstrings)."""
    texts = [doc for module in _CORPUS_MODULES for doc in stdlib_docstrings(module, min_chars=40)]
    out, total = [], 0
    for text in dict.fromkeys(texts):  # each once, in order
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def train_tokenizer(vocab_size: int = 384):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(local_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class TinyShape:
    """Shape of a tiny test model. Head sizes must be ones vLLM's CPU
    attention supports (32, 64, 80, 96, 112, 128, ...)."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 4
    shared_intermediate_size: int = 32
    expert_intermediate_sizes: list[int] = field(default_factory=lambda: [64, 64, 64, 64])
    tie_word_embeddings: bool = False
    vocab_size: int = 448
    router: dict = field(
        default_factory=lambda: dict(
            num_hidden_layers=1,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=64,
            gated_mlp=False,
            attention_scale=1.0,
        )
    )
    max_position_embeddings: int = 512
    initializer_range: float = 0.1


def mha_shape() -> TinyShape:
    """No GQA, unequal experts, no shared part, tied embeddings, a gated
    2-layer router whose head size differs from the backbone's."""
    return TinyShape(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=3,
        shared_intermediate_size=0,
        expert_intermediate_sizes=[48, 40, 32],
        tie_word_embeddings=True,
        router=dict(
            num_hidden_layers=2,
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            intermediate_size=96,
            gated_mlp=True,
            attention_scale=None,
            bias=False,
        ),
    )


SHAPES = {"gqa": TinyShape, "mha": mha_shape}


def tiny_config(shape: TinyShape, tokenizer_size: int) -> ReadMEConfig:
    vocab = max(shape.vocab_size, tokenizer_size)
    router = dict(
        shape.router,
        vocab_size=vocab,
        num_experts=shape.num_experts,
        max_position_embeddings=shape.max_position_embeddings,
    )
    return ReadMEConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.shared_intermediate_size + sum(shape.expert_intermediate_sizes),
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        num_experts=shape.num_experts,
        shared_intermediate_size=shape.shared_intermediate_size,
        expert_intermediate_size=max(shape.expert_intermediate_sizes),
        expert_intermediate_sizes=list(shape.expert_intermediate_sizes),
        router=router,
        initializer_range=shape.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=["ReadMEForCausalLM"],
    )


def build_tiny_checkpoint(out_dir: str | Path, shape: TinyShape | None = None, seed: int = 0) -> Path:
    """Write a random Read-ME checkpoint (fp32) plus tokenizer to ``out_dir``."""
    shape = shape or TinyShape()
    tokenizer = train_tokenizer()
    config = tiny_config(shape, len(tokenizer))
    torch.manual_seed(seed)
    model = ReadMEForCausalLM(config).to(torch.float32)
    return save_readme_checkpoint(model, tokenizer, out_dir)


def build_tiny_dense(out_dir: str | Path, seed: int = 0, intermediate_size: int = 128) -> Path:
    """A tiny random dense Llama (HF folder) to refactor in tests."""
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_random_readme_like(
    dense_dir: str | Path,
    out_dir: str | Path,
    num_experts: int = 8,
    shared_intermediate_size: int = 640,
    expert_intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A random-weight Read-ME checkpoint with a dense model's shapes and
    tokenizer (speed depends on shapes and route spread, not on values).

    Default split of SmolLM2's 1536 MLP channels: 640 shared + 8 experts of
    128 (1664 stored, 768 = half active per token, aligned for the kernels)."""
    dense = AutoConfig.from_pretrained(dense_dir)
    router = RouterConfig(
        vocab_size=dense.vocab_size, num_experts=num_experts, max_position_embeddings=dense.max_position_embeddings
    )
    config = readme_config_from_dense(
        dense.to_dict(),
        num_experts=num_experts,
        shared_intermediate_size=shared_intermediate_size,
        expert_intermediate_size=expert_intermediate_size,
        expert_intermediate_sizes=[expert_intermediate_size] * num_experts,
        router=router.to_dict(),
    )
    torch.manual_seed(seed)
    model = ReadMEForCausalLM(config).to(torch.float32)
    return save_readme_checkpoint(model, AutoTokenizer.from_pretrained(dense_dir), out_dir)
