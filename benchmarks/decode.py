# SPDX-License-Identifier: Apache-2.0
"""Decode speed: stock vLLM serving dense SmolLM2-135M vs the plugin serving a
Read-ME model of SmolLM2's shapes, side by side in one run.

Reports tokens/s and ms per decode step at several batch sizes, in the
machine's native dtype (vllm_readme/precision.py: bf16 on a GPU with bf16 or a
CPU with AVX512-BF16/AMX, fp32 elsewhere, where bf16 is emulated; --dtypes
bfloat16 float32 for both), the machine's memory read bandwidth measured in
the same run, and each configuration's fraction of its own weight-read
roofline. A third engine serves the same Read-ME model through vLLM's
FusedMoE layer (VLLM_README_ROUTED_KERNEL=fused_moe) to show what the direct
kernel wins.

All engines of a dtype stay loaded, each in its own process, and take turns
(dense, Read-ME, FusedMoE, dense, ...) for --rounds rounds; the best of each
is kept. Drift on a shared machine then hits every configuration alike.
Results go to benchmarks/results/decode.json and decode.png, with a one-line
description of the machine (CPU, cores, bf16-relevant flags, native dtype).

    python benchmarks/decode.py              # the full table, native dtype
    python benchmarks/decode.py --dtypes bfloat16 float32   # both dtypes, one after the other
    python benchmarks/decode.py --quick      # a smoke test of a few seconds per engine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def measure_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of a reduction over a buffer far above cache."""
    import torch

    buf = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def weight_bytes_per_step(config: dict, batch: int, bytes_per_param: int, readme: bool) -> float:
    """Bytes of weights one decode step must read (KV cache excluded)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    attention = h * head_dim * (2 * heads + 2 * kv) + 2 * h  # q, o, k, v + two norms
    params = layers * attention + h + vocab * h  # + final norm + lm_head (tied or not: read once)
    params += batch * h  # embedding rows
    if not readme:
        params += layers * 3 * h * config["intermediate_size"]
        return params * bytes_per_param
    experts = config["num_experts"]
    touched = experts * (1 - (1 - 1 / experts) ** batch)  # expected distinct experts, uniform routes
    params += layers * 3 * h * (config["shared_intermediate_size"] + touched * config["expert_intermediate_size"])
    router = config["router"]
    rh, ri = router["hidden_size"], router["intermediate_size"]
    rq = router["num_attention_heads"] * router["head_dim"]
    rkv = router["num_key_value_heads"] * router["head_dim"]
    router_layer = rh * (2 * rq + 2 * rkv) + (3 if router["gated_mlp"] else 2) * rh * ri + 2 * rh
    params += router["num_hidden_layers"] * router_layer + rh + rh * experts + batch * rh
    return params * bytes_per_param


def weight_group(name: str) -> str:
    if name.startswith("router."):
        return "router"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared" in name:
        return "shared MLP"
    if ".mlp." in name:
        return "MLP"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embedding / lm_head"
    return "attention and norms"


def resident_weight_params(model_dir: Path) -> dict[str, int]:
    """Parameters stored in the checkpoint (= resident in vLLM: the shared
    part once, every expert, the router), by group, and their total."""
    from safetensors import safe_open

    groups: dict[str, int] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                groups[weight_group(name)] = groups.get(weight_group(name), 0) + n
    groups["total"] = sum(groups.values())
    return groups


WORKER = r"""
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, dtype, max_batch, max_len, eager = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
llm = LLM(model=model, dtype=dtype, max_model_len=max_len, max_num_seqs=max_batch,
          kv_cache_memory_bytes=1 << 30, enforce_eager=eager, seed=0)
vocab = llm.llm_engine.model_config.get_vocab_size()
def prompts(batch, prompt_tokens, salt):
    return [TokensPrompt(prompt_token_ids=[(97 * (i + 1) + 31 * j + salt) % (vocab - 10) + 5 for j in range(prompt_tokens)])
            for i in range(batch)]
def timed(batch, prompt_tokens, max_tokens, salt):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter(); out = llm.generate(prompts(batch, prompt_tokens, salt), params, use_tqdm=False)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in out)
    return dt
warm = set()
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    batch, new_tokens, prompt_tokens = req["batch"], req["new_tokens"], req["prompt_tokens"]
    if batch not in warm:
        timed(batch, prompt_tokens, 4, 0)  # warm-up (compilation for this size, allocator)
        warm.add(batch)
    # Best of three: one slow prefill on a shared machine would otherwise
    # make the decode time (total - prefill) too small, even negative.
    prefill = min(timed(batch, prompt_tokens, 1, 1 + 2 * k) for k in range(3))
    total = timed(batch, prompt_tokens, new_tokens, 2)
    print("RESULT " + json.dumps({"prefill_s": prefill, "total_s": total}), flush=True)
"""


def _die_with_parent() -> None:
    """An engine left running after the benchmark is killed would skew every
    later measurement on the machine: have the kernel stop it (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Engine:
    """One engine in its own process, kept alive across measurements so that
    engines can take turns (A B A B ...): drift on a shared machine then hits
    every configuration alike instead of whichever ran last."""

    def __init__(self, label: str, model: Path, dtype: str, max_batch: int, max_len: int, eager: bool, env: dict):
        self.label = label
        env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false", **env)
        cmd = [sys.executable, "-c", WORKER, str(model), dtype, str(max_batch), str(max_len), "1" if eager else "0"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise RuntimeError(f"engine {self.label} stopped:\n{self.proc.stderr.read()[-3000:]}")

    def wait_ready(self) -> None:
        self._read("READY")

    def measure(self, batch: int, new_tokens: int, prompt_tokens: int) -> dict:
        self.proc.stdin.write(
            json.dumps({"batch": batch, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens}) + "\n"
        )
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def measure_interleaved(engines: list[Engine], batches: list[int], new_tokens: int, prompt_tokens: int, rounds: int):
    """Every engine at every batch size, ``rounds`` times, the engines taking
    turns. Per (engine, batch): the best round (``decode_step_ms``), and the
    step time of every round (``round_step_ms``) so that ratios can be taken
    round by round, between measurements made seconds apart."""
    samples: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for batch in batches:
            for engine in engines:
                m = engine.measure(batch, new_tokens, prompt_tokens)
                m["step_ms"] = (m["total_s"] - m["prefill_s"]) / (new_tokens - 1) * 1000
                samples.setdefault((engine.label, batch), []).append(m)
            print(f"[decode] round {r + 1}/{rounds}, batch {batch}: done", flush=True)
    rows = {}
    for engine in engines:
        rows[engine.label] = []
        for batch in batches:
            runs = samples[(engine.label, batch)]
            best = min(runs, key=lambda m: m["step_ms"])
            rows[engine.label].append(
                {
                    "batch": batch,
                    "total_s": best["total_s"],
                    "prefill_s": best["prefill_s"],
                    "decode_step_ms": best["step_ms"],
                    "round_step_ms": [m["step_ms"] for m in runs],
                    "tokens_per_s": batch * new_tokens / best["total_s"],
                    "decode_tokens_per_s": batch * 1000 / best["step_ms"],
                }
            )
    return rows


def paired_speedup(base: list[dict], other: list[dict]) -> dict[str, dict]:
    """Per batch: ratio of best step times, and the median and range of the
    round-by-round ratios (each round's two runs were made back to back)."""
    out = {}
    for a, b in zip(base, other, strict=True):
        ratios = sorted(x / y for x, y in zip(a["round_step_ms"], b["round_step_ms"], strict=True))
        out[str(a["batch"])] = {
            "best": a["decode_step_ms"] / b["decode_step_ms"],
            "median_of_rounds": ratios[len(ratios) // 2],
            "min_of_rounds": ratios[0],
            "max_of_rounds": ratios[-1],
        }
    return out


def prepare_models(readme: Path | None, dense: Path | None = None) -> tuple[Path, Path]:
    from vllm_readme.checkpoint.tiny import build_random_readme_like
    from vllm_readme.refactor.pipeline import export_dense

    dense = dense or ROOT / "models" / "smollm2-dense"
    if not (dense / "config.json").is_file():
        print(f"[decode] exporting dense SmolLM2 to {dense}")
        export_dense(None, dense)
    if readme is None:
        readme = ROOT / "models" / "smollm2-shapes-readme"
        if not (readme / "config.json").is_file():
            print(f"[decode] building a random Read-ME with SmolLM2's shapes at {readme}")
            build_random_readme_like(dense, readme)
    return dense, readme


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for dtype, style in (("bfloat16", "-"), ("float32", "--")):
        for name, color in (
            ("dense (stock vLLM)", "#4c72b0"),
            ("Read-ME (plugin)", "#dd8452"),
            ("Read-ME via FusedMoE", "#999999"),
        ):
            rows = results["runs"].get(f"{name} {dtype}")
            if not rows:
                continue
            batches = [r["batch"] for r in rows]
            for ax, metric in zip(axes, ("decode_tokens_per_s", "roofline_fraction"), strict=True):
                ax.plot(batches, [r[metric] for r in rows], style, color=color, marker="o", label=f"{name}, {dtype}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent sequences)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].set_title("decode throughput")
    fig.suptitle(results["machine"], fontsize=8)
    axes[1].set_ylabel("fraction of weight-read roofline")
    axes[1].set_title(f"measured bandwidth {results['bandwidth_gbs']:.1f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: batch 1 and 4, 8 new tokens, one round, native dtype"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--dtypes",
        nargs="+",
        help="serving dtypes: auto, bf16/bfloat16, fp32/float32 (default: auto, the machine's native choice: "
        "bf16 on a GPU with bf16 or a CPU with AVX512-BF16/AMX, else fp32)",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--eager", action="store_true", help="disable torch.compile (default: vLLM's default)")
    parser.add_argument("--readme", type=Path, help="Read-ME checkpoint (default: random weights, SmolLM2 shapes)")
    parser.add_argument("--dense", type=Path, help="dense HF folder (default: SmolLM2-135M exported from GGUF)")
    parser.add_argument("--rounds", type=int, default=3, help="engines take turns this many times; best kept")
    parser.add_argument(
        "--no-fused-moe-baseline", action="store_true", help="skip the Read-ME engine forced onto vLLM's FusedMoE layer"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.new_tokens, args.rounds = [1, 4], 8, 1
    from vllm_readme.precision import machine_description, read_machine, resolve_precision

    machine = read_machine()
    native = resolve_precision("auto", machine=machine)
    # vLLM's spelling, each dtype once, in the order asked
    args.dtypes = list(dict.fromkeys(resolve_precision(d, machine=machine).vllm_dtype for d in args.dtypes or ["auto"]))
    dense, readme = prepare_models(args.readme, args.dense)
    bandwidth = measure_bandwidth_gbs()
    results = {
        "machine": machine_description(machine, native),
        "dtypes": args.dtypes,
        "bandwidth_gbs": bandwidth,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "resident_weight_params": {"dense": resident_weight_params(dense), "readme": resident_weight_params(readme)},
        "runs": {},
    }
    print(f"[decode] memory read bandwidth {bandwidth:.1f} GB/s")
    configs = {
        "dense": json.loads((dense / "config.json").read_text()),
        "readme": json.loads((readme / "config.json").read_text()),
    }
    variants = [("dense (stock vLLM)", dense, "dense", {}), ("Read-ME (plugin)", readme, "readme", {})]
    if not args.no_fused_moe_baseline:
        # The same model through vLLM's FusedMoE layer: what the direct CPU
        # kernel call (vllm_readme/model_executor/kernels.py) wins.
        variants.append(("Read-ME via FusedMoE", readme, "readme", {"VLLM_README_ROUTED_KERNEL": "fused_moe"}))
    max_len = args.prompt_tokens + args.new_tokens + 8
    for dtype in args.dtypes:
        width = 2 if dtype in ("bfloat16", "float16") else 4
        engines = [
            Engine(label, model, dtype, max(args.batches), max_len, args.eager, env)
            for label, model, _, env in variants
        ]
        try:
            for engine in engines:
                engine.wait_ready()
            print(f"[decode] {dtype}: {len(engines)} engines ready; measuring in turns, {args.rounds} round(s)")
            measured = measure_interleaved(engines, args.batches, args.new_tokens, args.prompt_tokens, args.rounds)
        finally:
            for engine in engines:
                engine.close()
        for label, _, kind, _ in variants:
            rows = measured[label]
            for row in rows:
                step_bytes = weight_bytes_per_step(configs[kind], row["batch"], width, kind == "readme")
                row["weight_bytes_per_step"] = step_bytes
                row["roofline_fraction"] = step_bytes / (row["decode_step_ms"] / 1000) / (bandwidth * 1e9)
                print(
                    f"[decode] {label:20s} {dtype:8s} batch {row['batch']:3d}: {row['decode_tokens_per_s']:8.1f} tok/s, "
                    f"{row['decode_step_ms']:7.2f} ms/step, {row['roofline_fraction']:.0%} of roofline"
                )
            results["runs"][f"{label} {dtype}"] = rows
    for dtype in args.dtypes:
        d, r = results["runs"][f"dense (stock vLLM) {dtype}"], results["runs"][f"Read-ME (plugin) {dtype}"]
        results.setdefault("speedup_readme_over_dense", {})[dtype] = paired_speedup(d, r)
        f = results["runs"].get(f"Read-ME via FusedMoE {dtype}")
        if f:
            results.setdefault("speedup_direct_kernel_over_fused_moe", {})[dtype] = paired_speedup(f, r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    for key, what in (
        ("speedup_readme_over_dense", "Read-ME over dense"),
        ("speedup_direct_kernel_over_fused_moe", "direct kernel over FusedMoE"),
    ):
        for dtype, per_batch in results.get(key, {}).items():
            for batch, v in per_batch.items():
                print(
                    f"[decode] {what:28s} {dtype:8s} batch {batch:>3s}: best {v['best']:.2f}x, rounds: median "
                    f"{v['median_of_rounds']:.2f}x [{v['min_of_rounds']:.2f}-{v['max_of_rounds']:.2f}]"
                )
    print(f"[decode] wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
