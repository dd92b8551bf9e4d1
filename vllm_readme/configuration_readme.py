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
ROUTER_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


class ReadMEConfigError(ValueError):
    """A Read-ME config or checkpoint that cannot be served as it is."""


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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ReadMEConfigError(
                f"config.json: unknown router field(s) {unknown}; known fields are {sorted(known)}."
            )
        missing = [n for n in ("vocab_size", "num_experts") if n not in data]
        if missing:
            raise ReadMEConfigError(f"config.json: router is missing {missing}.")
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


def readme_config_from_dense(dense: dict[str, Any], **readme_fields: Any) -> ReadMEConfig:
    """A Read-ME config with a dense Llama config's backbone fields (``dense``,
    its config.json as a dict) and the expert layout and router given in
    ``readme_fields``."""
    backbone = {k: v for k, v in dense.items() if k not in NOT_COPIED_FROM_DENSE}
    return ReadMEConfig(**backbone, **readme_fields, architectures=["ReadMEForCausalLM"])
