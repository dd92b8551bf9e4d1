# SPDX-License-Identifier: Apache-2.0
"""What the routes of a Read-ME model allow a scheduler and an expert cache
to gain, replayed offline in seconds (paper §4.2-4.3).

Routes are recorded from the model's own router (the reference
implementation; the router reads token ids only) on held-out text of the
built-in corpus that no refactoring stage saw. Reported:

* route statistics: P[route_t == route_(t-1)], mean run length, load per expert;
* the paper's Table 4 setting: single-stream hit ratio of an expert pool of
  capacity 2..5 under random, LRU, LFU and Belady (exact future; and a
  lookahead of one token, what a decoding server knows);
* replay of serving (benchmarks/simulation.py): requests of 70
  prompt + 128 further tokens of the same text, concurrency 8/32/64, under
  FCFS, the paper's greedy-by-expert and the cost-model policy: unique
  experts per step, tokens per step, held-back steps, and the hit ratio of
  a pool of half the experts under LRU and Belady;
* co-planning (scheduler and cache together): with a pool of half the
  experts and a step cost that charges each expert load (this machine's
  calibrated cost model, results/cost_model.json, plus the load time of one
  expert across all layers, results/expert_store.json), FCFS + LRU against
  greedy-expert and cost-model + Belady: unique experts per step and the
  estimated throughput, as ratios;
* grouping against the cost of an expert: every expert resident, the
  calibrated base and per-token cost with the per-expert cost swept from the
  calibrated one to 40 ms, FCFS against the cost-model policy: estimated
  throughput, experts per step and tokens per expert opened.

    python benchmarks/routes.py [--readme models/smollm2-readme]

Writes benchmarks/results/routes.json and routes.png. The replay section's
throughput uses the default step-cost model, not this machine's: compare
unique experts and hit ratios there; co-planning and the sweep use this
machine's calibration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def record_routes(model_dir: Path, max_tokens: int, block_len: int = 512, text: str = "held-out") -> list[list[int]]:
    """The router's route of every token of ``text``: "held-out" (documents
    of the calibration sources that no stage saw) or "out-of-domain"
    (the Brown categories no stage sees)."""
    import torch
    from transformers import AutoTokenizer

    from vllm_readme.modeling_readme import ReadMEForCausalLM
    from vllm_readme.refactor.data import load_domains, out_of_domain_documents, split_domains, token_blocks
    from vllm_readme.refactor.pipeline import RefactorOptions

    if text == "out-of-domain":
        documents = out_of_domain_documents()
    else:
        options = RefactorOptions(out=model_dir)
        _, held = split_domains(load_domains(list(options.calib)), options.held_out_fraction)
        documents = [doc for domain in held for doc in domain.documents]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    blocks = token_blocks(tokenizer, documents, block_len, max_tokens)
    model = ReadMEForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.route(block[None])[1][0].tolist() for block in blocks]


def route_statistics(blocks: list[list[int]], num_experts: int) -> dict:
    same, pairs, runs, load = 0, 0, [], [0] * num_experts
    for routes in blocks:
        run = 1
        for prev, cur in zip(routes, routes[1:], strict=False):
            pairs += 1
            if prev == cur:
                same += 1
                run += 1
            else:
                runs.append(run)
                run = 1
        runs.append(run)
        for r in routes:
            load[r] += 1
    total = sum(load)
    # What a policy under vLLM's async scheduling would guess with: the
    # route of the token two back (its step's routes arrive a step later).
    lag2 = [r[i] == r[i - 2] for r in blocks for i in range(2, len(r))]
    return {
        "tokens": total,
        "persistence": same / pairs,
        "persistence_lag2": sum(lag2) / len(lag2) if lag2 else 0.0,
        "mean_run_length": sum(runs) / len(runs),
        "load_fraction": [n / total for n in load],
        "max_over_mean_load": max(load) / (total / num_experts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument(
        "--text",
        default="held-out",
        choices=["held-out", "out-of-domain"],
        help="held-out documents of the calibration sources, or English prose no stage sees (Brown)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "routes.json")
    parser.add_argument(
        "--save-trace", type=Path, help="also write the recorded routes (one list per 512-token block) as JSON"
    )
    parser.add_argument(
        "--cost-model",
        type=Path,
        default=RESULTS / "cost_model.json",
        help="step-cost model for the co-planning replay (default: this machine's calibration, when present)",
    )
    parser.add_argument(
        "--load-ms",
        type=float,
        help="ms to load one expert across all layers, for the co-planning replay "
        "(default: load_ms_per_expert_all_layers of results/expert_store.json)",
    )
    args = parser.parse_args()

    from simulation import (  # benchmarks/ is on sys.path when run as a script
        TraceRequest,
        simulate,
        single_stream_hit_ratio,
    )

    from vllm_readme.experts.eviction import EVICTION_POLICIES

    num_experts = json.loads((args.readme / "config.json").read_text())["num_experts"]
    blocks = record_routes(args.readme, args.tokens, text=args.text)
    if args.save_trace:
        args.save_trace.write_text(json.dumps({"model": str(args.readme), "text": args.text, "blocks": blocks}))
    stream = [r for block in blocks for r in block]
    from vllm_readme.precision import machine_description, read_machine

    results = {
        "machine": machine_description(read_machine()),
        "model": str(args.readme),
        "text": args.text,
        "routes": route_statistics(blocks, num_experts),
        "single_stream": {},
    }
    print(
        f"[routes] {len(stream)} tokens; persistence {results['routes']['persistence']:.1%} "
        f"(two tokens back: {results['routes']['persistence_lag2']:.1%})"
    )
    for capacity in range(2, min(6, num_experts)):
        row = {p: single_stream_hit_ratio(stream, capacity, p) for p in EVICTION_POLICIES}
        row["belady (next token only)"] = single_stream_hit_ratio(stream, capacity, "belady", lookahead=1)
        results["single_stream"][capacity] = row
        print(f"[routes] capacity {capacity}: " + ", ".join(f"{k} {v:.1%}" for k, v in row.items()))
    # Belady's tie-break (eviction.py): ties among experts with no known use
    # go by recency-weighted uses; 0 = by recency alone.
    results["belady_tie_decay"] = {
        capacity: {
            str(decay): single_stream_hit_ratio(stream, capacity, "belady", lookahead=1, decay=decay)
            for decay in (0.0, 0.9, 0.95, 0.98, 0.99)
        }
        for capacity in range(2, min(6, num_experts))
    }

    requests = []
    for i, block in enumerate(blocks):
        for start in range(0, len(block) - 198 + 1, 198):
            requests.append(
                TraceRequest(f"b{i}.{start}", 0, block[start : start + 70], block[start + 70 : start + 198])
            )
    results["replay"] = {}
    half = max(1, num_experts // 2)
    for concurrency in (1, 8, 32, 64):
        trace = requests[: 2 * concurrency]
        rows = {}
        for policy, extra in (
            ("fcfs", {}),
            ("greedy-expert", {"batch_tokens": max(1, concurrency // 2)}),
            ("cost-model", {}),
        ):
            common = dict(max_requests=concurrency, max_held_back=4, chunk=512, **extra)
            rows[policy] = simulate(trace, policy, **common).summary()
            for eviction, future in (("lru", "known"), ("belady", "known"), ("belady", "exact")):
                cached = simulate(trace, policy, cache_capacity=half, eviction=eviction, future=future, **common)
                rows[policy][f"hit_ratio_{half}_of_{num_experts} {eviction} ({future} future)"] = cached.hit_ratio
        results["replay"][concurrency] = rows
        print(
            f"[routes] c{concurrency}: unique experts/step "
            + ", ".join(f"{p} {r['mean_unique_experts_per_step']:.2f}" for p, r in rows.items())
        )
    results["co_planning"] = co_planning(requests, num_experts, args.cost_model, args.load_ms)
    results["expert_cost_sweep"] = expert_cost_sweep(requests, args.cost_model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"[routes] wrote {args.out} and {args.out.with_suffix('.png')}")


def co_planning(requests, num_experts: int, cost_file: Path, load_ms: float | None) -> dict:
    """Scheduler and cache planned together: a pool of
    half the experts, a step cost that charges every expert load at what
    loading one expert across all layers costs from the backing store (no
    prefetch: the upper end of what a load costs a step), FCFS + LRU against
    the expert-aware policies + Belady over the known future."""
    import dataclasses

    from simulation import simulate

    from vllm_readme.scheduler.cost_model import StepCostModel
    from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL

    model = StepCostModel.load(cost_file) if cost_file.is_file() else DEFAULT_COST_MODEL
    if load_ms is None:
        store = RESULTS / "expert_store.json"
        load_ms = json.loads(store.read_text())["load_ms_per_expert_all_layers"] if store.is_file() else 0.0
    model = dataclasses.replace(model, per_load_ms=load_ms)
    half = max(1, num_experts // 2)
    out = {"cost_model": dataclasses.asdict(model), "pool_experts": half, "concurrency": {}}
    for concurrency in (32, 64):
        trace = requests[: 2 * concurrency]
        rows = {}
        for label, policy, eviction in (
            ("FCFS + LRU", "fcfs", "lru"),
            ("FCFS + Belady", "fcfs", "belady"),
            ("greedy-expert + Belady", "greedy-expert", "belady"),
            ("cost-model + Belady", "cost-model", "belady"),
        ):
            run = simulate(
                trace,
                policy,
                cost_model=model,
                max_requests=concurrency,
                max_held_back=4,
                chunk=512,
                cache_capacity=half,
                eviction=eviction,
                batch_tokens=max(1, concurrency // 2) if policy == "greedy-expert" else None,
            )
            rows[label] = run.summary() | {"hit_ratio": run.hit_ratio}
        base = rows["FCFS + LRU"]
        for row in rows.values():
            row["unique_experts_vs_fcfs_lru"] = (
                row["mean_unique_experts_per_step"] / base["mean_unique_experts_per_step"]
            )
            row["throughput_vs_fcfs_lru"] = row["estimated_tokens_per_s"] / base["estimated_tokens_per_s"]
        out["concurrency"][concurrency] = rows
        print(
            f"[routes] co-planning c{concurrency}, pool {half} of {num_experts}, load {load_ms:.1f} ms/expert: "
            + "; ".join(
                f"{k} {r['mean_unique_experts_per_step']:.2f} experts/step, {r['throughput_vs_fcfs_lru']:.2f}x"
                for k, r in rows.items()
            )
        )
    return out


def expert_cost_sweep(requests, cost_file: Path) -> dict:
    """Does grouping pay once a distinct expert costs something? This
    machine's calibrated base and per-token cost, the per-expert cost swept
    from the calibrated one to several times a whole step's base, every
    expert resident, FCFS against the cost-model policy. Also reported:
    tokens per expert opened (a step's tokens over its distinct experts):
    in continuous batching every running decode fits every step (vLLM
    requires max_num_batched_tokens >= max_num_seqs), and holding a decode
    back does not let it produce more than one token when it runs, so
    holding can raise tokens per opened expert only by making requests that
    switch to an expert at different steps meet (docs/scheduling.md,
    "When grouping pays")."""
    import dataclasses

    from simulation import simulate

    from vllm_readme.scheduler.cost_model import StepCostModel
    from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL

    calibrated = StepCostModel.load(cost_file) if cost_file.is_file() else DEFAULT_COST_MODEL
    out = {"cost_model": dataclasses.asdict(calibrated), "concurrency": {}}
    for concurrency in (32, 64):
        trace = requests[: 2 * concurrency]
        rows = []
        for per_expert in sorted({round(calibrated.per_expert_ms, 2), 2.5, 5.0, 10.0, 20.0, 40.0}):
            model = dataclasses.replace(calibrated, per_expert_ms=per_expert)
            row = {"per_expert_ms": per_expert}
            for policy in ("fcfs", "cost-model"):
                run = simulate(trace, policy, cost_model=model, max_requests=concurrency, max_held_back=4)
                opened = sum(run.unique_experts_per_step)
                row[policy] = run.summary() | {"tokens_per_expert_opened": run.tokens / opened if opened else 0.0}
            fcfs, cost = row["fcfs"], row["cost-model"]
            row["throughput_ratio"] = cost["estimated_tokens_per_s"] / fcfs["estimated_tokens_per_s"]
            row["unique_experts_ratio"] = cost["mean_unique_experts_per_step"] / fcfs["mean_unique_experts_per_step"]
            rows.append(row)
            print(
                f"[routes] expert cost {per_expert:.2f} ms, c{concurrency}: cost-model / FCFS "
                f"{row['throughput_ratio']:.3f}x estimated tok/s, {row['unique_experts_ratio']:.2f}x experts/step; "
                f"tokens per expert opened {fcfs['tokens_per_expert_opened']:.2f} / "
                f"{cost['tokens_per_expert_opened']:.2f}"
            )
        out["concurrency"][concurrency] = rows
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results.get("expert_cost_sweep")
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(18 if sweep else 12, 4.5))
    single = results["single_stream"]
    capacities = sorted(single, key=int)
    for policy in single[capacities[0]]:
        axes[0].plot([int(c) for c in capacities], [single[c][policy] for c in capacities], marker="o", label=policy)
    axes[0].set(xlabel="pool capacity (experts)", ylabel="hit ratio", title="single stream (paper Table 4 setting)")
    replay = results["replay"]
    concurrencies = sorted(replay, key=int)
    for policy in replay[concurrencies[0]]:
        ys = [replay[c][policy]["mean_unique_experts_per_step"] for c in concurrencies]
        axes[1].plot([int(c) for c in concurrencies], ys, marker="o", label=policy)
    axes[1].set(xlabel="concurrency", ylabel="unique experts per step", title="replay of routes", xscale="log")
    if sweep:
        for concurrency, rows in sweep["concurrency"].items():
            xs = [r["per_expert_ms"] for r in rows]
            axes[2].plot(xs, [r["throughput_ratio"] for r in rows], marker="o", label=f"c{concurrency}: tok/s")
            axes[2].plot(
                xs,
                [r["unique_experts_ratio"] for r in rows],
                marker="x",
                ls="--",
                label=f"c{concurrency}: experts/step",
            )
        axes[2].axhline(1.0, color="grey", lw=0.8)
        axes[2].set(
            xlabel="cost of one distinct expert in a step (ms)",
            ylabel="cost-model policy / FCFS",
            title="grouping, every expert resident (estimated)",
            xscale="symlog",
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    route = results["routes"]
    fig.suptitle(
        f"{results['model']}: persistence {route['persistence']:.1%}, mean run {route['mean_run_length']:.2f} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
