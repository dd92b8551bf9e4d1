"""Where a decode step's time goes: router, attention, shared MLP, routed
experts, lm_head, the rest of the model, and what lies outside the model
(sampling, scheduling, the plugin's and vLLM's bookkeeping).

Module timers (forward hooks; CPU ops are synchronous, so wall time between
a module's pre- and post-hook is its cost) on an eager in-process engine.
Writes benchmarks/results/decode_profile.json and .png.

    python benchmarks/decode_profile.py [--batch 1] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]

# Module class name -> category. The first matching enclosing module wins, so
# the shared MLP (called inside the routed-experts layer) is not counted twice.
CATEGORIES = {
    "ReadMERouter": "router",
    "ReadMESharedMLP": "shared MLP",
    "ReadMEMoE": "MLP (routed experts)",
    "LlamaMLP": "MLP (dense)",
    "ReadMEAttention": "attention",
    "LlamaAttention": "attention",
}


def install_timers(model):
    totals = defaultdict(float)
    stack = []

    def pre(module, _args, category):
        stack.append((category, time.perf_counter()))

    def post(module, _args, _out, category):
        cat, start = stack.pop()
        elapsed = time.perf_counter() - start
        totals[cat] += elapsed
        if stack:  # do not count nested time twice
            parent, parent_start = stack[-1]
            totals[parent] -= elapsed

    for module in model.modules():
        category = CATEGORIES.get(type(module).__name__)
        if category:
            module.register_forward_pre_hook(lambda m, a, c=category: pre(m, a, c))
            module.register_forward_hook(lambda m, a, o, c=category: post(m, a, o, c))
    original_forward = model.forward
    original_logits = model.compute_logits

    def forward(*args, **kwargs):
        stack.append(("model (embedding, norms, residuals)", time.perf_counter()))
        out = original_forward(*args, **kwargs)
        cat, start = stack.pop()
        totals[cat] += time.perf_counter() - start
        totals["forward calls"] += 1
        return out

    def compute_logits(*args, **kwargs):
        start = time.perf_counter()
        out = original_logits(*args, **kwargs)
        totals["lm_head (logits)"] += time.perf_counter() - start
        return out

    model.forward = forward
    model.compute_logits = compute_logits
    model._decode_profile = totals


def read_timers(model):
    return dict(model._decode_profile)


def reset_timers(model):
    model._decode_profile.clear()


def profile(model_dir: Path, dtype: str, batch: int, new_tokens: int, prompt_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        enforce_eager=True,
        max_model_len=prompt_tokens + new_tokens + 8,
        max_num_seqs=batch,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )
    prompts = [
        TokensPrompt(prompt_token_ids=[(97 * (i + 1) + 31 * j) % 40000 + 5 for j in range(prompt_tokens)])
        for i in range(batch)
    ]
    llm.apply_model(install_timers)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    timings = {}
    for max_tokens in (1, new_tokens):
        llm.apply_model(reset_timers)
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
        timings[max_tokens] = (time.perf_counter() - start, llm.apply_model(read_timers)[0])
    (t1, m1), (tn, mn) = timings[1], timings[new_tokens]
    steps = new_tokens - 1
    per_step = {k: (mn.get(k, 0.0) - m1.get(k, 0.0)) / steps * 1000 for k in mn if k != "forward calls"}
    step_ms = (tn - t1) / steps * 1000
    per_step["outside the model (sampling, scheduler, bookkeeping)"] = step_ms - sum(per_step.values())
    del llm, params
    return {"model": model_dir.name, "dtype": dtype, "batch": batch, "decode_step_ms": step_ms, "ms_per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[ROOT / "models" / "smollm2-dense", ROOT / "models" / "smollm2-shapes-readme"],
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_profile.json")
    args = parser.parse_args()
    results = [profile(m, args.dtype, args.batch, args.new_tokens, args.prompt_tokens) for m in args.models]
    for r in results:
        print(f"[profile] {r['model']} {r['dtype']} batch {r['batch']}: {r['decode_step_ms']:.2f} ms/step")
        for k, v in sorted(r["ms_per_step"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:55s} {v:6.2f} ms  {v / r['decode_step_ms']:5.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in results for k in r["ms_per_step"]})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * len(results)))
    for row, r in enumerate(results):
        left = 0.0
        for i, k in enumerate(keys):
            v = max(0.0, r["ms_per_step"].get(k, 0.0))
            ax.barh(row, v, left=left, color=plt.cm.tab10(i), label=k if row == 0 else None)
            left += v
    ax.set_yticks(range(len(results)), [f"{r['model']} ({r['dtype']}, batch {r['batch']})" for r in results])
    ax.set_xlabel("ms per decode step (eager)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110, bbox_inches="tight")
    print(f"[profile] wrote {args.out}")


if __name__ == "__main__":
    main()
