# SPDX-License-Identifier: Apache-2.0
"""What the routes of each engine step look like, as Prometheus metrics.

Read-ME's serving argument (paper §4) is about how many distinct experts a
batch touches: every distinct expert is one more set of weights to read (or
to load into an expert cache). The model reports, per forward step:

* ``vllm_readme:unique_experts_per_step`` (histogram): distinct experts among
  the step's tokens (the paper's "unique experts per batch");
* ``vllm_readme:routed_tokens_total`` (counter, label ``expert``): tokens
  routed to each expert (load balance).

The model runs in vLLM's engine-core process; the OpenAI server exports
``/metrics`` from its own process. ``vllm-readme serve`` therefore sets
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multi-process mode, which
vLLM's server already reads through ``get_prometheus_registry``) so these
metrics appear beside vLLM's. Deltas between two scrapes give a workload's
figures; engine warm-up steps are counted too, so never read absolutes.

Every metric carries vLLM's own ``engine`` label: the data-parallel rank.
Each rank is an engine with processes of its own, and the multi-process
export sums a metric over processes that share its labels, so without it
the ranks' figures would add up into one series.

On CPU the counts are read at once (a few microseconds). On a GPU they are
accumulated on the device and copied to the host every ``flush_every``
steps, so the step itself never waits for the host.

With ``VLLM_README_ROUTE_LOG=PATH`` in the engine's environment each step's
experts are also appended to PATH, one line per step (expert ids separated
by spaces): the served routes, which benchmarks/expert_cache_bound.py
replays to bound what an expert cache could do on them.
"""

from __future__ import annotations

import torch

from vllm_readme import envs

UNIQUE_EXPERTS = "vllm_readme:unique_experts_per_step"
ROUTED_TOKENS = "vllm_readme:routed_tokens"

_metrics: dict[str, object] = {}


def engine_label() -> str:
    """The ``engine`` label of this worker's metrics: its data-parallel rank
    (the rank in vLLM's DP group, which every worker joins), as on vLLM's
    own metrics; "0" outside a vLLM worker."""
    from vllm_readme.vllm_internals import data_parallel_rank

    try:
        return str(data_parallel_rank())
    except (ImportError, AssertionError):  # no vLLM, or no distributed environment
        return "0"


def _prometheus(num_experts: int):
    """One set of metric objects per process (an in-process test may build
    several engines; prometheus_client refuses a name registered twice)."""
    from prometheus_client import Counter, Histogram

    if "unique" not in _metrics:  # the cache counters (below) may have been made first
        _metrics["unique"] = Histogram(
            UNIQUE_EXPERTS,
            "Distinct experts among the tokens of one engine step (Read-ME routes)",
            ["engine"],
            buckets=[float(b) for b in range(1, max(num_experts, 64) + 1)],
        )
        _metrics["tokens"] = Counter(ROUTED_TOKENS, "Tokens routed to each expert", ["engine", "expert"])
    return _metrics["unique"], _metrics["tokens"]


class ExpertStepMetrics:
    """A route observer: call with (positions, expert_ids) of every step."""

    def __init__(self, num_experts: int, flush_every: int = 32):
        self.num_experts = num_experts
        self.flush_every = flush_every
        unique, tokens = _prometheus(num_experts)
        engine = engine_label()
        self.unique = unique.labels(engine=engine)
        self.tokens = [tokens.labels(engine=engine, expert=str(e)) for e in range(num_experts)]
        self._pending: list[torch.Tensor] = []  # GPU: per-step expert counts, not yet on the host
        path = envs.VLLM_README_ROUTE_LOG
        self.route_log = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (lives with the engine)

    def __call__(self, positions: torch.Tensor, expert_ids: torch.Tensor) -> None:
        counts = torch.bincount(expert_ids.long(), minlength=self.num_experts)
        if counts.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return
            self._pending.append(counts)
            if len(self._pending) >= self.flush_every:
                self.flush()
            return
        self._record(counts.tolist())

    def flush(self) -> None:
        if self._pending:
            rows = torch.stack(self._pending).tolist()
            self._pending.clear()
            for row in rows:
                self._record(row)

    def _record(self, counts: list[int]) -> None:
        used = 0
        for expert, n in enumerate(counts[: self.num_experts]):
            if n:
                used += 1
                self.tokens[expert].inc(n)
        if used:
            self.unique.observe(used)
        if self.route_log is not None:
            self.route_log.write(" ".join(str(e) for e, n in enumerate(counts[: self.num_experts]) if n) + "\n")


class ExpertCacheCounters:
    """The expert cache's per-step figures as Prometheus counters (same
    multi-process export as above): ``vllm_readme:expert_cache_hits``,
    ``..._misses``, ``..._prefetched``, ``..._prefetch_used``,
    ``..._loaded_bytes`` and ``..._stall_seconds`` (each ``_total``)."""

    NAMES = {  # CacheStats field -> (metric, help)
        "hits": ("hits", "Expert pages a layer found resident"),
        "misses": ("misses", "Expert pages loaded on demand (the layer waited)"),
        "prefetched": ("prefetched", "Expert page loads started ahead of use"),
        "prefetch_used": ("prefetch_used", "Prefetched expert pages that a layer then read"),
        "bytes_loaded": ("loaded_bytes", "Bytes of expert weights loaded into the pool"),
        "stall_s": ("stall_seconds", "Seconds layers waited on expert loads"),
    }

    def __init__(self):
        from prometheus_client import Counter

        if "cache" not in _metrics:
            _metrics["cache"] = {
                field: Counter(f"vllm_readme:expert_cache_{metric}", text, ["engine"])
                for field, (metric, text) in self.NAMES.items()
            }
        engine = engine_label()
        self.counters = {field: counter.labels(engine=engine) for field, counter in _metrics["cache"].items()}

    def record(self, stats) -> None:
        for field, counter in self.counters.items():
            value = getattr(stats, field)
            if value:
                counter.inc(value)


class StageSendCounters:
    """What a pipeline stage hands the next one, per forward (same export):
    ``vllm_readme:pipeline_sent_bytes_total`` (the IntermediateTensors: hidden
    states, residual and the routes) and ``vllm_readme:pipeline_sent_tokens_total``,
    counted by each stage but the last, on its first tensor-parallel rank.
    Their ratio is the bytes a token costs between stages; the least it can
    be is two hidden-state rows and one expert id."""

    def __init__(self):
        from prometheus_client import Counter

        if "stage" not in _metrics:
            _metrics["stage"] = (
                Counter(
                    "vllm_readme:pipeline_sent_bytes", "Bytes of IntermediateTensors sent to the next stage", ["engine"]
                ),
                Counter(
                    "vllm_readme:pipeline_sent_tokens",
                    "Tokens whose IntermediateTensors went to the next stage",
                    ["engine"],
                ),
            )
        engine = engine_label()
        self.bytes, self.tokens = (counter.labels(engine=engine) for counter in _metrics["stage"])

    def __call__(self, tensors: dict[str, torch.Tensor], tokens: int) -> None:
        self.bytes.inc(sum(t.nbytes for t in tensors.values()))
        self.tokens.inc(tokens)
