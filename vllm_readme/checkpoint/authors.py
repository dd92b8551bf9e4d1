"""Import the Read-ME authors' layout into ours (DESIGN.md §2).

Their release is a dense Llama checkpoint plus

* ``cluster_predictor.*``: the router, a 1-layer transformer over token ids;
* a mask file (``mask.pt``): per layer, a bool ``'residual'`` mask of the
  always-on channels and one bool mask per expert over the MLP's channels.

Router names we read (their ``cluster_predictor`` module -> our ``router``):

====================================================  ==========================
``cluster_predictor.embed_tokens.weight``             ``router.embed_tokens``
``cluster_predictor.layers.N.self_attn.{q,k,v,o}_proj`` same under ``router.``
``cluster_predictor.layers.N.mlp.proj_1`` / ``proj_2`` ``router.layers.N.mlp.up_proj`` / ``down_proj``
``cluster_predictor.layers.N.*_layernorm``            same under ``router.``
``cluster_predictor.norm``                            ``router.norm``
``cluster_predictor.proj_out``                        ``router.expert_head``
====================================================  ==========================

Head count and attention scale are not recoverable from tensor shapes, so
they are arguments (paper defaults: 4 heads, scale 1.0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vllm_readme.checkpoint.convert import split_dense_mlp
from vllm_readme.configuration_readme import ReadMEConfig, ReadMEConfigError

PREDICTOR = "cluster_predictor."
_ROUTER_RENAMES = (
    (".mlp.proj_1.", ".mlp.up_proj."),
    (".mlp.proj_2.", ".mlp.down_proj."),
    ("proj_out.", "expert_head."),
)
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")


def load_mask_file(path: str | Path, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (shared mask [I], expert masks [E, I]) from the authors' file.

    Accepts ``{layer: {'residual': m, 0: m0, 1: m1, ...}}`` (keys int or str),
    ``{layer: {'residual': m, 'experts': [E, I]}}`` or a list indexed by layer.
    """
    raw = torch.load(path, map_location="cpu", weights_only=True)
    layers = raw if isinstance(raw, list) else [raw.get(i, raw.get(str(i))) for i in range(num_layers)]
    if len(layers) != num_layers or any(entry is None for entry in layers):
        raise ReadMEConfigError(f"{path}: expected masks for {num_layers} layers, found {len(layers)} usable entries.")
    out = []
    for layer, entry in enumerate(layers):
        if "residual" not in entry:
            raise ReadMEConfigError(f"{path}: layer {layer} has no 'residual' (shared) mask.")
        shared = torch.as_tensor(entry["residual"]).bool().flatten()
        if "experts" in entry:
            experts = torch.as_tensor(entry["experts"]).bool()
        else:
            keys = sorted((k for k in entry if k != "residual"), key=lambda k: int(k))
            experts = torch.stack([torch.as_tensor(entry[k]).bool().flatten() for k in keys])
        out.append((shared, experts))
    return out


def import_authors_checkpoint(
    llama_dir: str | Path,
    mask_file: str | Path,
    out_dir: str | Path,
    router_heads: int = 4,
    router_kv_heads: int | None = None,
    router_attention_scale: float | None = 1.0,
    router_rope_theta: float = 10000.0,
) -> Path:
    """Convert (dense Llama + cluster_predictor + mask.pt) into our format."""
    llama_dir, out = Path(llama_dir), Path(out_dir)
    dense_config = json.loads((llama_dir / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(llama_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    if not weights:
        raise ReadMEConfigError(f"{llama_dir}: no *.safetensors weight files.")
    predictor = {k[len(PREDICTOR) :]: v for k, v in weights.items() if k.startswith(PREDICTOR)}
    if not predictor:
        raise ReadMEConfigError(f"{llama_dir}: no {PREDICTOR}* weights; the router is missing from the checkpoint.")
    num_layers = dense_config["num_hidden_layers"]
    masks = load_mask_file(mask_file, num_layers)
    num_experts = masks[0][1].shape[0]

    out_weights: dict[str, torch.Tensor] = {}
    layer_parts = []
    for layer in tqdm(range(num_layers), desc="splitting MLPs", unit="layer"):
        prefix = f"model.layers.{layer}.mlp."
        shared, experts = masks[layer]
        if experts.shape[0] != num_experts:
            raise ReadMEConfigError(
                f"{mask_file}: layer {layer} has {experts.shape[0]} experts, layer 0 has {num_experts}."
            )
        layer_parts.append(
            split_dense_mlp(
                weights[prefix + "gate_proj.weight"],
                weights[prefix + "up_proj.weight"],
                weights[prefix + "down_proj.weight"],
                shared,
                experts,
            )
        )
    # Layers may keep different numbers of shared/expert channels; the format
    # has one size for each, so smaller layers are zero-padded (exact).
    shared_size = max(int(m[0].sum()) for m in masks)
    padded = max(max(p["sizes"]) for p in layer_parts)
    for layer, parts in enumerate(layer_parts):
        prefix = f"model.layers.{layer}.mlp."
        for name, tensor in parts.items():
            if name == "sizes" or (name.startswith("shared.") and shared_size == 0):
                continue
            if name.startswith("experts."):
                tensor = _pad_channels(tensor, padded, down=name.endswith("down_proj"))
            else:
                tensor = _pad_channels(tensor[None], shared_size, down="down_proj" in name)[0]
            out_weights[prefix + name] = tensor.contiguous()
    for name, tensor in weights.items():
        if name.startswith(PREDICTOR) or _DENSE_MLP.match(name):
            continue
        out_weights[name] = tensor.contiguous()
    for name, tensor in predictor.items():
        new = name
        for old, repl in _ROUTER_RENAMES:
            new = new.replace(old, repl)
        out_weights["router." + new] = tensor.contiguous()

    embed = predictor["embed_tokens.weight"]
    q = predictor["layers.0.self_attn.q_proj.weight"]
    k = predictor["layers.0.self_attn.k_proj.weight"]
    head_dim = q.shape[0] // router_heads
    router = dict(
        vocab_size=embed.shape[0],
        num_experts=num_experts,
        num_hidden_layers=1 + max(int(n.split(".")[1]) for n in predictor if n.startswith("layers.")),
        hidden_size=embed.shape[1],
        num_attention_heads=router_heads,
        num_key_value_heads=router_kv_heads or k.shape[0] // head_dim,
        head_dim=head_dim,
        intermediate_size=predictor["layers.0.mlp.proj_1.weight"].shape[0],
        gated_mlp=False,
        bias="layers.0.self_attn.q_proj.bias" in predictor,
        attention_scale=router_attention_scale,
        max_position_embeddings=dense_config.get("max_position_embeddings", 4096),
        rope_theta=router_rope_theta,
        rms_norm_eps=dense_config.get("rms_norm_eps", 1e-5),
    )
    sizes_per_layer = [p["sizes"] for p in layer_parts]
    config_data = {k: v for k, v in dense_config.items() if k not in ("architectures", "model_type", "auto_map")}
    config = ReadMEConfig(
        **config_data,
        num_experts=num_experts,
        shared_intermediate_size=shared_size,
        expert_intermediate_size=padded,
        expert_intermediate_sizes=[max(s[e] for s in sizes_per_layer) for e in range(num_experts)],
        router=router,
        architectures=["ReadMEForCausalLM"],
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(out_weights, out / "model.safetensors", metadata={"format": "pt"})
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
        "generation_config.json",
    ):
        if (llama_dir / name).is_file():
            (out / name).write_bytes((llama_dir / name).read_bytes())
    return out


def _pad_channels(tensor: torch.Tensor, size: int, down: bool) -> torch.Tensor:
    """Zero-pad the channel dim of stacked ``[E, I, H]`` (or ``[E, H, I]``)."""
    current = tensor.shape[2] if down else tensor.shape[1]
    if current == size:
        return tensor
    pad = (0, size - current) if down else (0, 0, 0, size - current)
    return torch.nn.functional.pad(tensor, pad)
