# SPDX-License-Identifier: Apache-2.0
"""The Read-ME authors' checkpoint layout, and their forward, for tests.

``write_authors_checkpoint`` lays a tiny random checkpoint out the way the
authors' code (VITA-Group/READ-ME, commit 1df7e68) saves one: a dense Llama
whose ``config.json`` carries their fork's router fields, the router as
``cluster_predictor.*`` with flat layer-suffixed names, ``pytorch_model.bin``
or safetensors (sharded or not), and ``mask.pt`` as ``generate_mask.py``
writes it (module-name keys, ``{'residual': m, 0: m0, ...}``, fp16).

``AuthorsModel`` computes what their code computes, written from their
``cluster_predictor_class.forward`` and ``LlamaMLP.forward`` and sharing no
code with this package: the router over flat parameters, the masked dense
MLP ``down((residual + mask_e) * act(gate x) * up x)`` on transformers' own
Llama, and their precise generation mode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROUTER_EPS = 1e-6  # hard-coded in their cluster_predictor_class


@dataclass
class Shape:
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    router_dim: int = 64  # their embedding_dim == inter_dim
    router_heads: int = 2
    router_layers: int = 1
    experts: int = 4
    normalizer: float = 1.0
    rope_theta: float = 50000.0  # not the default: the router must take the backbone's
    rms_norm_eps: float = 1e-5  # the backbone's; the router's is 1e-6 whatever this says


def write_authors_checkpoint(root: Path, fmt: str, shape: Shape | None = None, seed: int = 0) -> AuthorsModel:
    """``fmt``: 'bin', 'bin-sharded', 'safetensors' or 'safetensors-sharded'."""
    from vllm_readme.checkpoint.tiny import train_tokenizer

    shape = shape or Shape()
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = train_tokenizer()
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        initializer_range=0.05,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    dense = LlamaForCausalLM(llama).eval()
    predictor = _random_predictor(shape, dense.model.embed_tokens.weight, gen)
    weights = {k: v.contiguous() for k, v in dense.state_dict().items()}
    weights.update({"cluster_predictor." + k: v for k, v in predictor.items()})
    _save_weights(root, weights, fmt)
    # As transformers 4.40 (their fork's base) writes a LlamaConfig, plus the
    # fields train_red.py sets on it.
    config = {
        "_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.05,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 512,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "vocab_size": len(tokenizer),
        "add_cluster_predictor": True,
        "train_predictor": False,
        "embedding_dim": shape.router_dim,
        "inter_dim": shape.router_dim,
        "N_cluster": shape.experts,
        "hidden_act_predictor": "silu",
        "max_position_embeddings_predictor": 4096,
        "nonautoregressive": False,
        "n_head": shape.router_heads,
        "n_layer": shape.router_layers,
        "normalizer": shape.normalizer,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(root)
    masks = _generate_masks(shape, gen)
    torch.save(masks, root / "mask.pt")
    return AuthorsModel(dense, predictor, masks, shape)


def _random_predictor(shape: Shape, backbone_embed: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Their init (kaiming-uniform linears, embedding from the backbone's first
    columns), with norm weights and biases perturbed so that a norm or bias
    landing in the wrong place changes the routes."""
    d = shape.router_dim

    def linear(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        bound = math.sqrt(6.0 / in_f)
        w = (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound
        return w, (torch.rand(out_f, generator=gen) * 2 - 1) / math.sqrt(in_f)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.3 * torch.randn(n, generator=gen)

    p: dict[str, torch.Tensor] = {"embed.weight": backbone_embed[:, :d].detach().clone()}
    for i in range(shape.router_layers):
        p[f"input_layernorm_{i}.weight"] = norm(d)
        p[f"post_attention_layernorm_{i}.weight"] = norm(d)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "proj_1", "proj_2"):
            p[f"{name}_{i}.weight"], p[f"{name}_{i}.bias"] = linear(d, d)
    p["out_layernorm.weight"] = norm(d)
    p["proj_out.weight"], p["proj_out.bias"] = linear(shape.experts, d)
    return p


def _generate_masks(shape: Shape, gen: torch.Generator) -> dict:
    """As generate_mask.py: per domain the top half of the channels; residual =
    their intersection; expert e = domain_e - residual; fp16; keyed by the
    module name of a DDP-wrapped model."""
    masks = {}
    n = shape.intermediate
    keep = n // 2
    for layer in range(shape.layers):
        common = torch.randperm(n, generator=gen)[: n // 4 + 8 * layer]  # layers differ in shared size
        domain_masks = []
        for _ in range(shape.experts):
            score = torch.rand(n, generator=gen)
            score[common] += 2.0
            domain = torch.zeros(n, dtype=torch.float16)
            domain[score.topk(keep).indices] = 1
            domain_masks.append(domain)
        residual = torch.ones(n, dtype=torch.float16)
        for domain in domain_masks:
            residual = residual * domain
        entry = {"residual": residual}
        for e, domain in enumerate(domain_masks):
            entry[e] = domain - residual
        masks[f"module.model.layers.{layer}.mlp.down_proj"] = entry
    return masks


def _save_weights(root: Path, weights: dict[str, torch.Tensor], fmt: str) -> None:
    names = sorted(weights)
    if fmt in ("bin", "safetensors"):
        shards = {("pytorch_model.bin" if fmt == "bin" else "model.safetensors"): names}
    elif fmt in ("bin-sharded", "safetensors-sharded"):
        half = len(names) // 2
        if fmt == "bin-sharded":
            files = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
        else:
            files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        shards = {files[0]: names[:half], files[1]: names[half:]}
        index = "pytorch_model.bin.index.json" if fmt == "bin-sharded" else "model.safetensors.index.json"
        weight_map = {name: file for file, group in shards.items() for name in group}
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (root / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    for file, group in shards.items():
        part = {name: weights[name] for name in group}
        if file.endswith(".bin"):
            torch.save(part, root / file)
        else:
            save_file(part, root / file, metadata={"format": "pt"})


class AuthorsModel:
    """What the authors' LlamaForCausalLM computes, fp32."""

    def __init__(self, dense: LlamaForCausalLM, predictor: dict, masks: dict, shape: Shape):
        self.dense, self.p, self.shape = dense.float().eval(), predictor, shape
        self.masks = [masks[f"module.model.layers.{i}.mlp.down_proj"] for i in range(shape.layers)]

    # -- cluster_predictor_class.forward ------------------------------------
    def router_logits(self, full_ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Their forward with ``full_input_ids`` (training, and precise-mode
        generation); ``last`` = seqlen of the call (queries of the last
        ``last`` positions only, as in a decode step). full_ids: [1, T]."""
        p, s = self.p, self.shape
        # Their decode-step path only runs with one router layer (with more,
        # its shapes do not broadcast); training and prefill use last=None.
        assert last is None or s.router_layers == 1
        full = full_ids.shape[-1]
        seqlen = full if last is None else last
        d, heads = s.router_dim, s.router_heads
        head_dim = d // heads
        out = F.embedding(full_ids, p["embed.weight"])
        for i in range(s.router_layers):
            residual = out[:, -seqlen:, :]
            x = _rms(out, p[f"input_layernorm_{i}.weight"])
            q = F.linear(x, p[f"q_proj_{i}.weight"], p[f"q_proj_{i}.bias"])
            k = F.linear(x, p[f"k_proj_{i}.weight"], p[f"k_proj_{i}.bias"])
            v = F.linear(x, p[f"v_proj_{i}.weight"], p[f"v_proj_{i}.bias"])
            q, k, v = (t.view(1, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            cos, sin = _rope_cos_sin(head_dim, full, s.rope_theta)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            q = q[:, :, -seqlen:]
            scores = q @ k.transpose(2, 3) / s.normalizer
            causal = torch.triu(torch.full((seqlen, seqlen), torch.finfo(scores.dtype).min), diagonal=1)
            if seqlen == full:  # their (seqlen, seqlen) mask; a decode step's is (1, 1) zeros
                scores = scores + causal
            attn = scores.softmax(-1, dtype=torch.float32)
            out = (attn @ v).transpose(1, 2).reshape(1, seqlen, d)
            out = F.linear(out, p[f"o_proj_{i}.weight"], p[f"o_proj_{i}.bias"]) + residual
            residual = out
            x = _rms(out, p[f"post_attention_layernorm_{i}.weight"])
            x = F.silu(F.linear(x, p[f"proj_1_{i}.weight"], p[f"proj_1_{i}.bias"]))
            out = F.linear(x, p[f"proj_2_{i}.weight"], p[f"proj_2_{i}.bias"]) + residual
        return F.linear(_rms(out, p["out_layernorm.weight"]), p["proj_out.weight"], p["proj_out.bias"])

    # -- LlamaForCausalLM.forward with cluster_id ----------------------------
    def logits(self, ids: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """Backbone logits [T, V] with each down_proj input multiplied by
        residual + mask[route] (their LlamaMLP.forward)."""
        hooks = []
        for layer, block in enumerate(self.dense.model.layers):
            entry = self.masks[layer]
            experts = torch.stack([entry[e] for e in range(self.shape.experts)]).float()
            mask = experts[routes] + entry["residual"].float()
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(lambda m, a, mask=mask: (mask * a[0],)))
        try:
            with torch.no_grad():
                return self.dense(ids).logits[0].float()
        finally:
            for hook in hooks:
                hook.remove()

    def generate(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[int], torch.Tensor]:
        """Greedy generation in their precise mode: the prompt routed by one
        full pass, every new token by re-running the router over the whole
        sequence with the query of the last position. Returns new tokens,
        the route of every fed position, and the logits of every position."""
        ids = list(prompt_ids)
        with torch.no_grad():
            routes = self.router_logits(torch.tensor([ids])).argmax(-1)[0].tolist()
            for step in range(new_tokens):
                logits = self.logits(torch.tensor([ids]), torch.tensor(routes))
                ids.append(int(logits[-1].argmax()))
                if step + 1 < new_tokens:  # the last token is never fed back
                    routes.append(int(self.router_logits(torch.tensor([ids]), last=1).argmax(-1)[0, -1]))
            final = self.logits(torch.tensor([ids[:-1]]), torch.tensor(routes))
        return ids[len(prompt_ids) :], routes, final


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + ROUTER_EPS)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_cos_sin(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(length).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]
