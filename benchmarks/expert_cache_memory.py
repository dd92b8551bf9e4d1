# SPDX-License-Identifier: Apache-2.0
"""Resident memory of a serving process with every expert resident, and with
the expert pool at a fraction of the pages, so that what a pool saves is
reported against all-resident.

Each configuration runs in its own fresh process: an in-process vLLM engine
(the model lives in the measuring process), a few greedy generations so the
pool has loaded pages, then the process's resident set from /proc
(VmRSS = RssAnon + RssFile + RssShmem), after handing freed heap memory back
to the OS in every configuration (glibc's malloc_trim), so that the
difference is the pool's alone. The page file of the `disk` store
is read with O_DIRECT, so it adds nothing to the page cache or RssFile.

    python benchmarks/expert_cache_memory.py --model models/smollm2-readme-v1 --pools all 50% 25%

The model should be one whose experts dominate its weights (e.g. a build
with `--expert-cut overlapping`); on the default (disjoint) build the
experts (4 x 64 channels a layer) are a small part of the weights and the
difference is lost in the noise of the whole process's memory. Writes
benchmarks/results/expert_cache_memory_large_experts.json (the default
--model is the large-expert build, models/smollm2-readme-v1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
model, pool, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
options = {} if pool == "all" else {"vllm_readme": {"expert_pool": pool, "log_every": 0}}
llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=128 << 20,
          max_num_seqs=8, additional_config=options, seed=0)
prompts = ["The history of the", "def fibonacci(n):", "In a small village", "The capital of France is"] * 2
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
# Every configuration hands freed memory back before measuring (the pool
# does so itself at start-up), so the difference is the pool's alone.
from vllm_readme.model_executor.readme import release_freed_memory
release_freed_memory()
status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
        status[key + "_mib"] = int(value.split()[0]) / 1024
cache = llm.apply_model(lambda m: None if getattr(m.model, "expert_cache", None) is None else
                        {"pages": m.model.expert_cache.pool.capacity,
                         "page_bytes": m.model.expert_cache.page_bytes,
                         "total_pages": m.model.expert_cache.num_layers * m.model.expert_cache.num_experts,
                         "hit_ratio": m.model.expert_cache.total.hit_ratio})[0]
print("RESULT " + json.dumps({"pool": pool, **status, "cache": cache}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-readme-v1")
    parser.add_argument("--pools", nargs="+", default=["all", "50%", "25%"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "expert_cache_memory_large_experts.json"
    )
    args = parser.parse_args()

    from vllm_readme.checkpoint.io import load_readme_config
    from vllm_readme.precision import machine_description, resolve_precision

    precision = resolve_precision(args.dtype)
    config = load_readme_config(args.model)
    expert_params = 3 * config.num_hidden_layers * config.num_experts * config.expert_intermediate_size
    expert_params *= config.hidden_size
    bytes_per = 2 if precision.vllm_dtype == "bfloat16" else 4
    results = {
        "machine": machine_description(),
        "model": str(args.model),
        "dtype": precision.vllm_dtype,
        "experts_mib": expert_params * bytes_per / 2**20,
        "runs": [],
    }
    print(f"[memory] {args.model}: experts {results['experts_mib']:.0f} MiB in {precision.vllm_dtype}")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    for pool in args.pools:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.model), pool, precision.vllm_dtype],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"[memory] pool {pool}: the engine failed:\n{done.stderr[-3000:]}")
        row = json.loads(lines[-1].removeprefix("RESULT "))
        results["runs"].append(row)
        print(
            f"[memory] pool {pool}: VmRSS {row['VmRSS_mib']:.0f} MiB (anon {row['RssAnon_mib']:.0f}, file "
            f"{row['RssFile_mib']:.0f}), peak {row['VmHWM_mib']:.0f} MiB; cache {row['cache']}"
        )
    base = results["runs"][0]["VmRSS_mib"]
    for row in results["runs"][1:]:
        row["saved_mib"] = base - row["VmRSS_mib"]
        cache = row["cache"]
        row["expected_saving_mib"] = (cache["total_pages"] - cache["pages"]) * cache["page_bytes"] / 2**20
    args.out.write_text(json.dumps(results, indent=1))
    print(f"[memory] wrote {args.out}")


if __name__ == "__main__":
    main()
