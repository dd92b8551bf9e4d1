# SPDX-License-Identifier: Apache-2.0
"""vLLM engines split over processes, as users start them: a script that
builds ``vllm.LLM`` with the parallel sizes given and prints each prompt's
greedy tokens and their logprobs, run as its own process (vLLM spawns its
workers; one core per worker on a small machine). The reference model is
the oracle of what every split must give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import load_reference

SCRIPT = r"""
import json, sys

def main():
    from vllm import LLM, SamplingParams
    spec = json.loads(sys.argv[1])
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, max_num_seqs=8, seed=0, **spec["engine"])
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True, logprobs=1)
    outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    print("RESULT " + json.dumps([
        {"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
         "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
        for o in outs]), flush=True)

if __name__ == "__main__":
    main()
"""

SCHEDULER_CLS = "vllm_readme.scheduler.ExpertAwareScheduler"


def workers_env(workers: int, **extra: str) -> dict[str, str]:
    """A multi-process engine's environment on this machine: one OpenMP core
    list per worker (vLLM's CPU workers refuse to share a NUMA node
    otherwise), workers taking turns on the cores when they outnumber them."""
    cores = os.cpu_count() or 1
    return dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
        VLLM_CPU_OMP_THREADS_BIND="|".join(str(w % cores) for w in range(workers)),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_LOGGING_LEVEL="INFO",  # the plugin's start-up lines say what each worker chose
        **extra,
    )


def run_engine(
    model: Path,
    tmp_path: Path,
    prompts: list[str],
    new_tokens: int,
    *,
    workers: int,
    env: dict[str, str] | None = None,
    timeout_s: int = 600,
    **engine,
) -> tuple[list[dict], str]:
    """Each prompt's prompt ids, greedy tokens and their logprobs from an
    engine built with ``engine`` (LLM keyword arguments), and its log (both
    streams: vLLM logs to stdout, and Ray forwards its workers' output to
    the stream it came from)."""
    script = tmp_path / "engine_script.py"
    script.write_text(SCRIPT)
    spec = {"model": str(model), "engine": engine, "prompts": prompts, "new_tokens": new_tokens}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=workers_env(workers, **(env or {})),
        timeout=timeout_s,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    return json.loads(lines[0][len("RESULT ") :]), proc.stdout + proc.stderr


def assert_matches_reference(model: Path, results: list[dict], new_tokens: int, atol: float = 5e-5) -> None:
    """Tokens equal the reference's greedy tokens; logprobs within ``atol``."""
    reference = load_reference(model)
    for result in results:
        ids = list(result["prompt_ids"])
        logprobs = []
        with torch.no_grad():
            for _ in range(new_tokens):
                lp = reference(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
                ids.append(int(lp.argmax()))
                logprobs.append(float(lp.max()))
        assert result["tokens"] == ids[len(result["prompt_ids"]) :], result
        assert max(abs(a - b) for a, b in zip(result["logprobs"], logprobs, strict=True)) < atol
