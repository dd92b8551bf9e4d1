# SPDX-License-Identifier: Apache-2.0
"""``vllm-readme refactor``: dense Llama -> Read-ME checkpoint, stage by stage.

Every stage's result is cached under ``OUT/.refactor/`` with the options it
was made with (cache.py); a rerun reuses what matches and resumes
interrupted training. The stages themselves are in ``stages/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from vllm_readme.checkpoint.io import check_writable, save_readme_checkpoint
from vllm_readme.precision import machine_description, read_machine, resolve_precision
from vllm_readme.refactor.build import build_readme_model
from vllm_readme.refactor.cache import StageCache
from vllm_readme.refactor.dense import default_dense_model, load_dense, save_dense_hf
from vllm_readme.refactor.options import RefactorOptions, check_options, options_of_build
from vllm_readme.refactor.stages import log
from vllm_readme.refactor.stages.evaluate import Evaluation
from vllm_readme.refactor.stages.experts import cut_experts
from vllm_readme.refactor.stages.inputs import load_inputs
from vllm_readme.refactor.stages.router import distill_router
from vllm_readme.refactor.stages.tune import Tuning
from vllm_readme.refactor.training import limit_heap_growth

__all__ = ["Refactor", "RefactorOptions", "export_dense", "options_of_build", "refactor"]


class Refactor:
    def __init__(self, options: RefactorOptions):
        # Resolved once, before anything is loaded; the options then carry the
        # dtype actually used (stage keys, options.json, `vllm-readme eval`).
        self.machine = read_machine()
        self.precision = resolve_precision(options.dtype, options.device, self.machine)
        self.asked_dtype = options.dtype
        self.options = options = dataclasses.replace(options, dtype=self.precision.name)
        self.out = Path(options.out)
        self.work = self.out / ".refactor"
        check_writable(self.work, "--out")
        self.dense_path = Path(options.dense) if options.dense else default_dense_model()
        self.cache = StageCache(self.work, options)

    def _cached(self, stage: str) -> Path | None:
        """The stage's key file, if it holds this build's key (StageCache.cached)."""
        return self.cache.cached(stage)

    def _mark(self, stage: str) -> None:
        """Writes the stage's key file (StageCache.mark)."""
        self.cache.mark(stage)

    def run(self, evaluate: bool = True) -> dict:
        started = time.time()
        limit_heap_growth()
        opts, precision, cache = self.options, self.precision, self.cache
        log(f"precision: {precision}")
        log(f"device: {precision.device}")
        log(f"machine: {machine_description(self.machine)}")
        (self.work / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=1, default=str))
        (self.work / "precision.json").write_text(json.dumps(self.precision_record(), indent=1))
        # Cheap checks first: bad input fails before any weight is loaded.
        check_options(opts)
        inputs = load_inputs(opts, self.dense_path, precision.device)
        dense, inter = inputs.dense, inputs.intermediate_size

        layout, means = cut_experts(cache, inputs, precision.dtype)
        router_config, router_state = distill_router(cache, inputs, layout, precision)
        model = build_readme_model(dense, layout, router_state, router_config).to(precision.device)
        log(
            f"Read-ME model: {layout.num_experts} experts x {layout.active_size - layout.shared_size} channels "
            f"+ {layout.shared_size} shared of {inter} ({layout.active_size / inter:.0%} active per token)"
        )
        tuning = Tuning(cache, precision, inputs.tokenizer, inputs.calib)
        curve = tuning.tune(model, inputs.held_blocks, dense)
        save_readme_checkpoint(model, inputs.tokenizer, self.out)
        log(f"wrote {self.out}")
        cache.timings["this_run_build_s"] = time.time() - started
        cache.timings["stages_total_s"] = sum(cache.timings.get(k, 0.0) for k in ("experts_s", "router_s", "tune_s"))
        cache.save_timings()
        results = {"timings_s": cache.timings}
        if evaluate:
            evaluation = Evaluation(cache, precision, self.machine, self.dense_path, tuning)
            results = evaluation.run(dense, model, layout, means, inputs.held_blocks, curve, self.precision_record())
        return results

    def precision_record(self) -> dict:
        """How the precision was chosen, for precision.json and the report."""
        return {
            "asked": {"dtype": self.asked_dtype, "device": self.options.device},
            "dtype": self.precision.name,
            "device": self.precision.device,
            "reason": self.precision.reason,
            "machine": machine_description(self.machine),
        }


def refactor(options: RefactorOptions, evaluate: bool = True) -> dict:
    return Refactor(options).run(evaluate=evaluate)


def export_dense(dense: Path | None, out: Path) -> Path:
    """The dense model as a plain HF folder (stock vLLM's baseline)."""
    model, tokenizer = load_dense(dense or default_dense_model())
    return save_dense_hf(model, tokenizer, out)
