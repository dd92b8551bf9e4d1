# SPDX-License-Identifier: Apache-2.0
"""Which of the expert cache's GPU operations block the host until the device
has run everything queued (the reason the cache keeps its slot table on the
host on a GPU; vllm_readme/experts/residency.py). Each operation is timed on the
host right after ~200 ms of device work was queued: an operation that
returns in well under a millisecond did not wait.

    python benchmarks/gpu_sync_probe.py    (needs a CUDA GPU)

benchmarks/results/gpu_sync_probe.log holds one run on an H200: copies from
pinned memory, on any stream, do not wait; writing one element of a device
tensor from Python (table[(1, 2)] = 5) and the advanced-indexing gather
table[1][ids] wait for the queue. The log has no line for index_select (the
gather the cache uses); a run of this script prints it.
"""

import time

import torch


def timed(label: str, fn) -> None:
    """Run ``fn`` right after ~200 ms of device work was queued; print how
    long the host was held."""
    torch.cuda._sleep(400_000_000)
    start = time.perf_counter()
    fn()
    print(f"{label}: returned after {1000 * (time.perf_counter() - start):.2f} ms", flush=True)
    torch.cuda.synchronize()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sync_probe.py needs a CUDA GPU.")
    x = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
    y = torch.empty_like(x, device="cuda")
    y.copy_(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()

    def side_copy():
        event = torch.cuda.Event()
        event.record()
        with torch.cuda.stream(side):
            side.wait_event(event)
            y.copy_(x, non_blocking=True)

    def side_free():
        with torch.cuda.stream(side):
            y.copy_(x, non_blocking=True)

    table = torch.zeros((4, 8), dtype=torch.int32, device="cuda")
    ids = torch.randint(0, 8, (128,), device="cuda")
    timed("pinned copy, default stream busy", lambda: y.copy_(x, non_blocking=True))
    timed("pinned view copy, default stream busy", lambda: y[: 1 << 20].copy_(x[: 1 << 20], non_blocking=True))
    timed("pinned copy on a side stream waiting for the default", side_copy)
    timed("pinned copy on an idle side stream", side_free)
    timed("table[(1, 2)] = 5", lambda: table.__setitem__((1, 2), 5))
    timed("is_pinned", lambda: x[:10].is_pinned())
    timed("table[1][ids]", lambda: table[1][ids])
    timed("torch.index_select(table[1], 0, ids)", lambda: torch.index_select(table[1], 0, ids))
    print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
