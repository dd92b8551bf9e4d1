# SPDX-License-Identifier: Apache-2.0
"""The step-cost model of benchmarks/results: `vllm-readme calibrate` on the
default model, and a plot of what it measured.

    python benchmarks/calibrate_cost_model.py    # writes benchmarks/results/cost_model{.json,_samples.json,.png}

The plot: measured step time against tokens, coloured by distinct experts,
with the fitted planes for the fewest and the most experts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from vllm_readme.scheduler.calibrate import CONCURRENCY, calibrate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default=None, help="serving dtype (default: the machine's native one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cost_model.json")
    args = parser.parse_args()
    fit, steps = calibrate(args.readme, args.out, tuple(args.concurrency), args.new_tokens, args.dtype)
    plot(steps, fit, args.out.with_suffix(".png"))


def plot(steps, fit, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    tokens = [s.tokens for s in steps]
    points = ax.scatter(tokens, [s.ms for s in steps], c=[s.experts for s in steps], cmap="viridis", s=10)
    fig.colorbar(points, label="distinct experts in the step")
    top = max(tokens)
    experts = sorted({s.experts for s in steps})
    for e in (experts[0], experts[-1]):
        ax.plot([1, top], [fit.step_ms(1, e), fit.step_ms(top, e)], ls="--", label=f"fit, {e} experts")
    ax.set(xlabel="tokens in the step (decode)", ylabel="step time (ms)", title="Read-ME step cost on this machine")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
