# SPDX-License-Identifier: Apache-2.0
"""What runs on a CUDA GPU without vLLM: the expert cache's GPU mechanics
(pool on the device, pinned host store, loads on a copy stream ordered by
events) and the refactoring pipeline on ``--device cuda``.

CI has no GPU, so these are skipped there; they run on a lent GPU machine
(docs/expert_cache.md, "GPU"), which has torch and transformers but no CUDA
build of vLLM, which is why they use no engine.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from vllm_readme.experts.cache import ExpertCache
from vllm_readme.options import ExpertCacheOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYERS, EXPERTS, HIDDEN, CHANNELS, TOKENS = 6, 8, 512, 512, 128


def _moe(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Top-1 SwiGLU experts, each token through ``w13[rows[t]]``, ``w2[rows[t]]``."""
    gate, up = torch.bmm(w13[rows], h.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
    return torch.bmm(w2[rows], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)


def _routes(steps: int, seed: int) -> list[torch.Tensor]:
    """Steps that each use 2-5 of the experts, so a half pool must load."""
    gen = torch.Generator().manual_seed(seed)
    routes = []
    for _ in range(steps):
        used = torch.randperm(EXPERTS, generator=gen)[: int(torch.randint(2, 6, (1,), generator=gen))]
        routes.append(used[torch.randint(0, len(used), (TOKENS,), generator=gen)].cuda())
    return routes


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = [torch.randn(EXPERTS, 2 * CHANNELS, HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16) / 20]
    w2 = [torch.randn(EXPERTS, HIDDEN, CHANNELS, device="cuda", generator=gen, dtype=torch.bfloat16) / 20]
    for _ in range(LAYERS - 1):
        w13.append(torch.randn_like(w13[0]) / 20)
        w2.append(torch.randn_like(w2[0]) / 20)
    return w13, w2


@pytest.mark.parametrize(
    ("eviction", "prefetch", "pages"),
    [
        *itertools.product(["belady", "lru", "lfu", "random"], [True], [EXPERTS * LAYERS // 2]),
        ("belady", True, EXPERTS),  # the minimum a step needs
        ("belady", False, EXPERTS * LAYERS // 2),
        ("lru", False, EXPERTS + 2),
    ],
)
def test_cache_on_gpu_gives_the_resident_result_while_the_device_lags(weights, eviction, prefetch, pages):
    """Every layer's output through the pool equals the resident experts'
    output bit for bit, while the host runs far ahead of the device: a spin
    kernel before each layer's experts keeps them queued while the host
    decides (and starts) the next layers' loads, so a copy that overwrote a
    slot they still read, or a layer that ran before its page arrived, would
    change the result."""
    w13_layers, w2_layers = weights
    reference_w13 = [w.clone() for w in w13_layers]
    reference_w2 = [w.clone() for w in w2_layers]
    cache = ExpertCache(
        w13_layers=w13_layers,
        w2_layers=w2_layers,
        slot_table=torch.zeros((LAYERS, EXPERTS), dtype=torch.int32, device="cuda"),
        pages=pages,
        options=ExpertCacheOptions(
            expert_pool=str(pages), eviction=eviction, prefetch=prefetch, backing_store="memory"
        ),
        checkpoint=None,
        isa="cuda",
        log_every=0,
    )
    # The hazard this test is about: a page that a queued kernel of this step
    # still reads is evicted and its slot rewritten. Count that it happens.
    used_this_step: set = set()
    hazards = []
    allocate_many = cache.pool.allocate_many

    def watched_allocate_many(pages, clock, loading=False):
        slots = allocate_many(pages, clock, loading=loading)
        hazards.extend(evicted in used_this_step for _, _, evicted in slots)
        return slots

    cache.pool.allocate_many = watched_allocate_many
    try:
        assert cache.store.w13.is_pinned() and cache.copy_stream is not None
        gen = torch.Generator(device="cuda").manual_seed(1)
        for step, expert_ids in enumerate(_routes(24, seed=pages + prefetch)):
            h = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16)
            expected, got = h.clone(), h.clone()
            for layer in range(LAYERS):
                expected = expected + _moe(expected, reference_w13[layer], reference_w2[layer], expert_ids)
            torch.cuda.synchronize()
            used_this_step.clear()
            for layer in range(LAYERS):
                slots = cache.layer_slots(layer, expert_ids).squeeze(-1).long()
                used_this_step.update((layer, e) for e in cache.step_order)
                # ~10 ms of device time before this layer's experts read the
                # pool: the host decides the next layers' loads meanwhile.
                torch.cuda._sleep(20_000_000)
                got = got + _moe(got, cache.w13, cache.w2, slots)
            torch.cuda.synchronize()
            assert torch.equal(got, expected), f"step {step}: the pool's result differs from the resident experts'"
        cache._end_step()
        stats = cache.total
        assert stats.misses + stats.prefetched > 0, "the pool never loaded a page: the test would prove nothing"
        print(
            f"\n{eviction} prefetch={prefetch} pages={pages}: {sum(hazards)} evictions of pages this step read; "
            f"{json.dumps(stats.summary())}"
        )
        if pages == EXPERTS:  # at the minimum, loads must reuse slots the step's earlier layers read
            assert sum(hazards) > 0
    finally:
        cache.close()


def test_gpu_store_refuses_the_checkpoint_store(weights):
    from vllm_readme.configuration_readme import ReadMEConfigError

    w13_layers, w2_layers = weights
    with pytest.raises(ReadMEConfigError, match='on a GPU use "memory"'):
        ExpertCache(
            w13_layers=w13_layers,
            w2_layers=w2_layers,
            slot_table=torch.zeros((LAYERS, EXPERTS), dtype=torch.int32, device="cuda"),
            pages=EXPERTS,
            options=ExpertCacheOptions(expert_pool=str(EXPERTS), backing_store="checkpoint"),
            checkpoint=None,
            isa="cuda",
        )


def test_refactor_runs_on_cuda_and_matches_the_cpu_build(tmp_path):
    """The whole pipeline with ``device="cuda"``: every stage runs there, the
    checkpoint validates, and its perplexities are those of the same build
    on the CPU within numerical noise (same seeds, fp32)."""
    from conftest import TINY_REFACTOR as TINY

    from vllm_readme.checkpoint.io import validate_checkpoint
    from vllm_readme.checkpoint.tiny import build_tiny_dense
    from vllm_readme.refactor.pipeline import RefactorOptions, refactor

    dense = build_tiny_dense(tmp_path / "dense")
    results = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        results[device] = refactor(RefactorOptions(out=out, dense=dense, device=device, dtype="fp32", **TINY))
        validate_checkpoint(out)
    report = json.loads((tmp_path / "cuda" / "refactor.json").read_text())
    assert report["precision"]["device"] == "cuda", report["precision"]
    gpu, cpu = results["cuda"], results["cpu"]
    pairs = {f"in-domain {k}": (gpu["perplexity"][k], cpu["perplexity"][k]) for k in cpu["perplexity"]}
    ood_gpu, ood_cpu = gpu["out_of_domain"]["perplexity"], cpu["out_of_domain"]["perplexity"]
    pairs |= {f"out-of-domain {k}": (ood_gpu[k], ood_cpu[k]) for k in ood_cpu}
    for name, (on_gpu, on_cpu) in pairs.items():
        print(f"\n{name}: cuda {on_gpu:.3f}, cpu {on_cpu:.3f}")
        assert abs(on_gpu / on_cpu - 1) < 0.05, (name, on_gpu, on_cpu)
