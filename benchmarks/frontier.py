# SPDX-License-Identifier: Apache-2.0
"""The refactoring frontier: quality, speed and memory of Read-ME builds of
one dense model over a grid of options, to choose the default from.

Axes (``--axis NAME=VALUE,VALUE,...``, any RefactorOptions field; defaults: the
number of experts 4/8/16, the active fraction 0.5/0.625/0.75, and the expert
cut overlapping/disjoint). ``--set NAME=V`` fixes an option for every point
(e.g. ``--set router_persistence=0.5`` or ``--set tune_objective=distill``).
Every point is a `vllm-readme refactor` build with the same reduced tuning
budget (``--tune-tokens``), so points compare like for like; activation
statistics are computed once and shared (``stats_cache``). Per point:

* perplexity in-domain (held-out documents) and out-of-domain (Brown prose
  no stage sees) for Read-ME, the dense model and a pruned dense model of the
  same active size;
* total parameters and bytes against the dense model;
* decode tok/s against stock vLLM's dense model at batch 1, 8 and 32
  (benchmarks/decode.py, engines taking turns, the machine's native dtype);
* route persistence (P[route_t == route_t-1]) and expert load balance;
* chat check: repeated 4-grams against the dense model's, token F1.

The run is resumable: finished points (their ``point.json``) are kept, an
interrupted build resumes its stages. Results: benchmarks/results/frontier.json
and frontier.png.

    python benchmarks/frontier.py                       # the default grid (one full build per point)
    python benchmarks/frontier.py --axis keep=0.5 --axis num_experts=8 --axis expert_cut=disjoint,overlapping
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_TUNE_TOKENS = 32768  # every point's budget unless varied (--tune-tokens, or an axis)
DEFAULT_AXES = {"num_experts": [4, 8, 16], "keep": [0.5, 0.625, 0.75], "expert_cut": ["overlapping", "disjoint"]}


def parse_value(field: dataclasses.Field, text: str):
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if isinstance(default, list):  # e.g. --set calib=python-docs+brown
        return text.split("+")
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def point_name(values: dict) -> str:
    return "_".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in values.items())


@functools.cache  # the dense model's, once per run rather than once per row
def count_parameters(model_dir: Path) -> tuple[int, int]:
    from safetensors import safe_open

    params = nbytes = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                n = 1
                for d in tensor.get_shape():
                    n *= d
                params += n
                nbytes += n * {"F32": 4, "BF16": 2, "F16": 2}.get(tensor.get_dtype(), 4)
    return params, nbytes


def measure_decode(readme: Path, dense: Path, out: Path, batches: list[int], rounds: int) -> dict:
    if not out.is_file():
        cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--readme", str(readme), "--dense", str(dense)]
        cmd += ["--batches", *map(str, batches), "--rounds", str(rounds), "--no-fused-moe-baseline", "--out", str(out)]
        subprocess.run(cmd, check=True)
    return read_decode(out)


def read_decode(out: Path) -> dict:
    """A point's decode.json as a row holds it: the best ratio per batch."""
    data = json.loads(out.read_text())
    (dtype, per_batch), *_ = data["speedup_readme_over_dense"].items()
    return {"dtype": dtype, **{f"batch {b}": v["best"] for b, v in per_batch.items()}}


def run_point(values: dict, fixed: dict, args, dense: Path) -> dict:
    from vllm_readme.refactor.pipeline import RefactorOptions, refactor

    folder = args.root / point_name(values | {k: v for k, v in fixed.items() if k != "dense"})
    done = folder / "point.json"
    if done.is_file():
        return json.loads(done.read_text())
    # The budget is --tune-tokens unless an --axis or --set varies it (then
    # it is part of the point's name, like any other option).
    options = RefactorOptions(
        out=folder / "model", stats_cache=args.root / "stats", **({"tune_tokens": args.tune_tokens} | fixed | values)
    )
    print(f"[frontier] building {point_name(values)}", flush=True)
    report = refactor(options)
    if args.skip_decode:  # e.g. points that differ only in training options: same shapes, same speed
        decode = {"skipped": "--skip-decode"}
    else:
        decode = measure_decode(folder / "model", dense, folder / "decode.json", args.batches, args.rounds)
    row = point_row(values | fixed, folder, report, dense, decode)
    done.write_text(json.dumps(row, indent=1, default=str))
    return row


def point_row(options: dict, folder: Path, report: dict, dense: Path, decode: dict) -> dict:
    """One point of frontier.json from its build's report (refactor.json)."""
    params, nbytes = count_parameters(folder / "model")
    dense_params, _ = count_parameters(dense)
    ppl, ood, chat, routing = report["perplexity"], report.get("out_of_domain"), report.get("chat"), report["routing"]
    return {
        "options": options,
        "perplexity_in_domain": {
            "Read-ME": ppl.get("Read-ME (tuned)", ppl.get("Read-ME")),
            "dense": ppl["dense"],
            "pruned dense": ppl["pruned dense (same active size)"],
        },
        "perplexity_out_of_domain": ood["perplexity"] if ood else None,
        "ood_readme_over_dense": ood["Read-ME / dense"] if ood else None,
        "ood_readme_over_pruned": ood["Read-ME / pruned dense"] if ood else None,
        "parameters": params,
        "bytes": nbytes,
        "parameters_over_dense": params / dense_params,
        "route_persistence": routing["same_expert_as_previous_token"],
        "route_persistence_out_of_domain": ood["routing"]["same_expert_as_previous_token"] if ood else None,
        "load_max_over_mean": routing["load_max_over_mean"],
        "load_max_over_mean_out_of_domain": ood["routing"]["load_max_over_mean"] if ood else None,
        "chat_repetition_over_dense": (chat["repetition_readme"] / max(chat["repetition_dense"], 1e-9))
        if chat
        else None,
        "chat_token_f1_vs_dense": chat["token_f1_vs_dense"] if chat else None,
        # A report without a count checked 16 questions; the first 16 of 48 compare with such rows.
        "chat_prompts": chat.get("prompts", 16) if chat else None,
        "chat_repetition_over_dense_first16": (
            chat["repetition_readme_first16"] / max(chat["repetition_dense_first16"], 1e-9)
        )
        if chat and "repetition_readme_first16" in chat
        else None,
        "chat_answer_tokens_over_dense": chat["answer_tokens_readme"] / max(chat["answer_tokens_dense"], 1e-9)
        if chat and "answer_tokens_readme" in chat
        else None,
        "machine": report.get("precision", {}).get("machine"),
        "tuning_curve_in_domain": report.get("tuning_curve"),
        "timings_s": report.get("timings_s"),
        "decode_speedup_over_dense": decode,
    }


def refresh(rows: list[dict], root: Path, dense: Path) -> list[dict]:
    """Every row re-derived from its point's folder (refactor.json, and
    decode.json where the point measured decode): no build, no benchmark."""
    out = []
    for row in rows:
        options = row["options"]
        folder = root / point_name({k: v for k, v in options.items() if k != "dense"})
        report = folder / "model" / "refactor.json"
        if not report.is_file():
            print(f"[frontier] --refresh: {folder.name}: no refactor.json, row kept as it was", flush=True)
            out.append(row)
            continue
        row_dense = Path(options.get("dense", dense))  # a point built against another --dense keeps it
        decode = row["decode_speedup_over_dense"]
        if (folder / "decode.json").is_file():
            decode = read_decode(folder / "decode.json")
        fresh = point_row(options, folder, json.loads(report.read_text()), row_dense, decode)
        (folder / "point.json").write_text(json.dumps(fresh, indent=1, default=str))
        out.append(fresh)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axis", action="append", default=[], help="NAME=VALUE,VALUE,...: an axis of the grid")
    parser.add_argument("--set", action="append", default=[], help="NAME=V: an option fixed for every point")
    parser.add_argument(
        "--tune-tokens", type=int, default=DEFAULT_TUNE_TOKENS, help="the same reduced tuning budget per point"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--skip-decode",
        action="store_true",
        help="no decode benchmark (for points whose shapes, hence speed, equal a measured point's)",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="re-derive every point of --out from its folder (after a change to what a point reports); builds nothing",
    )
    parser.add_argument(
        "--dense", type=Path, help="dense HF folder to refactor and compare with (default: SmolLM2-135M exported)"
    )
    parser.add_argument("--root", type=Path, default=ROOT / "models" / "frontier")
    parser.add_argument("--out", type=Path, default=RESULTS / "frontier.json")
    args = parser.parse_args()

    from vllm_readme.refactor.pipeline import RefactorOptions, export_dense

    fields = {f.name: f for f in dataclasses.fields(RefactorOptions)}
    axes = {}
    for text in args.axis:
        name, _, values = text.partition("=")
        if name not in fields:
            raise SystemExit(f"--axis {name}: not a refactor option; options: {sorted(fields)}")
        axes[name] = [parse_value(fields[name], v) for v in values.split(",")]
    axes = axes or DEFAULT_AXES
    # A budget other than the default is an option of every point (in its
    # name and its row), as if given with --set tune_tokens=N.
    fixed = {"tune_tokens": args.tune_tokens} if args.tune_tokens != DEFAULT_TUNE_TOKENS else {}
    for text in args.set:
        name, _, value = text.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {name}: not a refactor option; options: {sorted(fields)}")
        fixed[name] = parse_value(fields[name], value)
    dense = args.dense or ROOT / "models" / "smollm2-dense"
    if args.dense is not None:
        fixed["dense"] = args.dense
    elif not (dense / "config.json").is_file():
        export_dense(None, dense)
    # Points accumulate across runs (each with its own axes and fixed
    # options): a point is replaced only by a point with the same options.
    if args.refresh:
        rows = refresh(json.loads(args.out.read_text())["points"], args.root, dense)
        publish(rows, args.out)
        print(f"[frontier] refreshed {len(rows)} points in {args.out}")
        return
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    for i, values in enumerate(points, 1):
        print(f"[frontier] point {i}/{len(points)}: {point_name(values)}", flush=True)
        row = run_point(values, fixed, args, dense)
        key = json.dumps(row["options"], sort_keys=True, default=str)
        # Re-read: another run (or --refresh) may have written since this one started.
        rows = json.loads(args.out.read_text())["points"] if args.out.is_file() else []
        rows = [r for r in rows if json.dumps(r["options"], sort_keys=True, default=str) != key] + [row]
        publish(rows, args.out)
    print(f"[frontier] wrote {args.out}, {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


def publish(rows: list[dict], out: Path) -> None:
    """frontier.json, its plot, and its table against the targets."""
    write_atomically(out, json.dumps({"points": rows}, indent=1, default=str))
    plot(rows, out.with_suffix(".png"))
    write_atomically(out.with_suffix(".md"), targets_table(rows))


def short_label(options: dict, common: dict) -> str:
    """``disjoint 4 x 0.75`` plus the options where a point differs from
    what most points use (e.g. ``tune_tokens=131072``)."""
    label = f"{options.get('expert_cut', 'overlapping')} {options.get('num_experts', '?')} x {options.get('keep', '?')}"
    extras = [
        f"{k}={v}"
        for k, v in options.items()
        if k not in ("expert_cut", "num_experts", "keep", "calib", "dense") and common.get(k) != v
    ]
    return label + (" (" + ", ".join(extras) + ")" if extras else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    common = common_options(rows)
    fig, grid = plt.subplots(2, 2, figsize=(16, 13))
    budget_panel(rows, grid[1, 0], common)
    chat_panel(rows, grid[1, 1], common)
    axes = grid[0]
    for row in rows:
        label = short_label(row["options"], common)
        speed = row["decode_speedup_over_dense"]
        quality = (
            row["ood_readme_over_dense"]
            or row["perplexity_in_domain"]["Read-ME"] / row["perplexity_in_domain"]["dense"]
        )
        size = 40 * row["parameters_over_dense"]
        for ax, batch in zip(axes, ("batch 1", "batch 32"), strict=True):
            if isinstance(speed.get(batch), float):
                ax.scatter(speed[batch], quality, s=size, alpha=0.7)
                ax.annotate(label, (speed[batch], quality), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for ax, batch in zip(axes, ("batch 1", "batch 32"), strict=True):
        if not any(isinstance(row["decode_speedup_over_dense"].get(batch), float) for row in rows):
            ax.text(0.5, 0.5, f"no decode measured at {batch} (--skip-decode)", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        if batch == "batch 1":
            ax.axvline(1.15, color="tab:red", ls=":", label="target: 1.15x dense at batch 1")
            speed_ceilings(ax, sorted({row["options"].get("keep", common.get("keep")) for row in rows}))
        ax.axhline(1.25, color="gray", ls=":", label="target: perplexity 1.25x dense")
        ax.axvline(1.0, color="gray", ls="--", label="dense speed")
        ax.set(
            xlabel=f"decode tok/s over dense, {batch}",
            ylabel="out-of-domain perplexity over dense",
            title=f"frontier ({batch}); marker area ~ parameters",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def speed_ceilings(ax, keeps: list[float]) -> None:
    """The batch-1 speed-up a perfect MoE kernel allows at each active
    fraction, 1 / (1 - share x (1 - keep)), from the MLP's measured share of
    a dense decode step (results/decode_profile.json, benchmarks/decode_profile.py)."""
    profile = RESULTS / "decode_profile.json"
    if not profile.is_file():
        return
    share = json.loads(profile.read_text())["ceilings"]["1"]["dense_mlp_share"]
    for keep in keeps:
        ceiling = 1 / (1 - share * (1 - keep))
        ax.axvline(ceiling, color="tab:green", ls="-.", lw=0.8)
        ax.annotate(
            f"ceiling at keep {keep:g}: {ceiling:.2f}x",
            (ceiling, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            ha="right",
            va="top",
            color="tab:green",
        )


# The per-point targets a default must meet (the build-time target is the
# default's, at the full budget, not a grid point's): name, the row's
# figure, whether it meets the target. A figure the point did not measure
# is None.
def _decode(row: dict, batch: str) -> float | None:
    value = row["decode_speedup_over_dense"].get(batch)
    return value if isinstance(value, float) else None


def _persistence(row: dict) -> float | None:
    values = [v for v in (row.get("route_persistence"), row.get("route_persistence_out_of_domain")) if v is not None]
    return min(values) if values else None


TARGETS = (
    ("OOD ppl <= 1.25x dense", lambda r: r.get("ood_readme_over_dense"), lambda v: v <= 1.25, "{:.2f}x"),
    ("OOD ppl < pruned", lambda r: r.get("ood_readme_over_pruned"), lambda v: v < 1.0, "{:.2f}x"),
    ("decode b1 >= 1.15x", lambda r: _decode(r, "batch 1"), lambda v: v >= 1.15, "{:.3f}x"),
    ("decode b8 >= 1.0x", lambda r: _decode(r, "batch 8"), lambda v: v >= 1.0, "{:.3f}x"),
    ("decode b32 >= 1.0x", lambda r: _decode(r, "batch 32"), lambda v: v >= 1.0, "{:.3f}x"),
    ("params <= 1.5x", lambda r: r.get("parameters_over_dense"), lambda v: v <= 1.5, "{:.2f}x"),
    ("persistence >= 0.5 (in and out)", _persistence, lambda v: v >= 0.5, "{:.3f}"),
    ("chat repetition <= 1.5x", lambda r: r.get("chat_repetition_over_dense"), lambda v: v <= 1.5, "{:.1f}x"),
)


def targets_table(rows: list[dict]) -> str:
    """Markdown: every point against every per-point target, best out-of-domain
    quality first (the quality target is the one furthest from reach), with
    how many of its measured targets each point meets. The evidence that the
    targets exclude each other, or that one point meets them all."""
    common = common_options(rows)
    lines = [
        "# The frontier against the per-point targets (TARGETS in benchmarks/frontier.py)",
        "",
        "Generated by `benchmarks/frontier.py` from frontier.json (do not edit). "
        "`yes` / `no` with the point's figure; `-` not measured (`--skip-decode` points share "
        "a measured point's shapes). Options common to most points: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(common.items()) if k != "dense")
        + ".",
        "",
        "| point | met | " + " | ".join(name for name, *_ in TARGETS) + " |",
        "|---|---|" + "---|" * len(TARGETS),
    ]
    table = []
    for row in rows:
        cells, met, measured = [], 0, 0
        for _name, figure, meets, fmt in TARGETS:
            value = figure(row)
            if value is None:
                cells.append("-")
                continue
            measured += 1
            ok = meets(value)
            met += ok
            cells.append(f"{'**yes**' if ok else 'no'} {fmt.format(value)}")
        quality = row.get("ood_readme_over_dense") or float("inf")
        table.append((quality, short_label(row["options"], common), met, measured, cells))
    for _, label, met, measured, cells in sorted(table, key=lambda t: t[:2]):
        lines.append(f"| {label} | {met} of {measured} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def common_options(rows: list[dict]) -> dict:
    """An option's value on at least half the points: labels name only what differs from it."""
    counts = collections.Counter((k, json.dumps(v, default=str)) for row in rows for k, v in row["options"].items())
    common = {}
    for (k, v), n in counts.most_common():
        if 2 * n >= len(rows):
            common.setdefault(k, json.loads(v))
    return common


def write_atomically(path: Path, text: str) -> None:
    """Readers (a concurrent run re-reading the results) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f"{path.suffix}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def chat_panel(rows: list[dict], ax, common: dict) -> None:
    """Chat repetition against out-of-domain perplexity, both over dense: the
    instruct behaviour beside quality, for every point with a chat check. A
    point checked on 48 questions rather than 16 is marked, with its
    answers' mean length over dense's (short answers repeat less)."""
    for row in rows:
        repetition, quality = row.get("chat_repetition_over_dense"), row.get("ood_readme_over_dense")
        if repetition is None or quality is None:
            continue
        label = short_label(row["options"], common)
        if row.get("chat_prompts", 16) > 16:
            marker = "s"
            if row.get("chat_answer_tokens_over_dense") is not None:
                label += f"; answers {row['chat_answer_tokens_over_dense']:.2f}x dense length"
        else:
            marker = "o"
        ax.scatter(repetition, quality, marker=marker, s=40, alpha=0.7)
        ax.annotate(label, (repetition, quality), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axvline(1.5, color="tab:red", ls=":", label="target: repetition 1.5x dense")
    ax.axhline(1.25, color="gray", ls=":", label="target: perplexity 1.25x dense")
    ax.scatter([], [], marker="o", color="gray", label="16-question check")
    ax.scatter([], [], marker="s", color="gray", label="48-question check")
    ax.set(
        xlabel="chat repetition (repeated 4-grams) over dense",
        ylabel="out-of-domain perplexity over dense",
        title="the instruct behaviour: chat repetition",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def budget_panel(rows: list[dict], ax, common: dict) -> None:
    """Out-of-domain perplexity against the tuning budget, for points that
    differ only in it (an --axis tune_tokens run and its 32k point)."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        options = dict(row["options"])
        tokens = int(options.pop("tune_tokens", DEFAULT_TUNE_TOKENS))
        if row["ood_readme_over_dense"] is not None:
            key = json.dumps(options, sort_keys=True, default=str)
            groups.setdefault(key, []).append((tokens, row["ood_readme_over_dense"]))
    budgets = set()
    for key, points in groups.items():
        if len({tokens for tokens, _ in points}) < 2:
            continue
        points.sort()
        budgets.update(tokens for tokens, _ in points)
        label = short_label(json.loads(key), common)
        ax.plot([t / 1024 for t, _ in points], [q for _, q in points], marker="o", label=label)
        for tokens, quality in points:
            ax.annotate(
                f"{quality:.3f}x", (tokens / 1024, quality), fontsize=7, xytext=(4, 2), textcoords="offset points"
            )
    if not budgets:
        ax.text(0.5, 0.5, "no points that differ only in the tuning budget", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ax.axhline(1.25, color="gray", ls=":", label="perplexity 1.25x dense")
    ax.set(
        xlabel="expert-tuning tokens (k)",
        ylabel="out-of-domain perplexity over dense",
        title="quality against the tuning budget",
        xscale="log",
    )
    ax.minorticks_off()
    ax.set_xticks([t / 1024 for t in sorted(budgets)], [f"{t // 1024}k" for t in sorted(budgets)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
