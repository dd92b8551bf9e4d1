"""`make demo`: build a Read-ME model, generate with vllm.LLM, then serve it
with `vllm-readme serve` and ask it through the OpenAI client.

Default model: a tiny random Read-ME checkpoint (built locally in seconds),
which proves the plumbing, not the quality. Pass --model PATH to use another.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_default(out: Path) -> Path:
    if (out / "config.json").is_file():
        print(f"[demo] using cached model at {out}")
        return out
    from vllm_readme.checkpoint.tiny import build_tiny_checkpoint

    print(f"[demo] building a tiny random Read-ME checkpoint at {out}")
    return build_tiny_checkpoint(out)


def generate_offline(model: Path, prompts: list[str]) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), max_model_len=512, kv_cache_memory_bytes=256 << 20, enforce_eager=True)
    for out in llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0)):
        print(f"[offline] {out.prompt!r} -> {out.outputs[0].text!r}")
    del llm


def serve_and_ask(model: Path, prompt: str) -> None:
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "vllm-readme"), "serve", str(model), "--port", str(port),
           "--host", "127.0.0.1", "--max-model-len", "512", "--served-model-name", "readme", "--enforce-eager"]
    print("[serve] " + " ".join(cmd))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; run the command above to see why")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        chat = client.chat.completions.create(
            model="readme", messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=0.0
        )
        print(f"[serve] chat: {prompt!r} -> {chat.choices[0].message.content!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Read-ME checkpoint folder (default: build one)")
    parser.add_argument("--no-serve", action="store_true", help="skip the OpenAI-server part")
    args = parser.parse_args()
    model = args.model or build_default(ROOT / "models" / "tiny-readme")
    generate_offline(model, ["The capital of France is", "Write a haiku about the sea."])
    if not args.no_serve:
        serve_and_ask(model, "What is the capital of France?")


if __name__ == "__main__":
    main()
