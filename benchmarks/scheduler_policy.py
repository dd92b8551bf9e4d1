"""How long a scheduling policy takes to choose one step, at 32, 256 and
1024 runnable requests (vllm_readme/scheduler/policy.py, plain Python).

Candidates are decodes (one token) plus a few prefill chunks, with routes
drawn from a skewed expert popularity over 8 experts; every policy is timed
on the same candidates, median of repeats. Writes
benchmarks/results/scheduler_policy.json.

    python benchmarks/scheduler_policy.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def candidates(n: int, seed: int, experts: int = 8):
    from vllm_readme.scheduler.policy import Candidate

    rng = random.Random(seed)
    weights = [8, 6, 4, 3, 2, 2, 1, 1][:experts]
    out = []
    for i in range(n):
        if i % 16 == 15:  # a prefill chunk now and then
            routes = frozenset(rng.choices(range(experts), weights, k=64))
            out.append(Candidate(f"r{i}", 64, routes, i, is_prefill=True, held_back=rng.randint(0, 3)))
        else:
            route = frozenset(rng.choices(range(experts), weights))
            out.append(Candidate(f"r{i}", 1, route, i, held_back=rng.randint(0, 3)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scheduler_policy.json")
    args = parser.parse_args()

    from vllm_readme.precision import machine_description
    from vllm_readme.scheduler.policy import POLICIES, choose

    results = {"machine": machine_description(), "ms_per_decision": {}}
    for n in args.sizes:
        cands = candidates(n, seed=n)
        row = {}
        for policy in POLICIES:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                choose(policy, cands, max_tokens=8192, max_requests=n, max_held_back=4, batch_tokens=n // 2)
                times.append(1000 * (time.perf_counter() - start))
            row[policy] = statistics.median(times)
        results["ms_per_decision"][n] = row
        print(f"[scheduler] {n:5d} runnable: " + ", ".join(f"{p} {ms:.3f} ms" for p, ms in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"[scheduler] wrote {args.out}")


if __name__ == "__main__":
    main()
