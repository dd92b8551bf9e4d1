# SPDX-License-Identifier: Apache-2.0
"""The expert cache itself (vllm_readme/experts/cache.py) driven by real
routes, with experts of a chosen size: what each pool size and policy costs
in throughput, against all-resident and against the bound.

No engine: each decode step takes the next token of ``--concurrency``
streams of recorded routes (``benchmarks/routes.py --save-trace``, real
routes of the refactored SmolLM2 on text it never saw) and runs, per layer,
a dense part (attention projections and the shared MLP, as one matmul of
their size) and the routed experts through the pool, one grouped matmul per
expert. The cache is the product's: same pool, policies, prefetch and
stores as in the engine. This is how the GPU path (pinned host memory, a
copy stream, events) is measured on a machine without a CUDA build of
vLLM, and how experts far larger than SmolLM2's are tried on any machine.

The bound beside each figure: a step cannot take less than the all-resident
step, nor less than the loads it must do under Belady with the exact future
(page level, counted offline on the same routes) times the measured time of
one page load. Best throughput = tokens / max(the two).

    python benchmarks/expert_cache_replay.py --device cuda --preset 7b
    python benchmarks/expert_cache_replay.py --device cpu --preset smollm2

Writes benchmarks/results/expert_cache_replay_<device>.json (and .png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# hidden, expert channels, shared channels, layers, experts
PRESETS = {
    # SmolLM2 refactored into 8 disjoint experts of 54 channels at keep 0.75
    # (`vllm-readme refactor --num-experts 8 --keep 0.75`; not the default build).
    "smollm2": (576, 54, 1098, 30, 8),
    # Read-ME's own scale: Llama-2-7B's shapes, 8 experts of a quarter of its MLP.
    "7b": (4096, 2752, 2752, 32, 8),
}


def exact_belady_loads(steps: list[list[int]], layers: int, experts: int, pages: int, skip: int) -> int:
    """Page loads a pool of ``pages`` must do on these steps with the whole
    future known (Belady at page level, each layer's pages pinned while it
    runs), counted after the first ``skip`` (warm-up) steps."""
    from simulation import ExpertPoolModel  # benchmarks/ is on sys.path when run as a script

    from vllm_readme.experts.eviction import NEVER, make_policy

    accesses = []  # (clock, pages)
    for s, step_experts in enumerate(steps):
        for layer in range(layers):
            accesses.append((s * layers + layer, [(layer, e) for e in sorted(set(step_experts))]))
    uses: dict = {}
    for clock, needed in accesses:
        for page in needed:
            uses.setdefault(page, []).append(clock)

    def next_use(page, clock):
        import bisect

        times = uses.get(page, [])
        k = bisect.bisect_right(times, clock)
        return times[k] if k < len(times) else NEVER

    pool = ExpertPoolModel(pages, make_policy("belady", next_use))
    # The cache's start: the first experts of every layer resident (expert-major).
    pool.resident = {(layer, e) for e in range(experts) for layer in range(layers)}
    pool.resident = set(sorted(pool.resident, key=lambda page: (page[1], page[0]))[:pages])
    loads = [pool.access(needed, clock) for clock, needed in accesses]
    return sum(loads[skip * layers :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: 7b on cuda, smollm2 on cpu")
    parser.add_argument("--trace", type=Path, default=RESULTS / "routes_trace.json")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--pools", nargs="+", default=["100%", "75%", "50%", "25%"])
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per run (after 4 warm-up steps)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from vllm_readme.experts.cache import ExpertCache
    from vllm_readme.experts.loader import memory_store
    from vllm_readme.options import ExpertCacheOptions
    from vllm_readme.precision import machine_description

    preset = args.preset or ("7b" if args.device == "cuda" else "smollm2")
    hidden, channels, shared, layers, experts = PRESETS[preset]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    trace = json.loads(args.trace.read_text())
    blocks = trace["blocks"]
    gen = torch.Generator(device=device).manual_seed(0)
    scale = hidden**-0.5
    w13 = [torch.randn(experts, 2 * channels, hidden, device=device, dtype=dtype, generator=gen) * scale]
    for _ in range(layers - 1):
        w13.append(torch.randn_like(w13[0]) * scale)
    w2 = [torch.randn(experts, hidden, channels, device=device, dtype=dtype, generator=gen) * scale for _ in w13]
    dense = [torch.randn(hidden, 4 * hidden + 3 * shared, device=device, dtype=dtype, generator=gen) * scale]
    dense = dense * layers  # one weight, read once per layer: its cost, not its values, matters
    page_bytes = w13[0][0].nbytes + w2[0][0].nbytes
    store = memory_store(w13, w2)  # one host copy (pinned on a GPU) for every cache below
    total_pages = layers * experts
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    results = {
        "machine": machine_description(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "preset": preset,
        "shapes": {
            "hidden": hidden,
            "expert_channels": channels,
            "shared": shared,
            "layers": layers,
            "experts": experts,
        },
        "dtype": str(dtype),
        "page_mib": page_bytes / 2**20,
        "trace": {"model": trace.get("model"), "text": trace.get("text"), "tokens": sum(map(len, blocks))},
        "runs": [],
    }
    print(f"[replay] {preset} on {results['device']}: {total_pages} pages of {page_bytes / 2**20:.2f} MiB")

    def step_routes(concurrency: int, count: int, offset: int) -> list[list[int]]:
        """Step s: token (offset + s) of each of ``concurrency`` streams."""
        streams = [blocks[i % len(blocks)] for i in range(concurrency)]
        return [[stream[(offset + s) % len(stream)] for stream in streams] for s in range(count)]

    def run_layer(h, layer, expert_ids_host, w13_pool, w2_pool, slot_of):
        h = h + (h @ dense[layer])[:, :hidden]
        out = torch.zeros_like(h)
        for e in sorted(set(expert_ids_host)):
            rows = torch.tensor([i for i, x in enumerate(expert_ids_host) if x == e], device=device)
            slot = slot_of(layer, e)
            gate, up = (h[rows] @ w13_pool[slot].T).chunk(2, dim=-1)
            out[rows] = (F.silu(gate) * up) @ w2_pool[slot].T
        return h + out

    def timed_run(concurrency, pool_text, eviction, prefetch):
        routes = step_routes(concurrency, 4 + args.steps, offset=70)
        h = torch.randn(concurrency, hidden, device=device, dtype=dtype, generator=gen)
        cache = None
        if pool_text == "100%":

            def slot_of(layer, e):
                return e

        else:
            pages = ExpertCacheOptions(expert_pool=pool_text).pool_size().pages(layers, experts, page_bytes)
            pages = max(pages, experts)
            cache = ExpertCache(
                w13_layers=w13,
                w2_layers=w2,
                slot_table=torch.zeros((layers, experts), dtype=torch.int32, device=device),
                pages=pages,
                options=ExpertCacheOptions(
                    expert_pool=str(pages), eviction=eviction, prefetch=prefetch, backing_store="memory"
                ),
                checkpoint=None,
                isa=args.device,
                log_every=0,
                store=store,
            )

            def slot_of(layer, e):
                return cache.pool.slot((layer, e))

        try:
            for s, experts_of_step in enumerate(routes):
                if s == 4:
                    sync()
                    started = time.perf_counter()
                    if cache is not None:
                        cache._end_step()  # noqa: SLF001 - the warm-up's counters end here
                        cache.total.clear()
                ids = torch.tensor(experts_of_step, device=device)
                for layer in range(layers):
                    if cache is None:
                        h = run_layer(h, layer, experts_of_step, w13[layer], w2[layer], slot_of)
                    else:
                        cache.layer_slots(layer, ids)
                        h = run_layer(h, layer, experts_of_step, cache.w13, cache.w2, slot_of)
                h = F.normalize(h, dim=-1)
            sync()
            elapsed = time.perf_counter() - started
            row = {
                "concurrency": concurrency,
                "pool": pool_text,
                "eviction": eviction,
                "prefetch": prefetch,
                "ms_per_step": 1000 * elapsed / args.steps,
                "tokens_per_s": concurrency * args.steps / elapsed,
            }
            if cache is not None:
                cache._end_step()  # noqa: SLF001
                stats = cache.total.summary()
                row |= {
                    "pages": cache.pool.capacity,
                    "hit_ratio": stats["hit_ratio"],
                    "loads_per_step": (stats["misses"] + stats["prefetched"]) / args.steps,
                    "prefetch_accuracy": stats["prefetch_accuracy"],
                    "page_load_ms_host": cache.page_load_ms,
                    "exact_belady_loads_per_step": exact_belady_loads(
                        routes, layers, experts, cache.pool.capacity, skip=4
                    )
                    / args.steps,
                }
            return row
        finally:
            if cache is not None:
                cache.close()

    # One page's copy into the pool, the bound's unit.
    host = torch.empty((2, *w13[0][0].shape), dtype=dtype, pin_memory=args.device == "cuda")
    target = torch.empty_like(w13[0][:2], device=device)
    for _ in range(3):
        target.copy_(host, non_blocking=True)
    sync()
    started = time.perf_counter()
    for _ in range(20):
        target.copy_(host, non_blocking=True)
    sync()
    page_ms = 1000 * (time.perf_counter() - started) / 20 / 2 * page_bytes / w13[0][0].nbytes
    results["page_load_ms"] = page_ms
    results["host_to_pool_gb_per_s"] = page_bytes / page_ms / 1e6
    print(f"[replay] one page into the pool: {page_ms:.3f} ms ({results['host_to_pool_gb_per_s']:.1f} GB/s)")

    for concurrency in args.concurrency:
        resident = None
        for pool_text in args.pools:
            variants = [("belady", True)] if pool_text == "100%" else [("belady", True), ("lru", False)]
            for eviction, prefetch in variants:
                row = timed_run(concurrency, pool_text, eviction, prefetch)
                if pool_text == "100%":
                    resident = row
                else:
                    bound_ms = max(resident["ms_per_step"], row["exact_belady_loads_per_step"] * page_ms)
                    row["bound_tokens_per_s"] = concurrency * 1000 / bound_ms
                    row["over_all_resident"] = row["tokens_per_s"] / resident["tokens_per_s"]
                    row["over_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
                results["runs"].append(row)
                print("[replay] " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))

    out = args.out or RESULTS / f"expert_cache_replay_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"[replay] wrote {out}")


if __name__ == "__main__":
    main()
