"""Which of the expert cache's GPU operations block the host until the device
has run everything queued (the reason the cache keeps its slot table on the
host on a GPU; vllm_readme/experts/cache.py). Each operation is timed on the
host right after ~200 ms of device work was queued: an operation that
returns in well under a millisecond did not wait.

    python benchmarks/gpu_sync_probe.py    (needs a CUDA GPU)

Measured on an H200 (benchmarks/results/gpu_sync_probe.log): copies from
pinned memory, on any stream, return in 0.1-0.3 ms; writing one element of
a device tensor from Python (table[(1, 2)] = 5) and the advanced-indexing
gather table[1][ids] waited for the queue (~200 ms).
"""

import time

import torch

x = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
y = torch.empty_like(x, device="cuda")
y.copy_(x)
torch.cuda.synchronize()


def t(label, fn):
    torch.cuda._sleep(400_000_000)  # ~200 ms of device time
    start = time.perf_counter()
    fn()
    print(f"{label}: returned after {1000 * (time.perf_counter() - start):.2f} ms", flush=True)
    torch.cuda.synchronize()


side = torch.cuda.Stream()
t("pinned copy, default stream busy", lambda: y.copy_(x, non_blocking=True))
t("pinned view copy, default stream busy", lambda: y[: 1 << 20].copy_(x[: 1 << 20], non_blocking=True))


def side_copy():
    e = torch.cuda.Event()
    e.record()
    with torch.cuda.stream(side):
        side.wait_event(e)
        y.copy_(x, non_blocking=True)


t("pinned copy on a side stream waiting for the default", side_copy)


def side_free():
    with torch.cuda.stream(side):
        y.copy_(x, non_blocking=True)


t("pinned copy on an idle side stream", side_free)
tab = torch.zeros((4, 8), dtype=torch.int32, device="cuda")
t("table[(1, 2)] = 5", lambda: tab.__setitem__((1, 2), 5))
t("is_pinned", lambda: x[:10].is_pinned())
ids = torch.randint(0, 8, (128,), device="cuda")
t("tab[1][ids]", lambda: tab[1][ids])
print(torch.cuda.get_device_name())
