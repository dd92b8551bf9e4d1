# SPDX-License-Identifier: Apache-2.0
"""Cache keys of the refactoring stages, and the build's stage results under
``OUT/.refactor/``.

A stage's key maps the names of the options its result depends on to their
values as strings: its own options (``STAGE_OPTIONS``) after the keys of the
stages it reads (``STAGE_INPUTS``). A stage is reused when the key file it
left (``<stage>.json``) equals the key of the options now. Results shared
between builds (``--stats-cache``) are named by a digest of their key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_readme.precision import Machine, Precision
    from vllm_readme.refactor.options import RefactorOptions

# The dense model, its calibration blocks and the precision: the statistics
# are made of these, so every stage depends on them.
_DENSE_AND_TEXT = ("dense", "calib", "block_len", "held_out_fraction", "seed", "dtype")
# How the built-in calibration sources are read (data.builtin_documents): a
# stage made from text read another way is made again. Keys without it were
# read with module members in stdlib-docstrings.
CALIB_TEXT = "stdlib-docstrings without module members"

STAGE_OPTIONS: dict[str, tuple[str, ...]] = {
    # Shared between builds, by digest; the experts key holds all of them.
    "activations": _DENSE_AND_TEXT + ("stats_tokens",),
    "experts": _DENSE_AND_TEXT
    + ("experts_from", "num_experts", "keep", "stats_tokens", "cluster_iterations", "expert_cut"),
    "router": (
        "router_hidden",
        "router_layers",
        "router_heads",
        "router_steps",
        "router_batch",
        "router_lr",
        "router_tokens",
        "router_persistence",
        "router_smoothing",
    ),
    "tune": (
        "tune_tokens",
        "tune_batch",
        "tune_lr",
        "tune_objective",
        "tune_chat",
        "tune_chat_answers",
        "tune_on_policy",
        "tune_params",
    ),
    "baselines": ("tune_tokens", "tune_batch", "tune_lr"),
}
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "activations": (),
    "experts": (),
    "router": ("experts",),
    "tune": ("router",),
    "baselines": ("experts",),
}


def stage_key(options: RefactorOptions, stage: str) -> dict[str, str]:
    """What a cached stage must match to be reused. The dtype changes
    every stage's numbers (the statistics first), so it is in all of them,
    resolved: a build in fp32 never reuses statistics made in bf16."""
    if options.dtype not in ("bf16", "fp32"):
        raise ValueError(f"stage_key needs a resolved dtype (bf16 or fp32), got {options.dtype!r}")
    key: dict[str, str] = {}
    for source in STAGE_INPUTS[stage]:
        key.update(stage_key(options, source))
    values = dataclasses.asdict(options)
    key.update({name: str(values[name]) for name in STAGE_OPTIONS[stage]})
    if "calib" in STAGE_OPTIONS[stage]:
        key["calib_text"] = CALIB_TEXT
    return key


def chat_answers_key(dense_path: Path, precision: Precision, machine: Machine) -> dict:
    """What the dense model's greedy chat-check answers depend on: the
    dense model's files (name, size, modification time), the questions, the
    answer limit, the precision and device, the CPU or GPU model and the
    torch and transformers versions."""
    import transformers

    from vllm_readme.refactor.evaluate import CHAT_MAX_NEW_TOKENS, CHAT_PROMPTS

    files = [dense_path] if dense_path.is_file() else sorted(dense_path.iterdir())
    return {
        "dense": str(dense_path.resolve()),
        "dense_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()],
        "prompts": hashlib.sha256(json.dumps(CHAT_PROMPTS).encode()).hexdigest(),
        "max_new_tokens": CHAT_MAX_NEW_TOKENS,
        "precision": precision.name,
        "device": precision.device,
        "machine": machine.gpu_name if precision.device == "cuda" else machine.cpu_model,
        "versions": [torch.__version__, transformers.__version__],
    }


def saved_key(path: Path) -> dict:
    """A stage key read from disk. A field the key lacks takes the value
    every build that wrote no such field used, so the key still matches
    (or not) on what it built; a key without ``dtype`` ran in bf16
    autocast."""
    key = json.loads(path.read_text())
    key.setdefault("dtype", "bf16")
    key.setdefault("expert_cut", "overlapping")  # every stage key holds the experts'; one without a cut overlapped
    if "router_steps" in key:  # a router key without the switching penalty trained without it
        key.setdefault("router_persistence", "0.0")
        key.setdefault("router_smoothing", "0.0")
    if "tune_lr" in key and "router_steps" in key:  # a tune key without an objective tuned on the LM loss
        key.setdefault("tune_objective", "lm")
        key.setdefault("tune_chat", "0.5")  # read only with distillation; a key without it distilled on no chat text
    if "tune_chat" in key:  # a tune key without these tuned on chat text, not on dense or student answers
        key.setdefault("tune_chat_answers", "text")
        key.setdefault("tune_on_policy", "0.0")
        key.setdefault("tune_params", "all")  # a tune key without it trained attention, norms and MLPs
    return key


def keyed_file(folder: Path, kind: str, key: dict, suffix: str) -> Path:
    """Where a result shared between builds lives: named by a digest of
    everything it depends on (``key``), so another input is another file."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{kind}-{digest}{suffix}"


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` then rename: a reader sees the whole file or none,
    and builds sharing the folder (a frontier's runs) each write their own partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    partial.replace(path)


def load_tensors(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


class StageCache:
    """One build's stage results in ``work`` (``OUT/.refactor/``): a key
    file per finished stage, its artefacts beside it, a resumable training
    folder per training stage, and the stages' timings (``timings.json``),
    which survive reruns: a cached stage keeps the time it took when it ran."""

    def __init__(self, work: Path, options: RefactorOptions):
        self.work = work
        self.options = options
        self.timings_path = work / "timings.json"
        self.timings: dict[str, float] = (
            json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        )

    def path(self, name: str) -> Path:
        return self.work / name

    def key(self, stage: str) -> dict[str, str]:
        return stage_key(self.options, stage)

    def cached(self, stage: str) -> Path | None:
        """The stage's key file, if it holds this build's key."""
        marker = self.work / f"{stage}.json"
        if marker.is_file() and saved_key(marker) == self.key(stage):
            return marker
        return None

    def reusable(self, stage: str, name: str) -> Path | None:
        """The artefact ``name`` of ``stage``, if the stage is cached and the file is there."""
        path = self.work / name
        return path if self.cached(stage) and path.is_file() else None

    def mark(self, stage: str) -> None:
        (self.work / f"{stage}.json").write_text(json.dumps(self.key(stage), indent=1))

    def done(self, stage: str, started: float) -> None:
        """The stage's artefacts are written: its key file, and its time."""
        self.mark(stage)
        self.timings[f"{stage}_s"] = time.time() - started

    def training_dir(self, folder: str, keyed_by: str) -> Path:
        """The resumable checkpoint folder ``work/folder``, emptied if it
        was made with another key of stage ``keyed_by``."""
        path = self.work / folder
        key_file = path / "options.json"
        key = self.key(keyed_by)
        if path.is_dir() and (not key_file.is_file() or saved_key(key_file) != key):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        key_file.write_text(json.dumps(key, indent=1))
        return path

    def invalidate(self, stage: str) -> None:
        """Forget the stage: its key file and its training folder."""
        for path in (self.work / f"{stage}.json", self.work / stage):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def save_timings(self) -> None:
        self.timings_path.write_text(json.dumps(self.timings, indent=1))
