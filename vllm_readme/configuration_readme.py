# SPDX-License-Identifier: Apache-2.0
"""The Read-ME checkpoint format: one config class, no engine.

A Read-ME checkpoint is a Llama checkpoint whose MLPs were split into an
always-on shared part plus ``num_experts`` routed parts, and which carries a
tiny decoupled router (paper §3; docs/design.md, "The model" and "Checkpoint
format"). The router reads token ids only and picks one expert per token for
every layer.

``config.json`` holds every Llama field plus:

* ``num_experts``: routed experts per layer (the same expert id at all layers).
* ``shared_intermediate_size``: channels every token uses, stored once.
* ``expert_intermediate_size``: channels of one routed expert, after padding.
* ``expert_intermediate_sizes``: each expert's true channel count (the rest of
  its ``expert_intermediate_size`` rows are zero, which is exact).
* ``router``: the router's own transformer config (see :class:`RouterConfig`).

This module imports neither vLLM nor the reference model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import LlamaConfig

# What a dense model's config.json says about its files rather than its
# shape: a Read-ME config made from it does not copy these.
NOT_COPIED_FROM_DENSE = frozenset(
    {
        "model_type",
        "architectures",
        "auto_map",
        "quantization_config",
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
    }
)
# Activations both implementations (reference and vLLM) support. The experts
# are gated (act(gate) * up), which FusedMoE offers for these three; the
# router's MLP may also use relu when it is not gated.
BACKBONE_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
# Llama fields that size a tensor of the checkpoint.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
ROUTER_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


class ReadMEConfigError(ValueError):
    """A Read-ME config or checkpoint that cannot be served as it is."""


class CheckpointFileError(ReadMEConfigError):
    """A file of a checkpoint (config.json, weights, index, masks) that cannot
    be read as what it should be: the message names the file and the fix."""


class TensorShapeError(ReadMEConfigError):
    """A checkpoint tensor whose shape is not the one its config implies."""


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a config.json value fits a field's annotation (``int``,
    ``float | None``, ``list[int]``, ...). JSON's true/false are not numbers."""
    for kind in annotation.replace(" ", "").split("|"):
        if kind == "None" and value is None:
            return True
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "dict" and isinstance(value, dict):
            return True
        if kind == "list[int]" and isinstance(value, list) and all(_has_type(v, "int") for v in value):
            return True
    return False


def _check_types(where: str, values: dict[str, Any], annotations: dict[str, str]) -> None:
    for name, annotation in annotations.items():
        if name in values and not _has_type(values[name], annotation):
            raise ReadMEConfigError(
                f"config.json: {where}{name}={values[name]!r} is not of type {annotation}; correct it in config.json."
            )


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The decoupled router: a small causal transformer over token ids.

    Defaults are the paper's router (1 layer, 4 heads, hidden 512, MLP 512,
    not gated, biased linears, attention scale 1.0 as in the authors' code).
    """

    vocab_size: int
    num_experts: int
    num_hidden_layers: int = 1
    hidden_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 512
    hidden_act: str = "silu"
    gated_mlp: bool = False
    bias: bool = True
    # Multiplier of q.k; None means the usual 1/sqrt(head_dim). The authors'
    # router uses 1.0 (their `normalizer`).
    attention_scale: float | None = 1.0
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def scale(self) -> float:
        if self.attention_scale is None:
            return self.head_dim**-0.5
        return float(self.attention_scale)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        if not isinstance(data, dict):
            raise ReadMEConfigError(
                f"config.json: router is {type(data).__name__}, expected an object of router fields "
                "(vocab_size, num_experts, hidden_size, ...)."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ReadMEConfigError(
                f"config.json: unknown router field(s) {unknown}; known fields are {sorted(known)}."
            )
        missing = [n for n in ("vocab_size", "num_experts") if n not in data]
        if missing:
            raise ReadMEConfigError(f"config.json: router is missing {missing}.")
        _check_types("router.", data, {f.name: f.type for f in dataclasses.fields(cls)})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        allowed = BACKBONE_ACTIVATIONS if self.gated_mlp else ROUTER_ACTIVATIONS
        if self.hidden_act not in allowed:
            raise ReadMEConfigError(
                f"config.json: router.hidden_act={self.hidden_act!r} is not supported; use one of {list(allowed)}."
            )
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "num_experts",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ReadMEConfigError(f"config.json: router.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ReadMEConfigError(
                f"config.json: router.num_attention_heads ({self.num_attention_heads}) "
                f"must be a multiple of router.num_key_value_heads "
                f"({self.num_key_value_heads})."
            )


class ReadMEConfig(LlamaConfig):
    """Llama fields + the expert layout + the nested router config."""

    model_type = "readme"

    num_experts: int = 8
    shared_intermediate_size: int = 0
    expert_intermediate_size: int = 1376  # Llama-7B intermediate_size / 8
    expert_intermediate_sizes: list[int] | None = None
    router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.router is None:
            self.router = RouterConfig(vocab_size=self.vocab_size, num_experts=self.num_experts).to_dict()
        if self.expert_intermediate_sizes is None:
            self.expert_intermediate_sizes = [self.expert_intermediate_size] * self.num_experts
        self.validate_readme()

    @property
    def router_config(self) -> RouterConfig:
        return RouterConfig.from_dict(dict(self.router))

    def validate_readme(self) -> None:
        """Raise ReadMEConfigError naming the first inconsistency found."""
        _check_types("", vars(self), ReadMEConfig.__annotations__)
        for name in SHAPE_FIELDS:
            if getattr(self, name) < 1:
                raise ReadMEConfigError(f"config.json: {name} must be >= 1, got {getattr(self, name)}.")
        if self.num_experts < 1:
            raise ReadMEConfigError(f"config.json: num_experts must be >= 1, got {self.num_experts}.")
        if self.expert_intermediate_size < 1:
            raise ReadMEConfigError(
                f"config.json: expert_intermediate_size must be >= 1 (got {self.expert_intermediate_size})."
            )
        if self.shared_intermediate_size < 0:
            raise ReadMEConfigError("config.json: shared_intermediate_size must be >= 0.")
        if self.hidden_act not in BACKBONE_ACTIVATIONS:
            raise ReadMEConfigError(
                f"config.json: hidden_act={self.hidden_act!r} is not supported; "
                f"use one of {list(BACKBONE_ACTIVATIONS)}."
            )
        sizes = list(self.expert_intermediate_sizes)
        if len(sizes) != self.num_experts:
            raise ReadMEConfigError(
                f"config.json: expert_intermediate_sizes lists {len(sizes)} experts but num_experts={self.num_experts}."
            )
        if any(s < 0 or s > self.expert_intermediate_size for s in sizes):
            raise ReadMEConfigError(
                f"config.json: every expert_intermediate_sizes entry must lie in "
                f"[0, expert_intermediate_size={self.expert_intermediate_size}], got {sizes}."
            )
        router = self.router_config
        router.validate()
        if router.num_experts != self.num_experts:
            raise ReadMEConfigError(
                f"config.json: router.num_experts ({router.num_experts}) differs from "
                f"num_experts ({self.num_experts}); they must agree."
            )
        if router.vocab_size < self.vocab_size:
            raise ReadMEConfigError(
                f"config.json: router.vocab_size ({router.vocab_size}) is smaller than the "
                f"backbone's vocab_size ({self.vocab_size}): tokens above "
                f"{router.vocab_size - 1} could not be routed. Re-export the router with "
                f"vocab_size >= {self.vocab_size}."
            )


@dataclasses.dataclass(frozen=True)
class TensorShape:
    """The shape a checkpoint tensor must have, and the config fields each
    dimension comes from (named in errors, so the fix is clear)."""

    shape: tuple[int, ...]
    fields: tuple[str, ...]
    required: bool = True

    def __str__(self) -> str:
        return f"{list(self.shape)} ([{', '.join(self.fields)}])"


# Names of buffers older transformers saved next to the weights; recomputed,
# never loaded (vLLM's AutoWeightsLoader drops them too).
NOT_WEIGHTS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def checkpoint_tensor_shapes(config: ReadMEConfig) -> dict[str, TensorShape]:
    """Every tensor name of a checkpoint in this format, as the reference
    model (modeling_readme.py) saves it, with the shape ``config`` implies.
    Both ``vllm-readme validate`` and vLLM's loader check against it."""
    shapes: dict[str, TensorShape] = {}

    def add(name: str, *dims: tuple[str, int], required: bool = True) -> None:
        shapes[name] = TensorShape(tuple(size for _, size in dims), tuple(field for field, _ in dims), required)

    hidden = ("hidden_size", config.hidden_size)
    q_width = ("num_attention_heads*head_dim", config.num_attention_heads * config.head_dim)
    kv_width = ("num_key_value_heads*head_dim", config.num_key_value_heads * config.head_dim)
    shared = ("shared_intermediate_size", config.shared_intermediate_size)
    experts = ("num_experts", config.num_experts)
    expert_width = ("expert_intermediate_size", config.expert_intermediate_size)
    vocab = ("vocab_size", config.vocab_size)
    add("model.embed_tokens.weight", vocab, hidden)
    add("lm_head.weight", vocab, hidden, required=not config.tie_word_embeddings)
    add("model.norm.weight", hidden)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        add(prefix + "input_layernorm.weight", hidden)
        add(prefix + "post_attention_layernorm.weight", hidden)
        _add_attention(add, prefix + "self_attn.", hidden, q_width, kv_width, config.attention_bias)
        if config.shared_intermediate_size > 0:
            add(prefix + "mlp.shared.gate_proj.weight", shared, hidden)
            add(prefix + "mlp.shared.up_proj.weight", shared, hidden)
            add(prefix + "mlp.shared.down_proj.weight", hidden, shared)
        add(prefix + "mlp.experts.gate_proj", experts, expert_width, hidden)
        add(prefix + "mlp.experts.up_proj", experts, expert_width, hidden)
        add(prefix + "mlp.experts.down_proj", experts, hidden, expert_width)

    router = config.router_config
    r_hidden = ("router.hidden_size", router.hidden_size)
    r_q_width = ("router.num_attention_heads*router.head_dim", router.num_attention_heads * router.head_dim)
    r_kv_width = ("router.num_key_value_heads*router.head_dim", router.num_key_value_heads * router.head_dim)
    r_inner = ("router.intermediate_size", router.intermediate_size)
    add("router.embed_tokens.weight", ("router.vocab_size", router.vocab_size), r_hidden)
    add("router.norm.weight", r_hidden)
    add("router.expert_head.weight", ("router.num_experts", router.num_experts), r_hidden)
    if router.bias:
        add("router.expert_head.bias", ("router.num_experts", router.num_experts))
    for layer in range(router.num_hidden_layers):
        prefix = f"router.layers.{layer}."
        add(prefix + "input_layernorm.weight", r_hidden)
        add(prefix + "post_attention_layernorm.weight", r_hidden)
        _add_attention(add, prefix + "self_attn.", r_hidden, r_q_width, r_kv_width, router.bias)
        projections = [("up_proj", r_inner, r_hidden), ("down_proj", r_hidden, r_inner)]
        if router.gated_mlp:
            projections.append(("gate_proj", r_inner, r_hidden))
        for projection, out_dim, in_dim in projections:
            add(f"{prefix}mlp.{projection}.weight", out_dim, in_dim)
            if router.bias:
                add(f"{prefix}mlp.{projection}.bias", out_dim)
    return shapes


def _add_attention(add, prefix: str, hidden, q_width, kv_width, bias: bool) -> None:
    for projection, out_dim, in_dim in (
        ("q_proj", q_width, hidden),
        ("k_proj", kv_width, hidden),
        ("v_proj", kv_width, hidden),
        ("o_proj", hidden, q_width),
    ):
        add(f"{prefix}{projection}.weight", out_dim, in_dim)
        if bias:
            add(f"{prefix}{projection}.bias", out_dim)


def tensor_shape_problem(shapes: dict[str, TensorShape], name: str, found: tuple[int, ...]) -> str | None:
    """What is wrong with a tensor of the checkpoint, named ``name`` and
    shaped ``found``, against ``shapes``; None when nothing is. Readers check
    it before any of the tensor is copied and raise TensorShapeError."""
    expected = shapes.get(name)
    if expected is None:
        return (
            f"tensor {name!r} is not part of a Read-ME checkpoint with this config.json. Remove it, or correct "
            "config.json if it belongs (num_hidden_layers, attention_bias, router.bias, ...)."
        )
    if tuple(found) != expected.shape:
        return (
            f"tensor {name!r} has shape {list(found)}, but config.json implies {expected}. The checkpoint and "
            "its config.json disagree: correct the config field named here or re-export the checkpoint."
        )
    return None


def check_no_tensor_missing(shapes: dict[str, TensorShape], found_names: set[str], source: str) -> None:
    """Refuse a checkpoint that lacks a tensor its config implies."""
    missing = [name for name, shape in shapes.items() if shape.required and name not in found_names]
    router_missing = [name for name in missing if name.startswith("router.")]
    if router_missing:
        raise TensorShapeError(
            f"{source}: the checkpoint is missing {len(router_missing)} router weight(s), e.g. {router_missing[:3]}. "
            "A Read-ME checkpoint must contain the decoupled router (router.*); convert the authors' layout with "
            "`vllm-readme import` or rebuild with `vllm-readme refactor`."
        )
    if missing:
        raise TensorShapeError(
            f"{source}: the checkpoint is missing {len(missing)} tensor(s) that config.json implies, e.g. "
            f"{missing[:3]}. Re-export the checkpoint, or correct config.json (num_hidden_layers, "
            "tie_word_embeddings, shared_intermediate_size, attention_bias)."
        )


def readme_config_from_dense(dense: dict[str, Any], **readme_fields: Any) -> ReadMEConfig:
    """A Read-ME config with a dense Llama config's backbone fields (``dense``,
    its config.json as a dict) and the expert layout and router given in
    ``readme_fields``."""
    backbone = {k: v for k, v in dense.items() if k not in NOT_COPIED_FROM_DENSE}
    return ReadMEConfig(**backbone, **readme_fields, architectures=["ReadMEForCausalLM"])
