# SPDX-License-Identifier: Apache-2.0
"""The tuning stage: the backbone tuned through the routed MLPs, router
frozen, bounded by a token budget (tune.py holds the training). The tuned
baselines (stages/evaluate.py) train on the same blocks and schedule."""

from __future__ import annotations

import json
import time

import torch

from vllm_readme.precision import Precision
from vllm_readme.refactor import data as data_mod
from vllm_readme.refactor.cache import StageCache, load_tensors
from vllm_readme.refactor.evaluate import chat_prompt_ids, pad_and_eos, perplexity
from vllm_readme.refactor.stages import log
from vllm_readme.refactor.training import TrainSettings
from vllm_readme.refactor.tune import OnPolicy, tune_experts

# Longest answer an on-policy step lets the student write (its loops show well within it).
ON_POLICY_NEW_TOKENS = 96


def moe_perplexity(model, held_blocks: torch.Tensor, device: str) -> float:
    return perplexity(lambda b: model(b).logits, held_blocks, device=device, desc="held-out perplexity (MoE)")


class Tuning:
    def __init__(self, cache: StageCache, precision: Precision, tokenizer, calib: list[data_mod.Domain]):
        self.cache, self.options, self.precision = cache, cache.options, precision
        self.tokenizer, self.calib = tokenizer, calib
        self._chat_blocks: torch.Tensor | None = None  # --tune-chat-answers dense: generated once per build

    def tune(self, model, held_blocks: torch.Tensor, dense=None) -> list[dict]:
        """Tunes ``model`` in place; returns the held-out perplexity curve
        (empty with no tuning budget)."""
        opts, cache = self.options, self.cache
        path = cache.path("tuned.pt")
        if opts.tune_tokens <= 0:
            return []
        if cache.reusable("tune", "tuned.pt"):
            log("expert tuning: cached")
            model.load_state_dict(load_tensors(path))
            return json.loads(cache.path("tuning_curve.json").read_text())
        t = time.time()
        tune_dir = cache.training_dir("tune", "tune")
        blocks, settings = self.tuning_run(dense)
        steps = settings.steps
        tokens_per_step = opts.tune_batch * opts.block_len
        marks = sorted({round(steps * i / opts.tune_eval_points) for i in range(1, opts.tune_eval_points + 1)})
        device = self.precision.device
        curve_path = tune_dir / "curve.json"  # survives an interruption, like the weights
        if curve_path.is_file():
            curve = json.loads(curve_path.read_text())
        else:
            curve = [{"tokens": 0, "perplexity": moe_perplexity(model, held_blocks, device)}]
            curve_path.write_text(json.dumps(curve))
        log(
            f"expert tuning: {steps} steps of {tokens_per_step} tokens, held-out perplexity before: {curve[0]['perplexity']:.2f}"
        )

        def evaluate_at(done: int) -> None:
            if done in marks:
                model.eval()
                curve.append(
                    {"tokens": done * tokens_per_step, "perplexity": moe_perplexity(model, held_blocks, device)}
                )
                curve_path.write_text(json.dumps(curve))
                log(f"expert tuning: {done}/{steps} steps, held-out perplexity {curve[-1]['perplexity']:.2f}")
                model.train()

        teacher = dense if opts.tune_objective == "distill" else None
        if teacher is not None:
            teacher.eval()
            log("expert tuning: distillation from the dense model (KL to its next-token distribution)")
        on_policy = self._on_policy(settings) if teacher is not None else None
        tune_experts(
            model,
            blocks,
            settings,
            tune_dir,
            self.precision.dtype,
            log,
            on_step=evaluate_at,
            teacher=teacher,
            on_policy=on_policy,
            trainable=opts.tune_params,
        )
        torch.save(model.state_dict(), path)
        cache.path("tuning_curve.json").write_text(json.dumps(curve))
        cache.done("tune", t)
        return curve

    def tuning_run(self, dense) -> tuple[torch.Tensor, TrainSettings]:
        """Expert tuning's blocks and schedule; the tuned baselines get the same."""
        opts = self.options
        domains, budget, chat = self.calib, opts.tune_tokens, []
        if opts.tune_objective == "distill" and opts.tune_chat > 0 and getattr(self.tokenizer, "chat_template", None):
            if opts.tune_chat_answers == "dense":
                chat = self._dense_chat_blocks(dense, int(opts.tune_tokens * opts.tune_chat))
                budget -= chat.numel()
            else:
                domains = data_mod.chat_formatted(self.tokenizer, domains, opts.tune_chat, opts.seed)
        text = data_mod.domain_blocks(self.tokenizer, domains, opts.block_len, budget) if budget > 0 else []
        blocks = torch.cat(text + ([chat] if len(chat) else []))
        steps = max(1, opts.tune_tokens // (opts.tune_batch * opts.block_len))
        settings = TrainSettings(
            steps, opts.tune_batch, opts.tune_lr, opts.seed, opts.checkpoint_every, warmup_steps=min(10, steps)
        )
        return blocks, settings

    def _on_policy(self, settings: TrainSettings) -> OnPolicy | None:
        """--tune-on-policy: which steps train on the student's own answers, to which requests."""
        opts = self.options
        if opts.tune_on_policy <= 0:
            return None
        if not getattr(self.tokenizer, "chat_template", None):
            log("expert tuning: --tune-on-policy ignored: the dense model's tokenizer has no chat template")
            return None
        every = max(1, round(1 / opts.tune_on_policy))
        steps = settings.steps // every
        # Requests about calibration passages (the chat check's questions are never trained on).
        requests = data_mod.chat_requests(self.calib, max(settings.batch_size, steps * settings.batch_size), opts.seed)
        prompts = [chat_prompt_ids(self.tokenizer, request) for request in requests]
        log(
            f"expert tuning: {steps} of {settings.steps} steps (every {every}) on the student's own greedy answers "
            f"to {len(prompts)} chat requests, scored by the dense model (on-policy distillation)"
        )
        return OnPolicy(prompts, every, ON_POLICY_NEW_TOKENS, *pad_and_eos(self.tokenizer))

    def _dense_chat_blocks(self, dense, tokens: int) -> torch.Tensor:
        """About ``tokens`` tokens of chat exchanges the dense model answered,
        in blocks; the exchanges are kept in .refactor/tune_chat.jsonl to read."""
        from vllm_readme.refactor.tune import dense_chat_exchanges

        if self._chat_blocks is not None:  # the tuned baselines reuse expert tuning's
            return self._chat_blocks
        opts = self.options
        # A request and its answer take ~150-250 tokens; ask for twice what the budget needs.
        requests = data_mod.chat_requests(self.calib, max(16, 2 * tokens // 150), opts.seed)
        t = time.time()
        exchanges = dense_chat_exchanges(dense, self.tokenizer, requests, tokens)
        with open(self.cache.path("tune_chat.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in exchanges)
        # Packed in order, as one text: an exchange longer than a block continues in the next.
        blocks = data_mod.token_blocks(self.tokenizer, ["".join(exchanges)], opts.block_len, tokens)
        log(
            f"expert tuning: {len(exchanges)} chat exchanges answered by the dense model "
            f"({blocks.numel()} tokens, {time.time() - t:.0f} s; .refactor/tune_chat.jsonl)"
        )
        self._chat_blocks = blocks
        return blocks
