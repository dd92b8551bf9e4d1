# SPDX-License-Identifier: Apache-2.0
"""Refactor SmolLM2-135M-Instruct with the default options (cached in
models/smollm2-readme) and publish its report under benchmarks/results/.

    python benchmarks/refactor_smollm2.py [--out models/smollm2-readme] [--dtype auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vllm_readme.refactor.pipeline import RefactorOptions, refactor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="as `vllm-readme refactor --dtype`"
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="as `vllm-readme refactor --device`"
    )
    parser.add_argument(
        "--name", default="refactor_smollm2", help="results file name under benchmarks/results/ (default %(default)s)"
    )
    args = parser.parse_args()
    results = refactor(RefactorOptions(out=args.out, dtype=args.dtype, device=args.device))
    target = ROOT / "benchmarks" / "results"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.out / "refactor.json", target / f"{args.name}.json")
    shutil.copy(args.out / "refactor.png", target / f"{args.name}.png")
    print(json.dumps({"perplexity": results["perplexity"], "timings_s": results["timings_s"]}, indent=2))


if __name__ == "__main__":
    main()
