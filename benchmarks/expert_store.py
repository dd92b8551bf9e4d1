# SPDX-License-Identifier: Apache-2.0
"""What one expert page costs to bring into the pool, and the bound it sets.

For a Read-ME checkpoint: bytes of one page (one expert of one layer) and of
one expert across all layers, then the time to read pages from the
checkpoint with the page cache bypassed (O_DIRECT; backing store
"checkpoint" of docs/expert_cache.md) and to convert and pack them into the
CPU grouped GEMM's layout; then what serving does (backing store "disk", the
CPU default): the pages written packed to a page file, each read with one
O_DIRECT preadv straight into a page-aligned slot, at random and in a
layer's order, and by 1, 2 and 4 readers at once; and, for comparison, a
page copied within RAM. From these:
the load time of one expert across all layers, which is what a step pays per
missed expert with no prefetch (the bound the serving figures are judged
against). Results: benchmarks/results/expert_store.json.

    python benchmarks/expert_store.py --model models/smollm2-readme
    python benchmarks/expert_store.py --model models/smollm2-readme-v1 \
        --out benchmarks/results/expert_store_large_experts.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-readme")
    parser.add_argument("--pages", type=int, default=120, help="random pages read per measurement")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="the pool's dtype")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of page-file reads (median and best)")
    parser.add_argument(
        "--readers", type=int, nargs="+", default=[1, 2, 4], help="concurrent page-file readers to compare"
    )
    parser.add_argument("--isa", default="vec", help="the grouped GEMM's packing (the engine logs its isa)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expert_store.json")
    args = parser.parse_args()
    if min(args.readers) < 1:
        parser.error(f"--readers {args.readers}: every count of concurrent readers must be >= 1")

    from vllm_readme.checkpoint.io import load_readme_config
    from vllm_readme.experts.loader import _writable_view
    from vllm_readme.experts.store import DiskExpertStore, PageFileStore
    from vllm_readme.model_executor.kernels import pack_expert_page
    from vllm_readme.precision import machine_description, resolve_precision

    torch.set_num_threads(1)  # as the serving worker runs (vLLM reduces its torch threads to 1 on 2 cores)
    precision = resolve_precision(args.dtype)
    dtype = torch.bfloat16 if precision.vllm_dtype == "bfloat16" else torch.float32
    config = load_readme_config(args.model)
    layers, experts = config.num_hidden_layers, config.num_experts
    store = DiskExpertStore(args.model, layers, experts)
    gate, _, _ = store.read(0, 0)
    channels, hidden = gate.shape
    padded = -(-channels // 32) * 32
    w13_like = torch.zeros((1, 2 * padded, hidden), dtype=dtype)
    w2_like = torch.zeros((1, hidden, padded), dtype=dtype)
    pool_page_bytes = w13_like[0].nbytes + w2_like[0].nbytes
    rng = random.Random(0)
    pages = [(rng.randrange(layers), rng.randrange(experts)) for _ in range(args.pages)]

    def timed(fn) -> float:
        fn(pages[0])  # imports and first-call set-up are not per-page costs
        start = time.perf_counter()
        for page in pages:
            fn(page)
        return (time.perf_counter() - start) / len(pages)

    read_s = timed(lambda p: store.read(*p))
    read_pack_s = timed(lambda p: pack_expert_page(*store.read(*p), w13_like, w2_like, args.isa))
    src = torch.randn((64, *w13_like.shape[1:])).to(dtype)
    dst = torch.empty_like(src[0])
    copy_s = timed(lambda p: dst.copy_(src[p[1] % 64]))
    disk_page_bytes = store.page_nbytes()
    # The serving path (backing store "disk"): pages already packed in a page
    # file, each read with one O_DIRECT preadv straight into a page-aligned
    # slot (ExpertLoader.load, vllm_readme/experts/loader.py), in the order a layer's prefetch reads them.
    page_file = PageFileStore(
        lambda layer, expert: tuple(
            t.clone() for t in pack_expert_page(*store.read(layer, expert), w13_like, w2_like, args.isa)
        ),
        layers,
        experts,
    )
    slot_w13, slot_w2 = page_slot(page_file)
    direct_into = page_file.reads_into(slot_w13, slot_w2)
    buffers = (_writable_view(slot_w13), _writable_view(slot_w2))
    read_page = (lambda p: page_file.read_into(*p, buffers)) if direct_into else (lambda p: page_file.packed(*p))
    # A shared machine's disk rate moves between runs a minute apart:
    # several rounds, the median and the best (the best is what a bound uses).
    page_file_rounds = [timed(read_page) for _ in range(args.rounds)]
    page_file_s = statistics.median(page_file_rounds)
    pages[:] = sorted(pages)
    page_file_layer_order_s = statistics.median(timed(read_page) for _ in range(args.rounds))
    # More readers at once (the cache has one loader thread): an NVMe disk
    # needs several requests in flight to reach its bandwidth; a virtual or
    # throttled disk may not. Rounds interleave the reader counts.
    readers_gb_s: dict[int, list[float]] = {n: [] for n in args.readers}
    if not direct_into:
        print("[expert_store] pages cannot be read straight into slots here: no concurrent-reader comparison")
    else:
        rng.shuffle(pages)
        for _ in range(args.rounds):
            for n in args.readers:
                readers_gb_s[n].append(page_file.record * len(pages) / concurrent_reads(page_file, pages, n) / 1e9)
    page_file.close()
    result = {
        "machine": machine_description(precision=precision),
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model),
        "checkpoint_dtype": str(store.tensors[0, "gate_proj"].dtype),
        "pool_dtype": str(dtype),
        "o_direct": store.direct,
        "expert_channels": channels,
        "page_bytes_on_disk": disk_page_bytes,
        "page_bytes_in_pool": pool_page_bytes,
        "expert_all_layers_bytes_in_pool": pool_page_bytes * layers,
        "all_experts_bytes_in_pool": pool_page_bytes * layers * experts,
        "read_ms_per_page": 1000 * read_s,
        "read_gb_per_s": disk_page_bytes / read_s / 1e9,
        "read_and_pack_ms_per_page": 1000 * read_pack_s,
        "ram_copy_ms_per_page": 1000 * copy_s,
        "ram_copy_gb_per_s": pool_page_bytes / copy_s / 1e9,
        "load_ms_per_expert_all_layers": 1000 * read_pack_s * layers,
        "page_file_direct_into_slot": direct_into,
        "page_file_read_ms_per_page": 1000 * page_file_s,
        "page_file_read_gb_per_s": page_file.record / page_file_s / 1e9,
        "page_file_read_gb_per_s_layer_order": page_file.record / page_file_layer_order_s / 1e9,
        "page_file_read_ms_per_page_rounds": [1000 * t for t in page_file_rounds],
        "page_file_read_gb_per_s_best": page_file.record / min(page_file_rounds) / 1e9,
        "page_file_load_ms_per_expert_all_layers": 1000 * page_file_s * layers,
        "page_file_read_gb_per_s_by_readers": {
            n: {"median": statistics.median(v), "rounds": v} for n, v in readers_gb_s.items() if v
        },
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def page_slot(page_file) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot's (w13, w2) in page-aligned memory, as the cache's pool holds them."""
    from vllm_readme.experts.loader import _pool_tensor

    cpu = torch.device("cpu")
    return (
        _pool_tensor((1, *page_file.w13_shape), page_file.dtype, cpu)[0],
        _pool_tensor((1, *page_file.w2_shape), page_file.dtype, cpu)[0],
    )


def concurrent_reads(page_file, pages: list[tuple[int, int]], readers: int) -> float:
    """Seconds for ``readers`` threads to read ``pages`` (split evenly), each
    into its own page-aligned slot, as the loader reads."""
    import threading

    from vllm_readme.experts.loader import _writable_view

    def read(share, views):
        for page in share:
            page_file.read_into(*page, views)

    slots = [page_slot(page_file) for _ in range(readers)]
    views = [(_writable_view(w13), _writable_view(w2)) for w13, w2 in slots]
    threads = [threading.Thread(target=read, args=(pages[i::readers], views[i])) for i in range(readers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
