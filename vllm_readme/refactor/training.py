# SPDX-License-Identifier: Apache-2.0
"""A small resumable training loop shared by the router and tuning stages.

Batches are a pure function of (seed, step), and model, optimizer and step
are saved every ``checkpoint_every`` steps, so a run that is interrupted and
resumed reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


def limit_heap_growth() -> None:
    """Serve allocations of 1 MiB and more with mmap (returned to the OS on
    free). Training the MoE allocates differently sized per-expert tensors
    every step; with glibc's adaptive threshold they fragment the heap and the
    process grows every step until it runs out of memory. With mmap its
    memory stays flat, at the price of slower allocation (every large
    allocation maps fresh pages from the OS)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    checkpoint_every: int = 50
    weight_decay: float = 0.0
    warmup_steps: int = 10


def batch_rows(num_rows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of step ``step``: epochs are seeded permutations of all rows."""
    per_epoch = max(1, num_rows // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size]


def train(
    name: str,
    params: list[torch.nn.Parameter],
    module: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    num_rows: int,
    settings: TrainSettings,
    checkpoint_dir: Path,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> list[tuple[int, float]]:
    """Run ``loss_fn(rows, step)`` + AdamW for ``settings.steps`` steps, resuming
    from ``checkpoint_dir/last.pt`` if present; ``on_step(done)`` runs after every
    step (evaluations along the way). Returns (step, loss) pairs."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / "last.pt"
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings))
    start, history = 0, []
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        module.load_state_dict(state["module"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, history = state["step"], state["history"]
        del state  # the optimizer and module hold their own copies now
        log(f"[{name}] resuming at step {start}/{settings.steps} from {last}")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    bar = tqdm(range(start, settings.steps), desc=name, unit="step", initial=start, total=settings.steps)
    for step in bar:
        rows = batch_rows(num_rows, settings.batch_size, step, settings.seed)
        loss = loss_fn(rows, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history.append((step, loss.item()))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            state = {
                "module": {n: t for n, t in module.state_dict().items() if n in trainable},
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": done,
                "history": history,
            }
            torch.save(state, checkpoint_dir / "last.tmp")
            (checkpoint_dir / "last.tmp").replace(last)
            del state
        if on_step is not None:
            on_step(done)
    return history


def _warmup_cosine(settings: TrainSettings):
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
