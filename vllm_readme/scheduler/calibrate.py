# SPDX-License-Identifier: Apache-2.0
"""``vllm-readme calibrate``: measure a machine's step-cost model.

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

    vllm-readme calibrate MODEL --out cost.json
    vllm-readme serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler \\
        --additional-config '{"vllm_readme": {"cost_model": "cost.json"}}'

Beside ``cost.json`` it writes ``cost_samples.json``: every measured step and
the fit's R^2. Without a file the scheduler fits the same model online from
its own steps (docs/scheduling.md).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path

from vllm_readme.scheduler.cost_model import StepCostModel

SCHEDULER = "vllm_readme.scheduler.ExpertAwareScheduler"
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
# The probe: a model in which an expert costs 50 tokens, so the cost-model
# policy holds requests back and steps with many tokens and few experts are
# measured too; the two terms can then be told apart.
PROBE = StepCostModel(base_ms=1.0, per_token_ms=1.0, per_expert_ms=50.0, source="calibration probe")


@dataclasses.dataclass(frozen=True)
class Step:
    tokens: int
    requests: int
    experts: int
    ms: float
    policy: str
    concurrency: int


def collect(
    model: Path, policy: str, concurrency: tuple[int, ...], new_tokens: int, dtype: str, probe: Path | None = None
) -> list[Step]:
    """Decode steps of one engine under ``policy``, concurrency by concurrency."""
    # The scheduler object is read in-process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    from vllm_readme.refactor.data import out_of_domain_documents
    from vllm_readme.vllm_internals import in_process_scheduler

    documents = out_of_domain_documents() or ["The quick brown fox jumps over the lazy dog. " * 20]
    prompts = [" ".join(doc.split()[:40]) for doc in documents]
    llm = LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=1024,
        max_num_seqs=max(concurrency),
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
    steps: list[Step] = []
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for c in concurrency:
        stats = in_process_scheduler(engine).readme_stats
        stats.samples.clear()
        for i in range(c):
            engine.add_request(f"{policy}-{c}-{i}", prompts[i % len(prompts)], params)
        while engine.has_unfinished_requests():
            engine.step()
        # Decode steps only (one token per scheduled request); the first
        # follows the prefill and is dropped.
        decode = [s for s in list(stats.samples)[1:] if s[0] == s[1]]
        steps += [Step(*s[:4], policy, c) for s in decode]
        print(f"[calibrate] {policy}, concurrency {c}: {len(decode)} decode steps", flush=True)
    del engine, llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return steps


def r_squared(fit: StepCostModel, steps: list[Step]) -> float:
    mean = sum(s.ms for s in steps) / len(steps)
    total = sum((s.ms - mean) ** 2 for s in steps)
    residual = sum((s.ms - fit.step_ms(s.tokens, s.experts)) ** 2 for s in steps)
    return 1 - residual / total if total else 0.0


def calibrate(
    model: Path, out: Path, concurrency: tuple[int, ...] = CONCURRENCY, new_tokens: int = 48, dtype: str | None = None
) -> tuple[StepCostModel, list[Step]]:
    """Measure, fit and write ``out`` (the cost model) and ``<out>_samples.json``."""
    from vllm_readme.precision import machine_description, read_machine, serving_dtype

    dtype = dtype or serving_dtype()
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = out.with_name(out.stem + "_probe.json")
    PROBE.save(probe)
    try:
        steps = collect(model, "fcfs", concurrency, new_tokens, dtype)
        steps += collect(model, "cost-model", concurrency, new_tokens, dtype, probe)
    finally:
        probe.unlink(missing_ok=True)
    machine = machine_description(read_machine())
    fit = StepCostModel.fit([(s.tokens, s.experts, s.ms) for s in steps], source=f"{model.name}, {dtype}, {machine}")
    fit.save(out)
    report = {
        "machine": machine,
        "dtype": dtype,
        "model": str(model),
        "fit": dataclasses.asdict(fit),
        "r2": r_squared(fit, steps),
        "samples": [dataclasses.asdict(s) for s in steps],
    }
    samples_path(out).write_text(json.dumps(report, indent=1))
    print(
        f"[calibrate] step_ms = {fit.base_ms:.2f} + {fit.per_token_ms:.3f} * tokens + {fit.per_expert_ms:.2f} * "
        f"experts (R^2 {report['r2']:.3f}, {len(steps)} decode steps, {dtype}); wrote {out}",
        flush=True,
    )
    return fit, steps


def samples_path(out: Path) -> Path:
    return out.with_name(out.stem + "_samples.json")
