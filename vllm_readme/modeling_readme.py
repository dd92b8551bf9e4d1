# SPDX-License-Identifier: Apache-2.0
"""Reference PyTorch/transformers implementation of the Read-ME format.

The oracle for vLLM's numerics and the model the refactoring pipeline trains.
Readable math first: the router is recomputed over the whole sequence at every
call (no router KV cache), the experts are a loop over expert ids.

Paper §3: a router that reads token ids only picks one expert per token; the
same expert serves that token at every layer, with no gating weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from vllm_readme.configuration_readme import ReadMEConfig, RouterConfig


class RouterAttention(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=config.bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=config.bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=config.bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=config.bias)

    def forward(
        self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.config.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out, _ = eager_attention_forward(self, q, k, v, mask, scaling=self.config.scale)
        return self.o_proj(out.reshape(*x.shape[:-1], -1))


class RouterMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` if gated, else ``down(act(up(x)))``
    (the authors' ``proj_2(silu(proj_1(x)))``)."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=config.bias)
        self.up_proj = nn.Linear(h, i, bias=config.bias)
        self.down_proj = nn.Linear(i, h, bias=config.bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class RouterLayer(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RouterAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RouterMLP(config)

    def forward(
        self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), position_embeddings, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class ReadMERouter(nn.Module):
    """Token ids -> expert logits, causal: logits at t depend on ids <= t."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RouterLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.expert_head = nn.Linear(config.hidden_size, config.num_experts, bias=config.bias)
        # Plain RoPE with the router's own base and head size.
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
        self.rotary_emb = LlamaRotaryEmbedding(
            LlamaConfig(
                head_dim=config.head_dim,
                max_position_embeddings=config.max_position_embeddings,
                rope_parameters=rope,
            )
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        # Left padding: positions count real tokens only, as in generate().
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :]
        mask = mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)  # padded rows stay finite
        x = self.embed_tokens(input_ids)
        additive_mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~mask, torch.finfo(x.dtype).min
        )
        position_embeddings = self.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, position_embeddings, additive_mask)
        return self.expert_head(self.norm(x))


class ReadMEMoE(nn.Module):
    """Shared MLP (every token) + the token's routed expert, no gate weight."""

    def __init__(self, config: ReadMEConfig):
        super().__init__()
        h, s = config.hidden_size, config.shared_intermediate_size
        e, i = config.num_experts, config.expert_intermediate_size
        self.act = ACT2FN[config.hidden_act]
        self.shared = None
        if s > 0:
            self.shared = nn.ModuleDict(
                dict(
                    gate_proj=nn.Linear(h, s, bias=False),
                    up_proj=nn.Linear(h, s, bias=False),
                    down_proj=nn.Linear(s, h, bias=False),
                )
            )
        self.experts = ReadMEExperts(e, h, i)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.experts(flat, expert_ids.reshape(-1), self.act)
        if self.shared is not None:
            sh = self.shared
            out = out + sh.down_proj(self.act(sh.gate_proj(flat)) * sh.up_proj(flat))
        return out.view_as(x)


class ReadMEExperts(nn.Module):
    """Stacked expert weights: gate/up ``[E, I, H]``, down ``[E, H, I]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, act) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in range(self.num_experts):
            rows = (expert_ids == expert).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            xe = x[rows]
            inner = act(xe @ self.gate_proj[expert].T) * (xe @ self.up_proj[expert].T)
            out = out.index_copy(0, rows, (inner @ self.down_proj[expert].T).to(out.dtype))
        return out


class ReadMEDecoderLayer(nn.Module):
    def __init__(self, config: ReadMEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = ReadMEMoE(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, expert_ids, attention_mask, position_embeddings, past_key_values, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states), expert_ids)
        return residual + hidden_states


class ReadMEPreTrainedModel(PreTrainedModel):
    config_class = ReadMEConfig
    config: ReadMEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ReadMEDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ReadMEExperts):
            std = self.config.initializer_range
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                p.normal_(0.0, std)
            _zero_padded_channels(module, self.config.expert_intermediate_sizes)


def _zero_padded_channels(experts: ReadMEExperts, sizes: list[int]) -> None:
    for expert, size in enumerate(sizes):
        experts.gate_proj[expert, size:] = 0
        experts.up_proj[expert, size:] = 0
        experts.down_proj[expert, :, size:] = 0


class ReadMEModel(ReadMEPreTrainedModel):
    def __init__(self, config: ReadMEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ReadMEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        expert_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None]:
        hidden_states = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + past_seen)[None]
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                expert_ids,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                **kwargs,
            )
        return self.norm(hidden_states), past_key_values


@dataclass
class ReadMECausalLMOutput(CausalLMOutputWithPast):
    expert_ids: torch.LongTensor | None = None
    router_logits: torch.FloatTensor | None = None


class ReadMEForCausalLM(ReadMEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ReadMEConfig):
        super().__init__(config)
        self.router = ReadMERouter(config.router_config)
        self.model = ReadMEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def route(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and expert ids (argmax) of every token of ``input_ids``."""
        logits = self.router(input_ids, attention_mask)
        return logits, logits.argmax(dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        router_input_ids: torch.LongTensor | None = None,
        expert_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ReadMECausalLMOutput:
        """``router_input_ids``: the whole sequence so far (generation passes
        only the new tokens as ``input_ids``); ``expert_ids`` overrides the
        router (the refactoring pipeline trains experts with given routes)."""
        if input_ids is None:
            raise ValueError("Read-ME routes from token ids: pass input_ids (inputs_embeds is not supported).")
        router_logits = None
        if expert_ids is None:
            full = input_ids if router_input_ids is None else router_input_ids
            router_logits, all_ids = self.route(full, attention_mask)
            expert_ids = all_ids[:, -input_ids.shape[1] :]
        hidden, past_key_values = self.model(
            input_ids,
            expert_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        slice_ = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size)
        return ReadMECausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=past_key_values,
            expert_ids=expert_ids,
            router_logits=router_logits,
        )

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["router_input_ids"] = input_ids
        return inputs
