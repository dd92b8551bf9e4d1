# SPDX-License-Identifier: Apache-2.0
"""The paged expert cache: pool bookkeeping (plain Python, property test) and
the pool inside real in-process vLLM engines (greedy outputs identical at
every pool size and policy, the start-up refusal, bad options)."""

from __future__ import annotations

import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, greedy_outputs, vllm_engine

from vllm_readme.experts.eviction import EVICTION_POLICIES, make_policy
from vllm_readme.experts.pool import PagePool, PoolTooSmall


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_pool_bookkeeping_holds_under_random_workload(policy):
    """A long random mix of pins, allocations, finished and cancelled loads
    over (layer, expert) pages: the invariants hold after every operation,
    a pinned or loading page is never evicted, and a full pool of pinned
    pages refuses instead of evicting."""
    rng = random.Random(policy)
    future = {}
    pool = PagePool(7, make_policy(policy, next_use=lambda page, clock: future.get(page, float("inf")), seed=1))
    pages = [(layer, expert) for layer in range(4) for expert in range(5)]
    refused = evictions = 0
    for clock in range(5000):
        for page in pages:
            future[page] = clock + rng.randint(1, 40)
        pinned = set(rng.sample(sorted(pool.slot_of), k=min(len(pool.slot_of), rng.randint(0, 4))))
        pool.pin(pinned)
        loading_before = set(pool.loading)
        page = rng.choice(pages)
        action = rng.random()
        if page in pool.slot_of:
            if page in pool.loading:
                (pool.loaded if action < 0.8 else pool.cancel)(page)
            else:
                pool.touch(page, clock)
        elif action < 0.5:
            try:
                slot, evicted = pool.allocate(page, clock, loading=action < 0.3)
            except PoolTooSmall:
                refused += 1
                assert all(p in pinned or p in pool.loading for p in pool.slot_of)
            else:
                assert pool.page_in[slot] == page
                if evicted is not None:
                    evictions += 1
                    assert evicted not in pinned and evicted not in loading_before
        else:
            # A layer's worth at once (the cache's path), pinned as the cache pins them.
            wanted = [p for p in rng.sample(pages, k=rng.randint(1, 4)) if p not in pool.slot_of]
            pool.pin(pinned | set(wanted))
            got = pool.allocate_many(wanted, clock, loading=action < 0.7)
            assert [p for p, _, _ in got] == wanted[: len(got)]
            if len(got) < len(wanted):
                refused += 1
                assert all(p in pool.pinned or p in pool.loading for p in pool.slot_of)
            for p, slot, evicted in got:
                assert pool.page_in[slot] == p
                if evicted is not None:
                    evictions += 1
                    assert evicted not in pinned and evicted not in loading_before and evicted not in wanted
        pool.check()
    assert evictions > 1000 and refused > 0


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_victims_in_one_pass_are_the_victims_one_by_one(policy):
    """The pool chooses a layer's victims in one pass (``victims``); they
    must be the experts, in the order, that one ``victim`` call per load
    would evict, ties included (many keys tie: Belady's "no known use",
    LFU's equal counts)."""
    rng = random.Random(policy)
    future = {}

    def make():
        chosen = make_policy(policy, next_use=lambda page, clock: future.get(page, float("inf")), seed=3)
        for clock in range(60):
            chosen.touch(rng.randrange(12), clock)
        return chosen

    for trial in range(50):
        future = {e: 60 + rng.randint(1, 5) for e in range(12) if rng.random() < 0.5}
        state = rng.getstate()
        one_pass, one_by_one = make(), (rng.setstate(state), make())[1]
        candidates = rng.sample(range(16), k=rng.randint(1, 16))  # 12-15 never used: keys tie
        count = rng.randint(1, len(candidates) + 2)
        expected, left = [], list(candidates)
        while left and len(expected) < count:
            expected.append(one_by_one.victim(left, set(), 60))
            left.remove(expected[-1])
        assert one_pass.victims(candidates, 60, count) == expected, f"trial {trial}"


def test_pool_refuses_when_every_page_is_pinned():
    pool = PagePool(2, make_policy("lru"))
    pool.allocate((0, 0), 0)
    pool.allocate((0, 1), 0)
    pool.pin({(0, 0), (0, 1)})
    with pytest.raises(PoolTooSmall, match="pinned"):
        pool.allocate((1, 0), 1)
    pool.check()


def generate(model, **overrides) -> tuple[list[list[int]], dict | None]:
    return greedy_outputs(model, _cache_stats, **overrides)


def _cache_stats(model):
    cache = getattr(model.model, "expert_cache", None)
    if cache is None:
        return None
    cache.pool.check()
    stats = cache.total.summary()
    stats["pages"] = cache.pool.capacity
    stats["store"] = cache.store.kind
    stats["direct"] = getattr(cache.store, "direct", None)
    stats["streamed"] = cache.streamed  # loaded without ever holding every expert
    stats["read_into_slots"] = cache.slot_buffers is not None  # page file reads land in the slot
    stats["plan"] = None if cache.next_plan is None else sorted(cache.next_plan)
    stats["plan_seq"] = cache.plan.last_seq
    return stats


@pytest.fixture(scope="module")
def resident_outputs(tiny_gqa):
    outputs, stats = generate(tiny_gqa)
    assert stats is None  # no pool by default
    return outputs


# The tiny model: 2 layers x 4 experts = 8 pages; a step may need all 4 of a layer.
@pytest.mark.parametrize("policy", EVICTION_POLICIES)
@pytest.mark.parametrize("pool", ["4", "75%", "50%"])  # all 8 pages, 6, the minimum 4
def test_greedy_outputs_identical_at_every_pool_size(tiny_gqa, resident_outputs, policy, pool):
    outputs, stats = generate(tiny_gqa, additional_config={"vllm_readme": {"expert_pool": pool, "eviction": policy}})
    assert outputs == resident_outputs
    assert stats["pages"] == {"4": 8, "75%": 6, "50%": 4}[pool]
    assert stats["store"] == "disk" and stats["direct"] is True
    assert stats["streamed"], "with pages on disk the model must load without holding every expert"
    assert stats["read_into_slots"], "the tiny model's pages are block-aligned: loads must read into their slot"
    if pool == "4":
        assert stats["misses"] == 0 and stats["prefetched"] == 0
    else:  # a pool smaller than the model must have loaded experts
        assert stats["misses"] + stats["prefetched"] > 0 and stats["bytes_loaded"] > 0
    assert stats["hits"] > 0


@pytest.mark.parametrize(
    "options",
    [
        {"prefetch": False},
        {"backing_store": "checkpoint"},
        {"backing_store": "memory"},
        {"backing_store": "memory", "prefetch": False},
        {"prefetch_layers": 1},
    ],
    ids=["disk-no-prefetch", "checkpoint", "memory", "memory-no-prefetch", "prefetch-one-layer-ahead"],
)
def test_greedy_outputs_identical_other_stores(tiny_gqa, resident_outputs, options):
    outputs, stats = generate(tiny_gqa, additional_config={"vllm_readme": {"expert_pool": "50%", **options}})
    assert outputs == resident_outputs
    assert stats["store"] == options.get("backing_store", "disk")
    if stats["store"] != "memory":
        assert stats["direct"] is True  # O_DIRECT on this file system
    assert stats["streamed"] == (stats["store"] != "memory")
    if options.get("prefetch") is False:
        assert stats["prefetched"] == 0 and stats["misses"] > 0


def test_with_expert_aware_scheduler(tiny_gqa, resident_outputs):
    """The scheduler publishes its plan (its candidates' routes) to the cache
    in the same process; outputs stay the model's."""
    outputs, stats = generate(
        tiny_gqa,
        scheduler_cls="vllm_readme.scheduler.ExpertAwareScheduler",
        additional_config={"vllm_readme": {"expert_pool": "50%", "log_every": 0}},
    )
    assert outputs == resident_outputs
    assert stats["plan"] and stats["plan_seq"] > 10  # a plan was read at the steps' start


def test_scheduler_reads_the_caches_residency(tiny_gqa):
    """The other direction: the cache publishes which experts are resident in
    every layer and what loading one costs; the scheduler's cost model reads
    them (the in-process engine's scheduler is inspected directly)."""
    from vllm import SamplingParams

    with vllm_engine(
        tiny_gqa,
        max_num_seqs=4,
        scheduler_cls="vllm_readme.scheduler.ExpertAwareScheduler",
        additional_config={"vllm_readme": {"expert_pool": "50%", "prefetch": False, "log_every": 0}},
    ) as llm:
        # The last request runs alone for its last steps: one expert, a
        # working set of 2 pages that the pool of 4 holds.
        params = [
            SamplingParams(temperature=0, max_tokens=24 + 16 * (i == len(PROMPTS) - 1)) for i in range(len(PROMPTS))
        ]
        llm.generate(PROMPTS, params, use_tqdm=False)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        resident, load_ms = scheduler.readme_last_residency
        cache = llm.apply_model(
            lambda model: (
                model.model.expert_cache.resident_experts(),
                model.model.expert_cache.stall_per_load_ms,
                len(model.model.expert_cache.step_experts),
            )
        )[0]
    cache_resident, stall_per_load, step_experts = cache
    # 4 pages = half of 2 layers x 4 experts: at most 2 experts in both layers.
    assert len(resident) <= 2 and resident <= set(range(4)) and len(cache_resident) <= 2
    # A load is charged at what loads cost the steps (demand loads: prefetch
    # is off) while the pool holds a step's pages; the last step's did.
    assert step_experts * 2 <= 4 and stall_per_load > 0
    # (the running mean may have moved by one more step since it was published)
    assert load_ms == pytest.approx(2 * stall_per_load, rel=0.2) and load_ms > 0
    cost, resident_now = scheduler._readme_residency()  # the latest the cache published
    assert cost.per_load_ms == scheduler.readme_last_residency[1] > 0 and resident_now <= set(range(4))
    assert cost.per_token_ms == scheduler.readme_cost_model.per_token_ms


def test_unequal_experts_and_compiled(tiny_mha):
    """Unequal expert widths (padding in the kernel's layout), and the pool
    under torch.compile (the custom op stays one opaque call per layer)."""
    reference, _ = generate(tiny_mha)
    eager, stats = generate(tiny_mha, additional_config={"vllm_readme": {"expert_pool": "1.5"}})
    assert eager == reference and stats["pages"] == 4  # 1.5 x 3 layers = 4.5 -> 4 of 9 pages (minimum 3)
    compiled, stats = generate(tiny_mha, enforce_eager=False, additional_config={"vllm_readme": {"expert_pool": "1.5"}})
    assert compiled == reference
    assert stats["misses"] + stats["prefetched"] > 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"expert_pool": "1"}, r"gives 2 expert pages .* needs at least 4 pages .* \"50%\""),
        ({"expert_pool": "lots"}, "cannot read 'lots'"),
        ({"expert_pool": "0%"}, r"must be in \(0%, 100%\]"),
        ({"eviction": "mru"}, "unknown policy 'mru'"),
        ({"backing_store": "nvme"}, "'nvme' is not one of"),
        ({"prefetch": "maybe"}, "prefetch: expected bool"),
        ({"prefetch_layers": 0}, r"prefetch_layers must be >= 1 .* \"prefetch\": false"),
        ({"expert_pool": "nan"}, r"expert_pool: cannot read 'nan'"),
        ({"expert_pool": "1.2.3MiB"}, r"expert_pool: cannot read '1\.2\.3MiB'"),
        ({"expert_pool": "1KiB"}, r"expert_pool='1KiB' gives 1 expert pages .*\(expert_pool >= \"[0-9.]+KiB\","),
        ({"prefetch_layers": 2.5}, r"prefetch_layers: expected int"),
    ],
)
def test_bad_cache_options_fail_at_start(tiny_gqa, options, message):
    with pytest.raises(Exception, match=message):
        with vllm_engine(tiny_gqa, additional_config={"vllm_readme": options}):
            pass


def test_pool_size_forms():
    from vllm_readme.options import ExpertCacheOptions

    def pages(text):
        return ExpertCacheOptions(expert_pool=text).validated().pool_size().pages(30, 8, page_bytes=2**20)

    assert ExpertCacheOptions().pool_size() is None and ExpertCacheOptions(expert_pool="100%").pool_size() is None
    assert pages("25%") == 60 and pages("2") == 60 and pages("60MiB") == 60 and pages("1GiB") == 240


def _read_plan_in_child(queue):
    from vllm_readme.experts.plan import PlanReader

    reader = PlanReader(num_experts=8)
    queue.put((reader.read(), reader.last_seq))
    reader.publish_residency({0, 5}, 12.5)
    # The model's routes by KV slot and position.
    reader.publish_routes(struct.pack("<3q", 7, 40, 2**40), struct.pack("<3i", 5, 0, 70000), bytes([3, 0, 5]))
    reader.close()


def test_plan_crosses_processes():
    """The scheduler's plan reaches a cache in a child process (vllm serve:
    engine core -> worker), the cache's residency comes back, and the writer
    removes the file on close."""
    import multiprocessing

    from vllm_readme.experts.plan import PlanReader, PlanWriter

    assert PlanReader(8).read() is None  # nothing published: no plan, no error
    writer = PlanWriter(num_experts=8)
    try:
        assert writer.residency() is None  # the cache has not run a step yet
        writer.publish({6, 1})
        writer.publish({1, 3})
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_read_plan_in_child, args=(queue,))
        child.start()
        child.join(30)
        assert queue.get(timeout=5) == (frozenset({1, 3}), 2)
        assert writer.residency() == (frozenset({0, 5}), 12.5)  # and back: the cache's residency
        assert writer.model_routes() == ((7, 40, 2**40), (5, 0, 70000), bytes([3, 0, 5]))  # and the model's routes
        assert writer.model_routes() is None  # read once
    finally:
        writer.close()
    assert not writer.path.exists()


def test_loads_are_charged_to_the_scheduler_only_while_the_pool_keeps_a_steps_pages():
    """Below a step's working set a load that holding a request back would
    avoid only moves to the next step, so the cache publishes a load cost of
    0; once the step's pages fit, it publishes what loads cost its layers."""
    from vllm_readme.experts.cache import ExpertCache
    from vllm_readme.options import ExpertCacheOptions

    layers, experts = 2, 4
    gen = torch.Generator().manual_seed(0)
    w13 = [torch.randn(experts, 8, 16, generator=gen) for _ in range(layers)]
    w2 = [torch.randn(experts, 16, 4, generator=gen) for _ in range(layers)]
    cache = ExpertCache(
        w13_layers=w13,
        w2_layers=w2,
        slot_table=torch.zeros((layers, experts), dtype=torch.int32),
        pages=6,
        options=ExpertCacheOptions(expert_pool="6", eviction="lru", prefetch=False, backing_store="memory"),
        checkpoint=None,
        isa="vec",
        log_every=0,
    )
    published = []  # what reaches the scheduler's plan file at each step's end
    cache.plan.publish_residency = lambda resident, load_ms: published.append(load_ms)
    try:
        for step_experts in ([0, 1, 2, 3], [0, 1, 2, 3], [1], [1], [1]):
            for layer in range(layers):
                cache.layer_slots(layer, torch.tensor(step_experts))
        cache.pool.check()
    finally:
        cache.close()
    # Steps 1-2 touch 4 experts x 2 layers = 8 pages > 6: nothing charged,
    # though they loaded; steps 3-4 touch 2 pages: charged, at the layers'
    # wait per page loaded times the layers.
    assert cache.total.misses > 0 and cache.stall_per_load_ms > 0
    assert published[:2] == [0.0, 0.0]
    assert published[3] == pytest.approx(layers * cache.stall_per_load_ms) and published[3] > 0


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
@pytest.mark.parametrize("prefetch_layers", [1, 2, 5, 9])
def test_deeper_prefetch_at_the_minimum_pool_reads_the_right_experts(prefetch_layers, policy):
    """A prefetch reaching past the next layer holds slots while it loads:
    the last layer's prefetch loads the next step's first layers for the
    experts it expected. When the step routes elsewhere, layer 0 at the
    minimum pool must still get its slots (the loads land first), and every
    token must read its own expert's weights in every layer. Slow loads
    keep the prefetches in flight; steps switch between one expert and all."""
    from vllm_readme.experts.cache import ExpertCache
    from vllm_readme.options import ExpertCacheOptions

    layers, experts = 6, 4
    gen = torch.Generator().manual_seed(1)
    w13 = [torch.randn(experts, 8, 16, generator=gen) for _ in range(layers)]
    w2 = [torch.randn(experts, 16, 4, generator=gen) for _ in range(layers)]
    options = ExpertCacheOptions(
        expert_pool=str(experts), eviction=policy, backing_store="memory", prefetch_layers=prefetch_layers
    )
    cache = ExpertCache(
        w13_layers=w13,
        w2_layers=w2,
        slot_table=torch.zeros((layers, experts), dtype=torch.int32),
        pages=experts,  # the minimum: one layer's experts
        options=options.validated(),
        checkpoint=None,
        isa="vec",
        log_every=0,
    )
    read = cache.store.packed
    cache.store.packed = lambda layer, expert: (time.sleep(0.004), read(layer, expert))[1]  # loads stay in flight
    rng = random.Random(0)
    try:
        for step in range(16):
            one = rng.randrange(experts)
            expert_ids = torch.tensor([one] * 3 if step % 2 == 0 else list(range(experts)) * 2)
            for layer in range(layers):
                slots = cache.layer_slots(layer, expert_ids).view(-1)
                for expert, slot in zip(expert_ids.tolist(), slots.tolist(), strict=True):
                    assert torch.equal(cache.w13[slot], w13[layer][expert]), (layer, expert, slot)
                    assert torch.equal(cache.w2[slot], w2[layer][expert]), (layer, expert, slot)
            cache.pool.check()
    finally:
        cache.close()
    assert cache.total.prefetched > 0


def test_route_log_records_every_step_as_the_model_routed_it(tiny_gqa, tmp_path, monkeypatch):
    """``VLLM_README_ROUTE_LOG`` (what benchmarks/expert_cache_bound.py
    replays to bound the cache) writes one line per engine step with the
    step's distinct experts: the same steps and experts as the routes the
    model computed, recorded beside it in the worker."""
    from conftest import start_route_trace, take_route_trace
    from vllm import SamplingParams

    log = tmp_path / "routes.log"
    monkeypatch.setenv("VLLM_README_ROUTE_LOG", str(log))
    with vllm_engine(tiny_gqa, max_num_seqs=4) as llm:
        llm.apply_model(start_route_trace)
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        trace = llm.apply_model(take_route_trace)[0]
    logged = [[int(e) for e in line.split()] for line in log.read_text().splitlines()]
    expected = [sorted(set(expert_ids.tolist())) for _, expert_ids in trace]
    assert len(expected) >= 12, "the run must span many steps"
    assert logged[-len(expected) :] == expected  # earlier lines: the engine's warm-up steps
    assert any(len(step) > 1 for step in expected), "steps must mix experts for the test to mean anything"


def test_page_dir_option_is_checked_and_read_from_the_environment(tmp_path):
    from vllm_readme.options import ExpertCacheOptions, ReadMEOptionsError

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ReadMEOptionsError, match=rf"page_dir: {not_a_folder} is not a folder"):
        ExpertCacheOptions(page_dir=str(not_a_folder / "pages")).validated()
    later = tmp_path / "made" / "at" / "start"
    assert ExpertCacheOptions(page_dir=str(later)).validated().page_dir == str(later)
    assert not later.exists()  # checking creates nothing
    options = ExpertCacheOptions.from_additional_config({}, env={"VLLM_README_PAGE_DIR": str(tmp_path)})
    assert options.page_dir == str(tmp_path)


def test_a_page_file_on_tmpfs_is_written_with_a_warning(tmp_path):
    """A page-file folder in memory works (read back exactly) but warns:
    the whole expert set would sit in RAM. Nothing stays in the folder."""
    import logging
    import tempfile

    from vllm_readme.experts.store import PageFileStore, file_system_type

    if file_system_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.vllm_readme.experts.store")
    logger.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
            pages = {(layer, expert): torch.randn(2, 1024) for layer in range(2) for expert in range(3)}
            store = PageFileStore(lambda layer, expert: (pages[layer, expert], pages[layer, expert][0]), 2, 3, folder)
            for (layer, expert), w13 in pages.items():
                got13, got2 = store.packed(layer, expert)
                assert torch.equal(got13, w13) and torch.equal(got2, w13[0])
            assert os.listdir(folder) == []
            store.close()
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert store.file_system == "tmpfs"
    assert any("is on tmpfs, i.e. in memory" in w and "page_dir" in w for w in warnings), warnings
    assert not any("replaced or deleted" in w for w in warnings), "its writer unlinks the page file on purpose"
