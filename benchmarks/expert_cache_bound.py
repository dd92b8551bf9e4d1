# SPDX-License-Identifier: Apache-2.0
"""The bound for the expert cache's serving figures: the best throughput any
eviction policy with any prefetch could reach at each pool size, given the
page loads that the routes force (docs/expert_cache.md, "The bound").

A server with every expert resident (benchmarks/serve.py's server and
client, its ``random`` workload: the same prompts, lengths and concurrency)
runs with the route log on (``VLLM_README_ROUTE_LOG``,
model_executor/metrics.py) and so records the experts of every engine step
as served. Per pool size, Belady with the exact future (page level, each
layer's pages pinned while it runs) counts the page loads no policy can
avoid on those steps. With one page's read time from the page file
(benchmarks/expert_store.py, its best round: the bound takes the disk at
its fastest) and the all-resident step time (of ``--serve-results``, the
serving run the bound sits beside, else of this run):

    bound step = max(all-resident step, forced loads per step x read time per page)
    bound tok/s = all-resident tok/s x all-resident step / bound step

(perfect prefetch: every load overlaps compute, and the loader costs the
model nothing). Writes benchmarks/results/expert_cache_bound<suffix>.json.

    python benchmarks/expert_cache_bound.py --model models/smollm2-readme-v1 \\
        --store benchmarks/results/expert_store_large_experts.json \\
        --serve-results benchmarks/results/serve_expert_cache_large_experts.json --suffix _large_experts
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from expert_cache_replay import exact_belady_loads  # noqa: E402
from serve import ALL_RESIDENT  # noqa: E402


def serve_and_record(model: Path, concurrency: list[int], seed: int, work: Path) -> dict[int, tuple[dict, list]]:
    """Serve ``model`` with every expert resident (benchmarks/serve.py's
    server and client, the ``random`` workload at each concurrency) with
    the route log on; per concurrency, the client's summary and each engine
    step's experts."""
    from serve import RANDOM_LENS, EngineSpec, Server, Workload, run_client

    from vllm_readme.precision import resolve_precision

    log = work / "routes.log"
    spec = EngineSpec(ALL_RESIDENT, model, [], env={"VLLM_README_ROUTE_LOG": str(log)})
    server = Server(spec, resolve_precision("auto").vllm_dtype, 2048, max(64, *concurrency), work, ("--enforce-eager",))
    out = {}
    try:
        server.wait_ready()
        for c in concurrency:
            log.write_text("")  # the server appends a line per step, from now on
            summary = run_client(server, Workload("random", c, None, max(8, 2 * c)), work, RANDOM_LENS, seed)
            steps = [[int(e) for e in line.split()] for line in log.read_text().splitlines() if line]
            out[c] = (summary, steps)
            print(
                f"[bound] c={c}: {summary['output_throughput']:.1f} tok/s all resident, {len(steps)} steps", flush=True
            )
    finally:
        server.stop()
    return out


def _resident(summary: dict) -> dict:
    """All resident: output tok/s and the mean engine step (the run's
    duration over its steps, from the server's /metrics)."""
    return {
        "tok_s": summary["output_throughput"],
        "engine_steps": summary["engine_steps"],
        "step_ms": 1000 * summary["duration"] / summary["engine_steps"],
    }


def on_demand_read_rates(serve: dict) -> dict[str, float]:
    """GB/s of each engine without prefetch in a serving run, per workload."""
    rates = {}
    for key, row in serve["runs"].items():
        for label, run in row.items():
            cache = run.get("expert_cache") if isinstance(run, dict) else None
            if cache and not cache["prefetched"] and cache["stall_seconds"] > 0:
                rates[f"{label}, {key}"] = cache["loaded_bytes"] / cache["stall_seconds"] / 1e9
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--store", type=Path, default=RESULTS / "expert_store.json", help="expert_store.py's results")
    parser.add_argument("--serve-results", type=Path, help="a serving run of the same model (all-resident step time)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--pools", nargs="+", default=["75%", "50%", "25%"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _large_experts")
    args = parser.parse_args()

    from vllm_readme.checkpoint.io import load_readme_config
    from vllm_readme.precision import machine_description

    config = load_readme_config(args.model)
    layers, experts = config.num_hidden_layers, config.num_experts
    store = json.loads(args.store.read_text())
    page_bytes = store["page_bytes_in_pool"]
    serve = json.loads(args.serve_results.read_text()) if args.serve_results else None
    # The disk at its fastest: the store benchmark's best round, or what the
    # serving run's on-demand engines read at (bytes over the time layers
    # waited for their synchronous reads), whichever is faster: a shared
    # machine's disk rate moves between runs, and the bound takes the best.
    bandwidths = {"expert_store.py, best round": store["page_file_read_gb_per_s_best"]}
    bandwidths |= on_demand_read_rates(serve) if serve else {}
    read_source, read_gb_per_s = max(bandwidths.items(), key=lambda kv: kv[1])
    read_ms = 1000 * page_bytes / (read_gb_per_s * 1e9)
    out = {
        "machine": machine_description(),
        "model": str(args.model),
        "layers": layers,
        "experts": experts,
        "page_bytes": page_bytes,
        "expert_all_layers_mib": page_bytes * layers / 2**20,
        "read_ms_per_page": read_ms,
        "read_gb_per_s": read_gb_per_s,
        "read_gb_per_s_from": read_source,
        "read_gb_per_s_measured": bandwidths,
        "store": str(args.store),
        "serve_results": str(args.serve_results) if serve else None,
        "concurrency": {},
    }
    work = Path(tempfile.mkdtemp(prefix="vllm-readme-bound-"))
    served = serve_and_record(args.model, args.concurrency, args.seed, work)
    for c in args.concurrency:
        summary, steps = served[c]
        skip = min(8, len(steps) // 4)  # warm-up: the pool starts with the first experts resident
        row = {
            "steps": len(steps),
            "mean_unique_experts_per_step": sum(map(len, steps)) / len(steps),
            "pages_per_step": sum(map(len, steps)) * layers / len(steps),
            "all_resident_this_run": _resident(summary),
            "pools": {},
        }
        # The compute term: all resident in the serving run the bound sits
        # beside (the same run as the figures judged), else this one.
        run = serve["runs"].get(f"random c{c}", {}).get(ALL_RESIDENT) if serve else None
        resident = _resident(run) if run else row["all_resident_this_run"]
        row["all_resident"] = resident
        for pool in args.pools:
            pages = round(float(pool.rstrip("%")) / 100 * layers * experts)
            loads = exact_belady_loads(steps, layers, experts, pages, skip) / (len(steps) - skip)
            entry = {
                "pages": pages,
                "forced_loads_per_step": loads,
                "forced_mib_per_step": loads * page_bytes / 2**20,
                "load_ms_per_step": loads * read_ms,
            }
            step = max(resident["step_ms"], entry["load_ms_per_step"])
            entry["bound_tok_s"] = resident["tok_s"] * resident["step_ms"] / step
            entry["bound_over_all_resident"] = entry["bound_tok_s"] / resident["tok_s"]
            entry["bound_by"] = "compute" if step == resident["step_ms"] else "disk"
            row["pools"][pool] = entry
        out["concurrency"][str(c)] = row
        print(json.dumps({c: row}, indent=1), flush=True)
    path = RESULTS / f"expert_cache_bound{args.suffix}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"[bound] wrote {path}")


if __name__ == "__main__":
    main()
