# SPDX-License-Identifier: Apache-2.0
"""Import what the Read-ME authors' code writes into our format
(docs/authors_checkpoint.md; ours: docs/design.md, "Checkpoint format").

The authors' release (VITA-Group/READ-ME) is a *dense* Llama checkpoint saved
by their fork of transformers, plus a separate mask file:

* weights: ``pytorch_model.bin`` (their training calls ``save_pretrained``
  with ``safe_serialization=False``) or safetensors, one file or sharded with
  an index. The router is the module ``cluster_predictor`` (their class
  ``cluster_predictor_class``), whose parameters are flat attributes with a
  layer suffix:

  =====================================  ======================================
  authors' ``cluster_predictor.*``       ours (``router.*``)
  =====================================  ======================================
  ``embed``                              ``embed_tokens``
  ``input_layernorm_{i}``                ``layers.{i}.input_layernorm``
  ``{q,k,v,o}_proj_{i}``                 ``layers.{i}.self_attn.{q,k,v,o}_proj``
  ``post_attention_layernorm_{i}``       ``layers.{i}.post_attention_layernorm``
  ``proj_1_{i}`` / ``proj_2_{i}``        ``layers.{i}.mlp.up_proj`` / ``down_proj``
  ``out_layernorm``                      ``norm``
  ``proj_out``                           ``expert_head``
  =====================================  ======================================

* the router's hyper-parameters are fields their fork adds to the backbone's
  ``config.json``: ``embedding_dim``, ``inter_dim``, ``n_layer``, ``n_head``,
  ``N_cluster``, ``normalizer``, ``hidden_act_predictor``,
  ``max_position_embeddings_predictor``, ``nonautoregressive``.
* ``mask.pt`` from their ``generate_mask.py``: keyed by the module names that
  ``named_modules()`` gives the hooked ``down_proj`` layers
  (``model.layers.3.mlp.down_proj``, ``module.``-prefixed when the model was
  wrapped), each value ``{'residual': m, 0: m0, 1: m1, ...}`` in fp16 where
  ``m_e = domain_mask_e - residual``.

What their code computes, and so what the imported model computes
(docs/authors_checkpoint.md has the derivation):

* MLP of a token routed to expert e: ``down((residual + m_e) * act(gate x) *
  up x)``. The sum is kept exactly: a channel in both masks counts twice, so
  it stays in the shared part *and* in the expert (``generate_mask.py``
  never writes such an overlap; a hand-made file might).
* Router attention: ``q.k / normalizer`` (no 1/sqrt(d)), softmax in fp32,
  RoPE with the *backbone's* ``rope_theta`` and no scaling, head size
  ``inter_dim / n_head``, no grouped KV heads. Every RMSNorm of the router
  uses eps 1e-6, hard-coded in their class whatever the backbone uses.
* Routes: their precise generation mode (the default,
  ``generation_precise_mode = True``) re-runs the router over the whole
  sequence and takes the last position: the full-sequence causal route, which
  our KV-cached router computes incrementally. The same expert id serves
  every layer.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm
from transformers.modeling_utils import load_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from vllm_readme.checkpoint.convert import split_dense_mlp
from vllm_readme.checkpoint.io import (
    config_errors_named,
    read_config_json,
    read_weight_map,
    validate_checkpoint,
    write_folder_atomically,
)
from vllm_readme.configuration_readme import (
    ROUTER_ACTIVATIONS,
    CheckpointFileError,
    ReadMEConfigError,
    readme_config_from_dense,
)

logger = logging.getLogger(f"vllm.{__name__}")

PREDICTOR = "cluster_predictor."
# Hard-coded in the authors' cluster_predictor_class (LlamaRMSNorm(..., eps=1e-6)).
AUTHORS_ROUTER_RMS_NORM_EPS = 1e-6
# Fields the authors' fork adds to LlamaConfig; not part of the backbone.
PREDICTOR_CONFIG_FIELDS = (
    "add_cluster_predictor",
    "train_predictor",
    "embedding_dim",
    "inter_dim",
    "N_cluster",
    "hidden_act_predictor",
    "max_position_embeddings_predictor",
    "nonautoregressive",
    "n_head",
    "n_layer",
    "normalizer",
)
_ROUTER_LAYER_PARAM = re.compile(
    r"^(input_layernorm|post_attention_layernorm|q_proj|k_proj|v_proj|o_proj|proj_1|proj_2)_(\d+)\.(weight|bias)$"
)
_ROUTER_LAYER_TARGET = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "proj_1": "mlp.up_proj",
    "proj_2": "mlp.down_proj",
}
_ROUTER_TOP_LEVEL = {
    "embed.weight": "embed_tokens.weight",
    "out_layernorm.weight": "norm.weight",
    "proj_out.weight": "expert_head.weight",
    "proj_out.bias": "expert_head.bias",
}
# Buffers that their modules may carry into a state dict; recomputed by us.
_ROUTER_IGNORED = re.compile(r"^rotary_emb\.inv_freq$")
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_MASK_MODULE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")
# What torch.load raises for a file that is not a (readable) torch save:
# pickle's errors, a broken zip archive (RuntimeError), a short file, and
# the unpickler's own IndexError/KeyError/struct.error on corrupt opcodes.
_TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    OSError,
    LookupError,
    TypeError,
    AttributeError,
    ArithmeticError,
    struct.error,
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class RouterOverrides:
    """Command-line values that replace what config.json says (None = keep)."""

    num_heads: int | None = None
    normalizer: float | None = None
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    hidden_act: str | None = None


# ---------------------------------------------------------------------------
# Reading what they saved


def read_checkpoint_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF-style folder: safetensors or ``pytorch_model.bin``,
    one file or sharded with an index (transformers' own loader reads each)."""
    folder = Path(folder)
    files: list[Path] = []
    for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_weight_map(index, "Restore the index the checkpoint was saved with.").values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ReadMEConfigError(f"{index}: lists shard(s) {missing} that are not in {folder}.")
            files = [folder / s for s in shards]
            break
        if (folder / single_name).is_file():
            files = [folder / single_name]
            break
    if not files:
        raise ReadMEConfigError(
            f"{folder}: no weights found; expected {SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or a sharded index "
            f"({SAFE_WEIGHTS_INDEX_NAME} / {WEIGHTS_INDEX_NAME})."
        )
    weights: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="reading weights", unit="file", disable=len(files) < 2):
        try:
            weights.update(load_state_dict(str(file)))
        except (SafetensorError, *_TORCH_LOAD_ERRORS) as exc:
            raise CheckpointFileError(
                f"{file}: cannot be read as weights ({' '.join(str(exc).split())[:200]}); it is truncated or "
                "corrupt. Copy the checkpoint again."
            ) from None
    return weights


def load_mask_file(
    path: str | Path, num_layers: int, intermediate_size: int, num_experts: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (residual mask ``[I]``, expert masks ``[E, I]``), both bool.

    Keys may be module names with any prefix (``module.model.layers.3.mlp.
    down_proj``, as ``generate_mask.py`` writes them) or layer indices (int or
    str); a list indexed by layer is accepted too. Each entry is
    ``{'residual': m, 0: m0, 1: m1, ...}`` (int or str expert keys) or
    ``{'residual': m, 'experts': [E, I]}``; values must be 0/1.
    """
    path = Path(path)
    if not path.is_file():
        raise ReadMEConfigError(f"mask file {path} does not exist; pass the authors' mask.pt with --masks.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_LOAD_ERRORS as exc:
        raise CheckpointFileError(
            f"{path}: not a readable mask file ({' '.join(str(exc).split())[:200]}). Pass the mask.pt that "
            "the authors' generate_mask.py wrote, with --masks."
        ) from None
    by_layer = _masks_by_layer(raw, path)
    expected = list(range(num_layers))
    if sorted(by_layer) != expected:
        raise ReadMEConfigError(
            f"{path}: has masks for layer(s) {sorted(by_layer)}, but the model has {num_layers} layers "
            f"(expected one entry per layer 0..{num_layers - 1}, keyed like 'model.layers.0.mlp.down_proj'). "
            "Was this mask file made for another model?"
        )
    out = []
    for layer in expected:
        residual, experts = _layer_masks(by_layer[layer], path, layer, intermediate_size)
        if num_experts is not None and experts.shape[0] != num_experts:
            raise ReadMEConfigError(
                f"{path}: layer {layer} has masks for {experts.shape[0]} experts, but the router predicts "
                f"{num_experts} (N_cluster / proj_out). Use the mask file the router was trained with."
            )
        out.append((residual, experts))
    sizes = {e.shape[0] for _, e in out}
    if len(sizes) > 1:
        raise ReadMEConfigError(f"{path}: layers have different numbers of experts {sorted(sizes)}.")
    return out


def _masks_by_layer(raw, path: Path) -> dict[int, dict]:
    if isinstance(raw, (list, tuple)):
        return dict(enumerate(raw))
    if not isinstance(raw, dict):
        raise ReadMEConfigError(f"{path}: expected a dict of per-layer masks, found {type(raw).__name__}.")
    by_layer: dict[int, dict] = {}
    for key, entry in raw.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            layer = int(key)
        else:
            match = _MASK_MODULE_KEY.search(str(key))
            if match is None:
                raise ReadMEConfigError(
                    f"{path}: key {key!r} names no MLP; expected module names ending in "
                    "'layers.N.mlp.down_proj' (as generate_mask.py writes them) or layer indices."
                )
            layer = int(match.group(1))
        if layer in by_layer:
            raise ReadMEConfigError(f"{path}: layer {layer} appears twice (key {key!r}).")
        by_layer[layer] = entry
    return by_layer


def _layer_masks(entry, path: Path, layer: int, intermediate_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(entry, dict) or "residual" not in entry:
        raise ReadMEConfigError(f"{path}: layer {layer} has no 'residual' (shared) mask.")
    if "experts" in entry:
        experts = _mask_tensor(entry["experts"], path, layer, "expert")
        if experts.dim() != 2:
            raise ReadMEConfigError(
                f"{path}: layer {layer}'s 'experts' mask has shape {list(experts.shape)}; expected [experts, channels]."
            )
    else:
        keys = [k for k in entry if k != "residual"]
        try:
            order = sorted(keys, key=int)
        except (TypeError, ValueError):
            raise ReadMEConfigError(
                f"{path}: layer {layer} has expert keys {keys}; expected 0, 1, ... (and 'residual')."
            ) from None
        if [int(k) for k in order] != list(range(len(order))) or not order:
            raise ReadMEConfigError(
                f"{path}: layer {layer} has expert keys {[int(k) for k in order]}; expected 0..E-1 without gaps."
            )
        experts = [_mask_tensor(entry[k], path, layer, f"expert {k}").flatten() for k in order]
        if len({mask.numel() for mask in experts}) > 1:
            raise ReadMEConfigError(f"{path}: layer {layer}'s expert masks differ in length.")
        experts = torch.stack(experts)
    residual = _mask_tensor(entry["residual"], path, layer, "residual").flatten()
    for name, mask in (("residual", residual), ("expert", experts)):
        if mask.shape[-1] != intermediate_size:
            raise ReadMEConfigError(
                f"{path}: layer {layer}'s {name} mask covers {mask.shape[-1]} channels, but the MLP has "
                f"intermediate_size={intermediate_size}. Was this mask file made for another model?"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ReadMEConfigError(f"{path}: layer {layer}'s {name} mask has values other than 0 and 1.")
    return residual.bool(), experts.bool()


def _mask_tensor(value, path: Path, layer: int, name: str) -> torch.Tensor:
    try:
        mask = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ReadMEConfigError(
            f"{path}: layer {layer}'s {name} mask is a {type(value).__name__}, not a tensor of 0/1 values."
        ) from None
    return mask


# ---------------------------------------------------------------------------
# The router


def router_config_from_authors(
    dense_config: dict, predictor: dict[str, torch.Tensor], overrides: RouterOverrides = RouterOverrides()
) -> dict:
    """Our RouterConfig fields from the authors' config fields (shapes where
    the config is silent and a shape determines the value)."""
    _check_router_variant(dense_config, predictor)
    embed = predictor["embed.weight"]
    layers = 1 + max(int(m.group(2)) for m in map(_ROUTER_LAYER_PARAM.match, predictor) if m)
    inter_dim = predictor["q_proj_0.weight"].shape[0]
    embedding_dim = embed.shape[1]
    checks = {
        "embedding_dim": embedding_dim,
        "inter_dim": inter_dim,
        "n_layer": layers,
        "N_cluster": predictor["proj_out.weight"].shape[0],
    }
    for field, from_weights in checks.items():
        stated = dense_config.get(field)
        if stated is not None and int(stated) != from_weights:
            raise ReadMEConfigError(
                f"config.json says {field}={stated} but the cluster_predictor weights have {from_weights}."
            )
    if embedding_dim != inter_dim:
        raise ReadMEConfigError(
            f"unsupported router: embedding_dim={embedding_dim} differs from inter_dim={inter_dim}; the authors' "
            "router adds its attention output (inter_dim) to its input (embedding_dim), so both must agree."
        )
    heads = overrides.num_heads or dense_config.get("n_head")
    if not heads:
        raise ReadMEConfigError(
            "config.json has no n_head (the router's attention heads) and head count cannot be read from "
            "shapes; pass --router-heads N (the paper uses 4)."
        )
    if inter_dim % heads:
        raise ReadMEConfigError(f"router inter_dim={inter_dim} is not divisible by n_head={heads}.")
    normalizer = overrides.normalizer if overrides.normalizer is not None else dense_config.get("normalizer")
    if normalizer is None:
        raise ReadMEConfigError(
            "config.json has no normalizer (the router's q.k divisor); pass --router-normalizer X "
            "(the authors' runs use 1)."
        )
    if float(normalizer) <= 0:
        raise ReadMEConfigError(f"router normalizer must be > 0, got {normalizer}.")
    act = overrides.hidden_act or dense_config.get("hidden_act_predictor") or "silu"
    if act not in ROUTER_ACTIVATIONS:
        raise ReadMEConfigError(
            f"router activation {act!r} (hidden_act_predictor) is not supported; supported: {list(ROUTER_ACTIVATIONS)}."
        )
    # Their rotary embedding computes angles for any position, so the
    # router's position limit is the backbone's, never below theirs.
    max_positions = max(
        int(dense_config.get("max_position_embeddings_predictor") or 0),
        int(dense_config.get("max_position_embeddings") or 0),
        1,
    )
    return dict(
        vocab_size=embed.shape[0],
        num_experts=checks["N_cluster"],
        num_hidden_layers=layers,
        hidden_size=embedding_dim,
        num_attention_heads=int(heads),
        num_key_value_heads=int(heads),
        head_dim=inter_dim // int(heads),
        intermediate_size=predictor["proj_1_0.weight"].shape[0],
        hidden_act=act,
        gated_mlp=False,
        bias="q_proj_0.bias" in predictor,
        attention_scale=1.0 / float(normalizer),
        max_position_embeddings=max_positions,
        rope_theta=float(overrides.rope_theta or _backbone_rope_theta(dense_config)),
        rms_norm_eps=float(overrides.rms_norm_eps or AUTHORS_ROUTER_RMS_NORM_EPS),
    )


def _check_router_variant(dense_config: dict, predictor: dict[str, torch.Tensor]) -> None:
    if dense_config.get("nonautoregressive"):
        raise ReadMEConfigError(
            "unsupported router variant: config.json has nonautoregressive=true (the authors' ablation router "
            "without attention, cluster_predictor_class_non_autoregressive); only the causal router is supported."
        )
    if "wpe.weight" in predictor:
        raise ReadMEConfigError(
            "unsupported router variant: cluster_predictor.wpe (learned position embeddings, rope=False); the "
            "authors' LlamaForCausalLM builds the RoPE router, which is the one supported."
        )
    unknown = sorted(
        name
        for name in predictor
        if name not in _ROUTER_TOP_LEVEL and not _ROUTER_LAYER_PARAM.match(name) and not _ROUTER_IGNORED.match(name)
    )
    required = ["embed.weight", "q_proj_0.weight", "proj_1_0.weight", "proj_out.weight", "out_layernorm.weight"]
    missing = [name for name in required if name not in predictor]
    if unknown or missing:
        raise ReadMEConfigError(
            "unknown router variant: "
            + (f"unexpected cluster_predictor parameters {unknown[:6]}; " if unknown else "")
            + (f"missing {missing}; " if missing else "")
            + "expected the authors' cluster_predictor_class (embed, input_layernorm_i, q/k/v/o_proj_i, "
            "post_attention_layernorm_i, proj_1_i, proj_2_i, out_layernorm, proj_out)."
        )


def _backbone_rope_theta(dense_config: dict) -> float:
    if "rope_theta" in dense_config:
        return float(dense_config["rope_theta"])
    return float((dense_config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def rename_router_weights(predictor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' flat, layer-suffixed names -> ours under ``router.``."""
    out = {}
    for name, tensor in predictor.items():
        if _ROUTER_IGNORED.match(name):
            continue
        match = _ROUTER_LAYER_PARAM.match(name)
        if match:
            module, layer, kind = match.groups()
            new = f"layers.{layer}.{_ROUTER_LAYER_TARGET[module]}.{kind}"
        else:
            new = _ROUTER_TOP_LEVEL[name]
        out["router." + new] = tensor.contiguous()
    return out


# ---------------------------------------------------------------------------
# The whole import


def import_authors_checkpoint(
    llama_dir: str | Path,
    mask_file: str | Path | None,
    out_dir: str | Path,
    overrides: RouterOverrides = RouterOverrides(),
) -> Path:
    """Convert (their dense Llama + cluster_predictor + mask.pt) into our format.

    ``mask_file`` defaults to ``llama_dir/mask.pt``. Nothing is written
    until every input has been read and checked, and ``out_dir`` appears
    only once the whole checkpoint is written and valid.
    """
    llama_dir, out = Path(llama_dir), Path(out_dir)
    mask_file = Path(mask_file) if mask_file is not None else llama_dir / "mask.pt"
    config_file = llama_dir / "config.json"
    dense_config, weights = _read_dense_folder(llama_dir)
    predictor = {k[len(PREDICTOR) :]: v for k, v in weights.items() if k.startswith(PREDICTOR)}
    if not predictor:
        raise ReadMEConfigError(
            f"{llama_dir}: no {PREDICTOR}* weights, so the router is missing. Import the checkpoint saved "
            "after router training (train_red.py --train_predictor or --finetune), not the dense base model."
        )
    with config_errors_named(config_file):
        router = router_config_from_authors(dense_config, predictor, overrides)
    num_layers, inter = dense_config["num_hidden_layers"], dense_config["intermediate_size"]
    masks = load_mask_file(mask_file, num_layers, inter, num_experts=router["num_experts"])
    _log_router(router)

    out_weights, layout = _split_mlps(weights, masks, mask_file)
    for name, tensor in weights.items():
        if not name.startswith(PREDICTOR) and not _DENSE_MLP.match(name):
            out_weights[name] = tensor.contiguous()
    out_weights.update(rename_router_weights(predictor))
    backbone = {k: v for k, v in dense_config.items() if k not in PREDICTOR_CONFIG_FIELDS}
    with config_errors_named(config_file):
        config = readme_config_from_dense(backbone, **layout, router=router)

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        save_file(out_weights, folder / "model.safetensors", metadata={"format": "pt"})
        for name in _TOKENIZER_FILES:
            if (llama_dir / name).is_file():
                shutil.copyfile(llama_dir / name, folder / name)
        validate_checkpoint(folder)

    return write_folder_atomically(out, write)


def _read_dense_folder(llama_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = llama_dir / "config.json"
    if not config_file.is_file():
        raise ReadMEConfigError(f"{llama_dir}: config.json is missing; pass the folder the authors' code saved.")
    fix = "Pass the folder the authors' code saved, with its config.json."
    config = read_config_json(config_file, fix)
    for field in ("num_hidden_layers", "intermediate_size"):
        if not isinstance(config.get(field), int) or isinstance(config[field], bool) or config[field] < 1:
            raise CheckpointFileError(
                f"{config_file}: {field} is {config.get(field)!r}; a Llama config.json states it as an integer >= 1. "
                f"{fix}"
            )
    return config, read_checkpoint_weights(llama_dir)


def _log_router(router: dict) -> None:
    logger.info(
        "authors' router: %d layer(s), %d heads x %d, width %d, %d experts, q.k/%g, RoPE theta %g, eps %g",
        router["num_hidden_layers"],
        router["num_attention_heads"],
        router["head_dim"],
        router["hidden_size"],
        router["num_experts"],
        1.0 / router["attention_scale"],
        router["rope_theta"],
        router["rms_norm_eps"],
    )


def _split_mlps(
    weights: dict[str, torch.Tensor], masks: list[tuple[torch.Tensor, torch.Tensor]], mask_file: Path
) -> tuple[dict[str, torch.Tensor], dict]:
    """Every layer's dense MLP in our layout, and the config fields that
    describe it. Layers may keep different numbers of shared and expert
    channels; the format has one size for each, so smaller layers are
    zero-padded (exact). Their MLP multiplies by ``residual + mask_e``, so an
    expert's channels are its whole mask (``additive``)."""
    shared_size = max(int(residual.sum()) for residual, _ in masks)
    expert_size = max(int(experts.sum(dim=1).max()) for _, experts in masks)
    out, sizes = {}, []
    for layer, (residual, experts) in enumerate(tqdm(masks, desc="splitting MLPs", unit="layer")):
        overlap = int((experts & residual).sum())
        if overlap:
            logger.warning(
                "%s: layer %d: expert masks overlap the residual mask at %d channel(s); the authors' MLP "
                "multiplies by residual + mask, so those channels count twice and are kept in both parts.",
                mask_file,
                layer,
                overlap,
            )
        prefix = f"model.layers.{layer}.mlp."
        split = split_dense_mlp(
            *(weights[f"{prefix}{proj}.weight"] for proj in ("gate_proj", "up_proj", "down_proj")),
            residual,
            experts,
            expert_intermediate_size=expert_size,
            shared_intermediate_size=shared_size,
            additive=True,
        )
        out.update({name: tensor.contiguous() for name, tensor in split.weights(prefix).items()})
        sizes.append(split.sizes)
    num_experts = masks[0][1].shape[0]
    return out, dict(
        num_experts=num_experts,
        shared_intermediate_size=shared_size,
        expert_intermediate_size=expert_size,
        expert_intermediate_sizes=[max(layer_sizes[e] for layer_sizes in sizes) for e in range(num_experts)],
    )
