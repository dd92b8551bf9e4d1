# SPDX-License-Identifier: Apache-2.0
"""Expert tuning (paper §3.2, expert stage): the router is frozen and the
backbone learns through the routed MLPs, with the LM loss (the paper's) or
by distillation from the dense model (KL to its next-token distribution:
needs no labels, and carries the dense model's behaviour, an instruct
model's included, to every domain instead of teaching it the calibration
text)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_readme.modeling_readme import ReadMEForCausalLM
from vllm_readme.precision import autocast
from vllm_readme.refactor.activations import model_device
from vllm_readme.refactor.evaluate import chat_prompt_ids, greedy_generate, pad_and_eos
from vllm_readme.refactor.router import predicted_experts
from vllm_readme.refactor.training import TrainSettings, batch_rows, train


@torch.no_grad()
def dense_chat_exchanges(
    teacher, tokenizer, requests: list[str], token_budget: int, max_new_tokens: int = 128, batch_size: int = 16
) -> list[str]:
    """Chat exchanges whose assistant turns the dense model writes: greedy
    answers to ``requests``, each exchange in the tokenizer's chat template,
    generated batch by batch until they hold ``token_budget`` tokens. Tuning
    on them is sequence-level distillation: the experts see the dense model's
    own answers, their length and their end of turn, not documentation text
    in an assistant's turn (a source of answers that never stop)."""
    exchanges: list[str] = []
    total = 0
    for start in tqdm(range(0, len(requests), batch_size), desc="dense chat answers", unit="batch"):
        chunk = requests[start : start + batch_size]
        prompts = [chat_prompt_ids(tokenizer, request) for request in chunk]
        answers = greedy_generate(teacher, prompts, max_new_tokens, *pad_and_eos(tokenizer), batch_size=batch_size)
        for request, (row, ended) in zip(chunk, answers, strict=True):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            user = [{"role": "user", "content": request}]
            if ended:  # the dense model closed its turn: so does the exchange
                text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
            else:  # cut at max_new_tokens: no end of turn the dense model did not write
                text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False) + answer
            exchanges.append(text)
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if total >= token_budget:
            break
    return exchanges


@dataclass
class OnPolicy:
    """On-policy distillation (generalized knowledge distillation, Agarwal et
    al. 2024): every ``every``-th tuning step trains on the student's own
    greedy answers to chat ``prompts`` (token ids, up to the assistant's turn)
    instead of calibration text, with the loss on the answer tokens only. The
    student sees the states its own answers lead to, loops included, and the
    dense model says at each of them what should come next."""

    prompts: list[list[int]]
    every: int
    max_new_tokens: int
    pad_id: int
    eos_id: int

    def is_step(self, step: int) -> bool:
        return step % self.every == self.every - 1


def _backbone(name: str) -> bool:
    return not (name.startswith("router.") or "embed_tokens" in name or name == "lm_head.weight")


# Which parameters expert tuning may change (--tune-params), by name.
TUNABLE = {
    "all": _backbone,  # attention, norms, shared MLP and experts
    "mlp": lambda name: ".mlp." in name,  # the shared MLP and the experts: attention and norms stay the dense model's
    "experts": lambda name: ".mlp.experts." in name,  # only what routing changes: the routed experts
}


def tune_experts(
    model: ReadMEForCausalLM,
    blocks: torch.Tensor,
    settings: TrainSettings,
    checkpoint_dir: Path,
    dtype: torch.dtype,
    log=print,
    on_step=None,
    teacher=None,
    on_policy: OnPolicy | None = None,
    trainable: str = "all",
) -> list[tuple[int, float]]:
    """Train ``trainable`` (TUNABLE: attention, norms and MLPs; the MLPs; or
    the routed experts only); the router and the (tied) token embedding
    always stay fixed. Routes come from the frozen router. The model trains
    on its own device, autocast to ``dtype``. With ``teacher`` (the dense
    model) the loss is KL(teacher || student) per token; with ``on_policy``
    too, some steps are on the student's own answers."""
    device = model_device(model)
    if trainable not in TUNABLE:
        raise ValueError(f"trainable must be one of {sorted(TUNABLE)}, got {trainable!r}")
    for name, param in model.named_parameters():
        param.requires_grad = TUNABLE[trainable](name)
    routes = predicted_experts(model.router, blocks)
    if on_policy is not None and teacher is None:
        raise ValueError("on-policy tuning distils from the dense model: pass teacher")

    def loss_fn(rows: torch.Tensor, step: int) -> torch.Tensor:
        if on_policy is not None and on_policy.is_step(step):
            return _on_policy_loss(model, teacher, on_policy, settings, step, dtype)
        batch = blocks[rows].to(device)
        with autocast(device, dtype):
            if teacher is None:
                return model(batch, expert_ids=routes[rows].to(device), labels=batch).loss
            with torch.no_grad():
                target = teacher(batch).logits.float().log_softmax(-1)
            student = model(batch, expert_ids=routes[rows].to(device)).logits.float().log_softmax(-1)
        return _kl(student.flatten(0, 1), target.flatten(0, 1))

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    history = train(
        "expert tuning", params, model, loss_fn, len(blocks), settings, checkpoint_dir, log, on_step=on_step
    )
    model.eval()
    for param in model.parameters():
        param.requires_grad = True
    return history


def _on_policy_loss(model, teacher, on_policy: OnPolicy, settings: TrainSettings, step: int, dtype) -> torch.Tensor:
    """KL(teacher || student) on the tokens the student answers to a batch of
    prompts (picked like text rows: a pure function of seed and step, so a
    resumed run generates what the uninterrupted one did)."""
    device = model_device(model)
    picks = batch_rows(len(on_policy.prompts), settings.batch_size, step, settings.seed + 1).tolist()
    prompts = [on_policy.prompts[i] for i in picks]
    model.eval()
    with autocast(device, dtype):
        answers = greedy_generate(
            model, prompts, on_policy.max_new_tokens, on_policy.pad_id, on_policy.eos_id, batch_size=len(prompts)
        )
    model.train()
    # Right padding: causal attention never looks ahead, so no mask or position shift is needed.
    rows = [prompt + answer for prompt, (answer, _ended) in zip(prompts, answers, strict=True)]
    width = max(len(row) for row in rows)
    batch = torch.tensor([row + [on_policy.pad_id] * (width - len(row)) for row in rows], device=device)
    scored = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, (prompt, (answer, _ended)) in enumerate(zip(prompts, answers, strict=True)):
        scored[i, len(prompt) - 1 : len(prompt) - 1 + len(answer)] = True  # the positions that predict the answer
    with autocast(device, dtype):
        with torch.no_grad():
            target = teacher(batch).logits.float().log_softmax(-1)[scored]
        student = model(batch).logits.float().log_softmax(-1)[scored]
    return _kl(student, target)


def _kl(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || student) over ``[tokens, vocab]`` log-probabilities."""
    return torch.nn.functional.kl_div(student, target, log_target=True, reduction="batchmean")
