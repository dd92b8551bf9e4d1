# SPDX-License-Identifier: Apache-2.0
"""Where a decode step's time goes, on the engine as served (torch.compile on).

For each model and batch size: one in-process engine, a warm-up, then the
torch profiler over a greedy decode. Every op's self time is put into a
category by its name and shapes (GEMMs by their (N, K) against the model's
config, attention ops by their head shape):

    attention (QKV/O GEMMs + paged attention), MLP (dense), shared MLP,
    routed experts, router, lm_head, elementwise (norms, RoPE, residuals:
    inductor's kernels), compile wrappers (guards, AOT runtime), sampling,
    other ops (input preparation, small aten ops), and the time when no op
    runs at all (Python: scheduler, engine loop, output processing, the
    model's Python wrappers; the engine's and the plugin's bookkeeping).

Prefill is measured separately (max_tokens=1) and subtracted, so the numbers
are per decode step. From the dense model's MLP share it also derives the
speed-up a Read-ME model could reach on this machine if its MLP cost exactly
its active fraction and nothing else changed (``ceiling``).

    python benchmarks/decode_profile.py                  # batch 1 and 32, the machine's native dtype
    python benchmarks/decode_profile.py --batches 1 --dtype float32

The native dtype is bf16 on a GPU with bf16 or a CPU with AVX512-BF16/AMX,
fp32 elsewhere (vllm_readme/precision.py).

Writes benchmarks/results/decode_profile.json and .png.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from decode import _die_with_parent, prepare_models  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ORDER = [
    "attention",
    "MLP (dense)",
    "shared MLP",
    "routed experts",
    "router",
    "lm_head",
    "elementwise (inductor)",
    "compile wrappers",
    "sampling",
    "other ops (input prep, small aten)",
    "no op running (Python: engine, scheduler, model wrappers)",
]
OTHER = ORDER[-2]


def gemm_categories(config: dict) -> dict[tuple[int, int], str]:
    """(N, K) of every GEMM the model runs -> category."""
    h, hd = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {(q + 2 * kv, h): "attention", (h, q): "attention", (config["vocab_size"], h): "lm_head"}
    if config.get("model_type") == "readme":
        shared = config["shared_intermediate_size"]
        shapes[(2 * shared, h)] = shapes[(h, shared)] = "shared MLP"
        r = config["router"]
        rq, rkv = r["num_attention_heads"] * r["head_dim"], r["num_key_value_heads"] * r["head_dim"]
        ri = r["intermediate_size"] * (2 if r["gated_mlp"] else 1)
        for n, k in ((rq + 2 * rkv, r["hidden_size"]), (r["hidden_size"], rq), (ri, r["hidden_size"])):
            shapes[(n, k)] = "router"
        shapes[(r["hidden_size"], r["intermediate_size"])] = "router"
        shapes[(r["num_experts"], r["hidden_size"])] = "router"
    else:
        i = config["intermediate_size"]
        shapes[(2 * i, h)] = shapes[(h, i)] = "MLP (dense)"
    return shapes


def categorize(name: str, shapes: list, gemms: dict, router_heads: tuple | None) -> str:
    if name in ("_C::onednn_mm", "aten::mm", "aten::addmm", "_C::weight_packed_linear"):
        if shapes and len(shapes[0]) == 2 and len(shapes[1]) == 2:
            return gemms.get((shapes[0][1], shapes[1][1]), OTHER)
        return OTHER
    if name == "_C::cpu_fused_moe" or name.startswith("vllm::moe_forward"):
        return "routed experts"
    if "attention" in name or "kv_cache" in name or "attn" in name:
        heads = tuple(shapes[0][1:]) if shapes and len(shapes[0]) == 3 else None
        if router_heads and heads in router_heads:
            return "router"
        return "attention"
    # The router's argmax is fused into an inductor kernel: an argmax op is the sampler's.
    if name == "aten::argmax" or "greedy_argmax" in name or "sampl" in name or "topk_topp" in name:
        return "sampling"
    if "CompiledFxGraph" in name:
        return "elementwise (inductor)"
    if name in ("Pregraph bytecode",) or name.startswith("AOTDispatcher") or name.startswith("TorchDynamo"):
        return "compile wrappers"
    return OTHER


def worker(model: str, dtype: str, batch: int, new_tokens: int, prompt_tokens: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    config = json.loads((Path(model) / "config.json").read_text())
    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=prompt_tokens + new_tokens + 8,
        max_num_seqs=batch,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )

    vocab = config["vocab_size"]
    prompts = [
        TokensPrompt(prompt_token_ids=[(97 * (i + 1) + 31 * j) % (vocab - 10) + 5 for j in range(prompt_tokens)])
        for i in range(batch)
    ]

    def run(max_tokens: int) -> tuple[float, dict[str, float]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
        r = config.get("router")
        router_heads = (
            {(r["num_attention_heads"], r["head_dim"]), (r["num_key_value_heads"], r["head_dim"])} if r else None
        )
        gemms = gemm_categories(config)
        totals: dict[str, float] = defaultdict(float)
        for event in prof.key_averages(group_by_input_shape=True):
            if event.key.startswith("[") or event.key.startswith("ProfilerStep"):
                continue
            totals[categorize(event.key, event.input_shapes, gemms, router_heads)] += event.self_cpu_time_total / 1e3
        return wall * 1e3, dict(totals)

    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    wall1, ops1 = run(1)
    walln, opsn = run(new_tokens)
    steps = new_tokens - 1
    step_ms = (walln - wall1) / steps
    per_step = {k: (opsn.get(k, 0.0) - ops1.get(k, 0.0)) / steps for k in ORDER if k in opsn}
    per_step[ORDER[-1]] = step_ms - sum(per_step.values())
    return {
        "model": Path(model).name,
        "dtype": dtype,
        "batch": batch,
        "decode_step_ms": step_ms,
        "ms_per_step": per_step,
    }


def run_worker(model: Path, dtype: str, batch: int, new_tokens: int, prompt_tokens: int) -> dict:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", str(model), dtype, str(batch), str(new_tokens), str(prompt_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, preexec_fn=_die_with_parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"profile of {model} ({dtype}, batch {batch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def ceiling(dense: dict, readme: dict, active_fraction: float) -> dict:
    """Read-ME's best speed-up here if its MLP cost exactly the active
    fraction of the dense MLP and every other part cost what it does now."""
    d, r = dense["ms_per_step"], readme["ms_per_step"]
    mlp = d.get("MLP (dense)", 0.0)
    rest = dense["decode_step_ms"] - mlp
    ideal = rest + active_fraction * mlp + r.get("router", 0.0)
    measured_mlp = r.get("shared MLP", 0.0) + r.get("routed experts", 0.0)
    return {
        "dense_mlp_share": mlp / dense["decode_step_ms"],
        "ideal_readme_step_ms": ideal,
        "ceiling_speedup": dense["decode_step_ms"] / ideal,
        "measured_speedup": dense["decode_step_ms"] / readme["decode_step_ms"],
        "readme_mlp_over_dense_mlp": measured_mlp / mlp if mlp else None,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [*plt.cm.tab10.colors, "#333333"]
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.7 * len(results)))
    for row, r in enumerate(results):
        left = 0.0
        for i, k in enumerate(ORDER):
            v = max(0.0, r["ms_per_step"].get(k, 0.0))
            ax.barh(row, v, left=left, color=colors[i], label=k if row == 0 else None)
            left += v
    ax.set_yticks(range(len(results)), [f"{r['model']} ({r['dtype']}, batch {r['batch']})" for r in results])
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (torch.compile on, CPU)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, dtype, batch, new_tokens, prompt_tokens = sys.argv[2:7]
        print("RESULT " + json.dumps(worker(model, dtype, int(batch), int(new_tokens), int(prompt_tokens))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--dtype", default="auto", help="auto (the machine's native choice), bf16/bfloat16 or fp32/float32"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--dense", type=Path, help="dense HF folder (default: SmolLM2-135M exported from GGUF)")
    parser.add_argument("--readme", type=Path, help="Read-ME checkpoint (default: random weights, SmolLM2 shapes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_profile.json")
    args = parser.parse_args()
    from vllm_readme.precision import machine_description, resolve_precision

    precision = resolve_precision(args.dtype)
    args.dtype = precision.vllm_dtype
    machine = machine_description(precision=precision)
    print(f"[profile] {machine}")
    args.dense, args.readme = prepare_models(args.readme, args.dense)  # built on first use, as decode.py does
    readme_config = json.loads((args.readme / "config.json").read_text())
    dense_config = json.loads((args.dense / "config.json").read_text())
    active = (readme_config["shared_intermediate_size"] + readme_config["expert_intermediate_size"]) / dense_config[
        "intermediate_size"
    ]
    results, ceilings = [], {}
    for batch in args.batches:
        pair = [
            run_worker(m, args.dtype, batch, args.new_tokens, args.prompt_tokens) for m in (args.dense, args.readme)
        ]
        results += pair
        ceilings[str(batch)] = ceiling(*pair, active_fraction=active)
        for r in pair:
            print(f"[profile] {r['model']} {r['dtype']} batch {r['batch']}: {r['decode_step_ms']:.2f} ms/step")
            for k in ORDER:
                v = r["ms_per_step"].get(k)
                if v is not None:
                    print(f"    {k:40s} {v:6.2f} ms  {v / r['decode_step_ms']:5.1%}")
        c = ceilings[str(batch)]
        print(
            f"[profile] batch {batch}: dense MLP is {c['dense_mlp_share']:.0%} of its step; with the MLP at its active "
            f"fraction ({active:.0%}) Read-ME could reach {c['ceiling_speedup']:.2f}x here; measured "
            f"{c['measured_speedup']:.2f}x (Read-ME MLP = {c['readme_mlp_over_dense_mlp']:.2f} of the dense MLP's time)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"machine": machine, "active_mlp_fraction": active, "ceilings": ceilings, "profiles": results}, indent=2
        )
    )
    plot(results, args.out.with_suffix(".png"))
    print(f"[profile] wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
