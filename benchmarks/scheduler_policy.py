# SPDX-License-Identifier: Apache-2.0
"""How long the expert-aware scheduler's own work takes per step, at 32,
256 and 1024 running requests.

* The decision (vllm_readme/scheduler/policy.py, plain Python): candidates
  are decodes (one token) plus a few prefill chunks, with routes drawn from
  a skewed expert popularity over 8 experts; every policy is timed on the
  same candidates.
* Routes ahead with ``route_source: "model"`` (scheduler/model_routes.py,
  the ModelRouteSource of scheduler/vllm_scheduler.py): the model's side
  publishing one route per request into the plan file, the scheduler's
  side reading it, matching slots to requests and noting the slots of the
  next step (block lists of real KVCacheBlock objects, as vLLM's KV
  manager keeps them, 16-token blocks, 256 tokens of context). What the router copy
  costs instead is measured by benchmarks/routes_ahead.py.

Median of repeats. Writes benchmarks/results/scheduler_policy.json.

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


def model_routes_step_ms(n: int, repeats: int) -> dict:
    """One step of route bookkeeping with the model's own routes, ms."""
    import struct
    import types

    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    from vllm_readme.experts.plan import PlanReader, PlanWriter
    from vllm_readme.scheduler.vllm_scheduler import ModelRouteSource

    block, context = 16, 256
    tables = {f"r{i}": [KVCacheBlock(i * 64 + b) for b in range(context // block + 1)] for i in range(n)}

    # What ModelRouteSource reads (vllm_internals.last_token_kv_slots): the
    # KV manager's block lists per request of each KV cache group.
    manager = types.SimpleNamespace(
        coordinator=types.SimpleNamespace(single_type_managers=[types.SimpleNamespace(req_to_blocks=tables)])
    )
    requests = {rid: types.SimpleNamespace(num_computed_tokens=context, request_id=rid) for rid in tables}
    scheduler = types.SimpleNamespace(kv_cache_manager=manager, requests=requests)
    config = types.SimpleNamespace(
        kv_cache_groups=[
            types.SimpleNamespace(
                layer_names=["model.layers.0.self_attn.attn"], kv_cache_spec=types.SimpleNamespace(block_size=block)
            )
        ]
    )
    writer = PlanWriter(num_experts=8)
    reader = PlanReader(num_experts=8)
    try:
        source = ModelRouteSource(config, num_experts=8)
        source.plan = writer
        for rid in tables:
            source.add(rid, [])
        ran = dict.fromkeys(tables, 1)
        last = context - 1  # the position of each request's newest token
        slots = [tables[rid][last // block].block_id * block + last % block for rid in tables]
        payload = struct.pack(f"<{n}q", *slots), struct.pack(f"<{n}i", *[last] * n), bytes(i % 8 for i in range(n))
        worker, scheduler_side = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            reader.publish_routes(*payload)
            mid = time.perf_counter()
            source.catch_up([])
            for rid in tables:
                source.experts(rid, context, 1, False)
            source.scheduled(scheduler, ran)
            end = time.perf_counter()
            worker.append(1000 * (mid - start))
            scheduler_side.append(1000 * (end - mid))
        assert source.book.matched >= n * (repeats - 1), "the benchmark's slots must match"
    finally:
        reader.close()
        writer.close()
    return {"model_side_ms": statistics.median(worker), "scheduler_side_ms": statistics.median(scheduler_side)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scheduler_policy.json")
    args = parser.parse_args()

    from vllm_readme.precision import machine_description
    from vllm_readme.scheduler.policy import POLICIES, choose

    results = {"machine": machine_description(), "ms_per_decision": {}, "model_routes_ms_per_step": {}}
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
        routes = model_routes_step_ms(n, args.repeats)
        results["model_routes_ms_per_step"][n] = routes
        print(
            f"[scheduler] {n:5d} running: routes ahead from the model {routes['scheduler_side_ms']:.3f} ms "
            f"(scheduler) + {routes['model_side_ms']:.3f} ms (model's publishing)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"[scheduler] wrote {args.out}")


if __name__ == "__main__":
    main()
