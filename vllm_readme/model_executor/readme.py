# SPDX-License-Identifier: Apache-2.0
"""Read-ME in vLLM: decoupled router + Llama backbone with shared/routed MLPs.

Top-down as vLLM's mixtral.py: MoE -> Attention -> DecoderLayer -> Router ->
Model -> ForCausalLM. Paper §3-4; docs/design.md, "The model" and "Data flow":

* The router is a small causal transformer over token ids. Its attention
  layers are ordinary vLLM ``Attention`` layers, so vLLM pages their KV cache
  like the backbone's: decoding routes only the new tokens.
* Every layer adds the shared MLP (one dense GEMM) to the token's routed
  expert (grouped GEMM, top-1, weight 1.0, same expert every layer): on CPU
  vLLM's grouped-GEMM kernel called directly on FusedMoE's prepacked weights,
  elsewhere the FusedMoE layer itself (kernels.py; chosen after loading).
  Both paths take the same slots; the shared MLP and the all-reduce follow
  either.
* Expert ids reach the weights through ``ReadMEModel.slot_table`` [layer,
  expert] -> weight slot. With every expert resident (the default) it is the
  identity, gathered once per forward. With an expert pool
  (``expert_pool`` in the plugin's options) the expert cache owns it: per
  layer, the custom op ``vllm::readme_expert_slots`` makes the layer's pages
  resident and returns their slots in one pool shared by all layers
  (experts/cache.py, docs/expert_cache.md).
* Start-up checks (what would otherwise fail mid-request) run where vLLM
  validates its config, before this model is built: config.py.
* The latest step's expert ids are kept in ``expert_ids_buffer`` on the
  device (no host sync), where a worker or scheduler hook can read them;
  with ``route_source: "model"`` the route of each sequence's last token
  goes to the expert-aware scheduler (route_publisher.py).

Tensor parallelism: attention, router, shared MLP and experts shard like
Llama/Mixtral (heads and intermediate channels split across ranks, one
all-reduce); every rank computes identical router logits, hence identical
routes.

Pipeline parallelism (``SupportsPP``, as vLLM's Llama): each stage builds its
own range of layers (``make_layers``), the others are ``PPMissingLayer`` and
their weights are skipped at load. The router runs once, on the first stage,
where the token ids are; its expert ids travel to the later stages inside
``IntermediateTensors`` beside the hidden states and the residual (4 bytes a
token against 2 x hidden x dtype), so no stage routes again. Each stage's
expert cache pools its own layers' pages (docs/scaling.md).
"""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import get_act_and_mul_fn, get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, PPMissingLayer, WeightsMapper, make_layers
from vllm.sequence import IntermediateTensors

from vllm_readme import envs
from vllm_readme.checkpoint.io import weights_file_of
from vllm_readme.configuration_readme import (
    NOT_WEIGHTS,
    ReadMEConfig,
    ReadMEConfigError,
    RouterConfig,
    TensorShapeError,
    check_no_tensor_missing,
    checkpoint_tensor_shapes,
    tensor_shape_problem,
)
from vllm_readme.experts.plan import engine_id_of
from vllm_readme.model_executor.kernels import CPUGroupedGemm, choose_routed_kernel, slots_as_given
from vllm_readme.model_executor.metrics import ExpertStepMetrics, StageSendCounters
from vllm_readme.options import ExpertCacheOptions, SchedulerOptions
from vllm_readme.vllm_internals import (
    drop_routed_expert_weights,
    keep_first_expert_only,
    load_stacked_expert_weights,
    routed_expert_weights,
    scheduler_class,
    weights_folder,
)

# Under vLLM's "vllm" logger: its handler, format and VLLM_LOGGING_LEVEL apply
# (a logger outside that tree has no handler, and INFO lines would be lost).
logger = init_logger(f"vllm.{__name__}")

# FusedMoE's names for the activations our experts may use.
_MOE_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


class ReadMESharedMLP(nn.Module):
    """The always-on part of every MLP; its down projection is not reduced,
    ReadMEMoE sums it with the routed output and reduces once."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, reduce_results=False, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = get_act_and_mul_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class Routes(NamedTuple):
    """One layer's routes, from the slots the model gathers once per forward."""

    slots: torch.Tensor  # [T, 1] int32: this layer's weight slot of each token's expert
    weights: torch.Tensor  # [T, 1] float32 ones (Read-ME does not scale its expert)
    pool: tuple[torch.Tensor, torch.Tensor] | None = None  # the expert cache's (w13, w2); None: the layer's own


class ReadMEMoE(nn.Module):
    """Shared MLP + the routed expert chosen by the decoupled router."""

    def __init__(self, config: ReadMEConfig, prefix: str, streamed: bool):
        super().__init__()
        self.tp_size = get_tensor_model_parallel_world_size()
        # Set after loading, once FusedMoE has prepacked its weights; None:
        # FusedMoE's own forward.
        self.routed_kernel: CPUGroupedGemm | None = None
        self.shared = None
        if config.shared_intermediate_size > 0:
            self.shared = ReadMESharedMLP(
                config.hidden_size, config.shared_intermediate_size, config.hidden_act, f"{prefix}.shared"
            )
        # The routed experts only: no gate, no shared part, no all-reduce
        # (forward adds and reduces for both paths).
        self.experts = FusedMoEFactory(
            num_experts=config.num_experts,
            top_k=1,
            hidden_size=config.hidden_size,
            intermediate_size=config.expert_intermediate_size,
            renormalize=False,
            custom_routing_function=slots_as_given,
            activation=_MOE_ACTIVATION[config.hidden_act],
            reduce_results=False,
            # Whole experts on every data-parallel rank: FusedMoE would split
            # each expert's channels over the DP group (it does for a model
            # with experts), and nothing on the CPU path would join the halves.
            dp_size=1,
            prefix=f"{prefix}.experts",
        )
        # With an expert pool whose pages come from disk, the experts are
        # never all in memory: FusedMoE keeps expert 0 only (loaded, then
        # prepacked by FusedMoE as usual: the layout the pool's pages are
        # checked against), and the cache reads every page from the
        # checkpoint (experts/cache.py). FusedMoE's [E, ...] allocation was
        # never written, so it never became resident; it is dropped here.
        self.streamed = streamed
        if self.streamed:
            keep_first_expert_only(self.experts)

    def forward(self, hidden_states: torch.Tensor, routes: Routes) -> torch.Tensor:
        if self.routed_kernel is None:
            # FusedMoE hands router_logits to its routing function untouched,
            # and slots_as_given returns them: the slots are the routes.
            out = self.experts(hidden_states=hidden_states, router_logits=routes.slots)
        else:
            out = self.routed_kernel(self.experts, hidden_states, routes.slots, routes.weights, routes.pool)
        if self.shared is not None:
            out = out + self.shared(hidden_states)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """``experts.{gate,up,down}_proj`` are stacked ``[E, ...]`` tensors,
        each loaded whole by FusedMoE's weight loader; ``shared.*`` load as
        any vLLM layer's weights."""
        loaded, shared = set(), []
        for name, tensor in weights:
            projection = name.removeprefix("experts.")
            if projection == name:
                shared.append((name, tensor))
                continue
            if self.streamed:  # expert 0 only (see __init__); the cache reads the rest from the checkpoint
                tensor = tensor[:1]
            loaded.add("experts." + load_stacked_expert_weights(self.experts, projection, tensor))
        return loaded | AutoWeightsLoader(self).load_weights(shared)


class ReadMEAttention(nn.Module):
    """Causal self-attention with RoPE, shared by the backbone and the router."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        bias: bool,
        rope_parameters: dict,
        max_position: int,
        cache_config: CacheConfig | None,
        prefix: str,
        attn_prefix: str | None = None,
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()  # divides num_heads (config.py)
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden_size, head_dim, num_heads, num_kv_heads, bias=bias, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, bias=bias, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            head_dim, max_position=max_position, rope_parameters=rope_parameters, is_neox_style=True
        )
        self.attn = Attention(
            self.num_heads,
            head_dim,
            scale,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            prefix=attn_prefix or f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class ReadMEDecoderLayer(nn.Module):
    def __init__(self, config: ReadMEConfig, cache_config: CacheConfig | None, prefix: str, streamed: bool):
        super().__init__()
        self.self_attn = ReadMEAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            scale=config.head_dim**-0.5,
            bias=config.attention_bias,
            rope_parameters=config.rope_parameters,
            max_position=config.max_position_embeddings,
            cache_config=cache_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = ReadMEMoE(config, prefix=f"{prefix}.mlp", streamed=streamed)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        routes: Routes,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states, routes), residual


class ReadMERouterMLP(nn.Module):
    def __init__(self, config: RouterConfig, prefix: str):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        if config.gated_mlp:
            self.gate_up_proj = MergedColumnParallelLinear(h, [i, i], bias=config.bias, prefix=f"{prefix}.gate_up_proj")
            self.act_fn = get_act_and_mul_fn(config.hidden_act)
        else:
            self.up_proj = ColumnParallelLinear(h, i, bias=config.bias, prefix=f"{prefix}.up_proj")
            self.act_fn = get_act_fn(config.hidden_act)
        self.gated = config.gated_mlp
        self.down_proj = RowParallelLinear(i, h, bias=config.bias, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner, _ = (self.gate_up_proj if self.gated else self.up_proj)(x)
        out, _ = self.down_proj(self.act_fn(inner))
        return out


class ReadMERouterLayer(nn.Module):
    def __init__(self, config: RouterConfig, cache_config: CacheConfig | None, prefix: str, kv_layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = ReadMEAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            scale=config.scale,
            bias=config.bias,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            max_position=config.max_position_embeddings,
            cache_config=cache_config,
            prefix=f"{prefix}.self_attn",
            # vLLM orders KV caches by the one integer in an attention layer's
            # name; give router layers indices after the backbone's.
            attn_prefix=f"router.kv_layers.{kv_layer_index}.attn",
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ReadMERouterMLP(config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ReadMERouter(nn.Module):
    """Token ids -> expert logits, KV-cached: each step embeds and attends
    from the new tokens only."""

    def __init__(self, config: RouterConfig, num_backbone_layers: int, cache_config: CacheConfig | None, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            ReadMERouterLayer(config, cache_config, f"{prefix}.layers.{j}", num_backbone_layers + j)
            for j in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.expert_head = ReplicatedLinear(
            config.hidden_size, config.num_experts, bias=config.bias, prefix=f"{prefix}.expert_head"
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        logits, _ = self.expert_head(self.norm(x))
        return logits


@support_torch_compile
class ReadMEModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ReadMEConfig = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        pp = get_pp_group()
        # The router and the embedding live where the token ids are: the
        # first stage (the embedding also on the last when lm_head is tied).
        if pp.is_first_rank:
            self.router = ReadMERouter(config.router_config, config.num_hidden_layers, cache_config, prefix="router")
        else:
            self.router = PPMissingLayer()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
            )
        else:
            self.embed_tokens = PPMissingLayer()
        # [layer, expert] -> physical slot in that layer's expert weights.
        # Identity while every expert is resident; an expert cache remaps
        # this stage's rows.
        slot_table = torch.arange(config.num_experts, dtype=torch.int32).repeat(config.num_hidden_layers, 1)
        self.register_buffer("slot_table", slot_table, persistent=False)
        streamed = streams_experts(vllm_config)  # the options read once, not per layer
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: ReadMEDecoderLayer(config, cache_config, prefix=prefix, streamed=streamed),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("expert_ids_buffer", torch.zeros(max_tokens, dtype=torch.int32), persistent=False)
        self.hidden_size = config.hidden_size
        # Set after loading when an expert pool is configured (ReadMEForCausalLM.process_weights_after_loading).
        self.expert_cache_id: int | None = None
        self.expert_pool: tuple[torch.Tensor, torch.Tensor] | None = None

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        """What a later stage receives: the hidden states and residual, and
        the first stage's routes (one expert id a token)."""
        return IntermediateTensors(
            {
                "hidden_states": torch.zeros((batch_size, self.hidden_size), dtype=dtype, device=device),
                "residual": torch.zeros((batch_size, self.hidden_size), dtype=dtype, device=device),
                "expert_ids": torch.zeros(batch_size, dtype=torch.int32, device=device),
            }
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        pp = get_pp_group()
        if pp.is_first_rank:
            if input_ids is None:
                raise ValueError("Read-ME routes from token ids; prompts given as embeddings cannot be routed.")
            expert_ids = self.router(input_ids, positions).argmax(dim=-1).to(torch.int32)
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            # The first stage's routes: no stage routes again.
            expert_ids = intermediate_tensors["expert_ids"]
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        self.expert_ids_buffer[: expert_ids.shape[0]].copy_(expert_ids)
        weights = torch.ones((expert_ids.shape[0], 1), dtype=torch.float32, device=expert_ids.device)
        if self.expert_cache_id is None:
            # This stage's slots in one gather: [layers, T, 1].
            slots = self.slot_table[self.start_layer : self.end_layer, expert_ids].unsqueeze(-1)
        for i in range(self.start_layer, self.end_layer):
            local = i - self.start_layer
            if self.expert_cache_id is None:
                routes = Routes(slots[local], weights)
            else:
                # Takes the layer's input only to run after the previous
                # layer's experts (a slot is never rewritten mid-read).
                layer_slots = torch.ops.vllm.readme_expert_slots(expert_ids, hidden_states, self.expert_cache_id, local)
                routes = Routes(layer_slots, weights, self.expert_pool)
            hidden_states, residual = self.layers[i](positions, hidden_states, residual, routes)
        if not pp.is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual, "expert_ids": expert_ids})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class ReadMEForCausalLM(nn.Module, SupportsPP):
    """vLLM entry point for ``architectures: ["ReadMEForCausalLM"]``."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ReadMEConfig = vllm_config.model_config.hf_config  # checked by config.py
        self.config = config
        self.vllm_config = vllm_config
        self.model = ReadMEModel(vllm_config=vllm_config, prefix="model")
        pp = get_pp_group()
        if pp.is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        # Called with (positions, expert_ids) after every forward: the
        # Prometheus metrics (metrics.py) and whatever tools add through
        # LLM.apply_model (tests record routes this way).
        self.route_observers: list[Callable[[torch.Tensor, torch.Tensor], None]] = []
        # Every tensor-parallel rank computes the same routes, and the first
        # pipeline stage computes them: one worker counts them (Prometheus
        # sums counters over processes) and writes the route log, or each
        # step would be counted once per worker.
        first_rank = get_tensor_model_parallel_rank() == 0 and pp.is_first_rank
        metrics_on = envs.VLLM_README_EXPERT_METRICS
        if first_rank and metrics_on:
            self.route_observers.append(ExpertStepMetrics(config.num_experts))
        self.stage_sends = None  # counts what this stage sends the next (all but the last stage)
        if metrics_on and not pp.is_last_rank and get_tensor_model_parallel_rank() == 0:
            self.stage_sends = StageSendCounters()
        # The plugin's options, parsed once for this process (config.py parsed
        # them first in the engine's); the expert cache reads them later.
        self.scheduler_options = SchedulerOptions.of(vllm_config)
        self.cache_options = ExpertCacheOptions.of(vllm_config)
        if self.scheduler_options.route_source == "model" and _expert_aware_scheduler(vllm_config):
            from vllm_readme.model_executor.route_publisher import MAX_PUBLISHED_EXPERTS, RoutePublisher

            # The scheduler refuses the channel for more experts than a byte holds.
            if first_rank and config.num_experts <= MAX_PUBLISHED_EXPERTS:
                self.route_observers.append(RoutePublisher(config.num_experts, engine_id_of(vllm_config)))
        logger.info(
            "Read-ME model: %d layers%s, %d experts x %d channels + %d shared, router %d layer(s) x %d hidden%s",
            config.num_hidden_layers,
            f" (this pipeline stage: layers {self.model.start_layer}-{self.model.end_layer - 1})"
            if pp.world_size > 1
            else "",
            config.num_experts,
            config.expert_intermediate_size,
            config.shared_intermediate_size,
            config.router_config.num_hidden_layers,
            config.router_config.hidden_size,
            " on the first stage" if pp.world_size > 1 else "",
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        hidden_states = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if self.stage_sends is not None and isinstance(hidden_states, IntermediateTensors):
            self.stage_sends(hidden_states.tensors, positions.shape[0])
        if self.route_observers:
            expert_ids = self.model.expert_ids_buffer[: positions.shape[0]]
            for observe in self.route_observers:
                observe(positions, expert_ids)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Every checkpoint tensor is checked against the shape config.json
        implies before it reaches a weight loader: vLLM's loaders narrow a
        parameter to a smaller tensor and leave the rest uninitialised."""
        shapes = checkpoint_tensor_shapes(self.config)
        checkpoint_tensors: set[str] = set()

        def checked(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if not name.endswith(NOT_WEIGHTS):
                    problem = tensor_shape_problem(shapes, name, tuple(tensor.shape))
                    if problem:
                        folder = Path(self.vllm_config.model_config.model)
                        raise TensorShapeError(f"{weights_file_of(folder, name)}: {problem}")
                    checkpoint_tensors.add(name)
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(checked(weights), mapper=checkpoint_names(self.config))
        check_no_tensor_missing(shapes, checkpoint_tensors, self.vllm_config.model_config.model)
        missing = [name for name, _ in self.named_parameters() if name not in loaded]
        router_missing = [n.removeprefix("model.") for n in missing if n.startswith("model.router.")]
        if router_missing:
            raise ReadMEConfigError(
                f"checkpoint is missing {len(router_missing)} router weight(s), e.g. {router_missing[:3]}. "
                "A Read-ME checkpoint must contain the decoupled router (router.*); convert the authors' "
                "layout with `vllm-readme import` or rebuild with `vllm-readme refactor`."
            )
        if missing:
            raise ReadMEConfigError(f"checkpoint is missing {len(missing)} weight(s), e.g. {missing[:3]}.")
        return loaded

    def stage_layers(self) -> list[ReadMEDecoderLayer]:
        """This pipeline stage's layers (every layer without pipeline parallelism)."""
        return list(self.model.layers[self.model.start_layer : self.model.end_layer])

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after FusedMoE prepacked its weights:
        pick how the routed experts run (same choice for every layer)."""
        for layer in self.stage_layers():
            layer.mlp.routed_kernel, why = choose_routed_kernel(layer.mlp.experts)
        logger.info("Read-ME routed experts: %s", why)
        if self.cache_options.pool_size() is not None:
            self._start_expert_cache(self.cache_options, why)

    def _start_expert_cache(self, options: ExpertCacheOptions, kernel: str) -> None:
        """Move the routed experts into a pool of slots (experts/cache.py);
        the layers' own expert weights are freed."""
        import vllm_readme.model_executor.expert_op  # noqa: F401 - registers torch.ops.vllm.readme_expert_slots
        from vllm_readme.experts.cache import ExpertCache, minimum_pages

        mlps = [layer.mlp for layer in self.stage_layers()]
        if any(mlp.routed_kernel is None for mlp in mlps):
            raise ReadMEConfigError(
                f"expert_pool needs the CPU grouped GEMM for the routed experts, but this engine runs {kernel}. "
                f'Leave expert_pool out of additional_config["vllm_readme"] here (docs/expert_cache.md, GPU).'
            )
        w13, w2 = (list(side) for side in zip(*(routed_expert_weights(mlp.experts) for mlp in mlps), strict=True))
        layers, experts = len(mlps), self.config.num_experts
        page_bytes = w13[0][0].nbytes + w2[0][0].nbytes
        # Start-up checked the same minimum (model_executor/config.py) with the
        # page size this layout has.
        pages = options.pool_pages(layers, experts, page_bytes, minimum_pages(experts))
        cache = ExpertCache(
            w13_layers=w13,
            w2_layers=w2,
            num_experts=experts,
            slot_table=self.model.slot_table[self.model.start_layer : self.model.end_layer],
            pages=pages,
            options=options,
            checkpoint=checkpoint_folder(self.vllm_config),
            isa=mlps[0].routed_kernel.isa,
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=get_tensor_model_parallel_world_size(),
            log_every=self.scheduler_options.log_every,
            engine_id=engine_id_of(self.vllm_config),
            first_layer=self.model.start_layer,
            worker=worker_rank(self.vllm_config),
        )
        for mlp in mlps:  # the pool holds them now
            drop_routed_expert_weights(mlp.experts)
        del w13, w2
        release_freed_memory()
        self.model.expert_cache = cache
        self.model.expert_pool = (cache.w13, cache.w2)
        self.model.expert_cache_id = cache.id
        logger.info("Read-ME %s", cache.describe())


def checkpoint_folder(vllm_config: VllmConfig) -> Path:
    """The local folder of the checkpoint's safetensors, found as vLLM's
    loader found it (``DefaultModelLoader._prepare_weights``): the model
    path itself, or for a hub id its snapshot in the Hugging Face cache or
    ``--download-dir``, at ``--revision``. vLLM has fetched the files by now,
    so this only looks them up."""
    model_config = vllm_config.model_config
    return Path(weights_folder(model_config.model, model_config.revision, vllm_config.load_config.download_dir))


def worker_rank(vllm_config: VllmConfig) -> int:
    """This worker's rank within its engine, as vLLM numbers an engine's
    workers: pipeline stage x tensor-parallel size + tensor-parallel rank."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    return get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()


def streams_experts(vllm_config: VllmConfig) -> bool:
    """Whether this engine's expert pool reads its pages from disk (the
    checkpoint, or a page file written from it), so that loading may skip
    all but one expert per layer: a pool below 100 % on a CPU, with a
    backing store other than "memory"."""
    from vllm.platforms import current_platform

    options = ExpertCacheOptions.of(vllm_config)
    if options.pool_size() is None or not current_platform.is_cpu():
        return False
    return options.backing_store in ("auto", "disk", "checkpoint")


def _expert_aware_scheduler(vllm_config: VllmConfig) -> bool:
    """Whether the engine schedules with the plugin's expert-aware
    scheduler (or a subclass), the only reader of the model's routes."""
    if vllm_config.scheduler_config.scheduler_cls is None:
        return False
    from vllm_readme.scheduler.vllm_scheduler import ExpertAwareMixin

    try:
        return issubclass(scheduler_class(vllm_config), ExpertAwareMixin)
    except Exception:  # an unresolvable class fails vLLM's own start-up, not ours
        return False


def release_freed_memory() -> None:
    """Hand the freed expert weights back to the OS. glibc keeps freed heap
    memory for reuse (its mmap threshold grows past the size of one layer's
    experts as a model loads), so without this the process's resident memory
    does not fall when the pool replaces the experts
    (benchmarks/expert_cache_memory.py measures the process's resident
    memory at each pool size)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def checkpoint_names(config: ReadMEConfig) -> WeightsMapper:
    """The checkpoint's names (README, "Checkpoint format") -> this model's.

    ``*.{q,k,v}_proj`` become shards of ``*.qkv_proj``; the shared MLP's (and
    a gated router MLP's) ``{gate,up}_proj`` shards of ``gate_up_proj``; the
    router runs inside the compiled ReadMEModel, so ``router.*`` moves under
    ``model.``. The stacked experts keep their names (ReadMEMoE.load_weights).
    """
    stacked = {
        ".q_proj": (".qkv_proj", "q"),
        ".k_proj": (".qkv_proj", "k"),
        ".v_proj": (".qkv_proj", "v"),
        ".shared.gate_proj": (".shared.gate_up_proj", 0),
        ".shared.up_proj": (".shared.gate_up_proj", 1),
    }
    if config.router_config.gated_mlp:  # an ungated router MLP keeps its up_proj
        stacked |= {".mlp.gate_proj": (".mlp.gate_up_proj", 0), ".mlp.up_proj": (".mlp.gate_up_proj", 1)}
    return WeightsMapper(orig_to_new_stacked=stacked, orig_to_new_prefix={"router.": "model.router."})
