"""Expert tuning (paper §3.2, expert stage): the router is frozen and the
backbone learns through the routed MLPs, with the LM loss (the paper's) or
by distillation from the dense model (KL to its next-token distribution:
needs no labels, and carries the dense model's behaviour, an instruct
model's included, to every domain instead of teaching it the calibration
text)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from vllm_readme.modeling_readme import ReadMEForCausalLM
from vllm_readme.precision import autocast
from vllm_readme.refactor.activations import model_device
from vllm_readme.refactor.evaluate import chat_prompt_ids
from vllm_readme.refactor.router import predicted_experts
from vllm_readme.refactor.training import TrainSettings, train


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
    device = model_device(teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    exchanges: list[str] = []
    total = 0
    for start in tqdm(range(0, len(requests), batch_size), desc="dense chat answers", unit="batch"):
        prompts = [chat_prompt_ids(tokenizer, request) for request in requests[start : start + batch_size]]
        width = max(len(ids) for ids in prompts)  # left padding: every prompt ends where generation starts
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
        out = teacher.generate(
            input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        for request, row in zip(requests[start : start + batch_size], out[:, width:].tolist(), strict=True):
            ended = tokenizer.eos_token_id in row
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


def tune_experts(
    model: ReadMEForCausalLM,
    blocks: torch.Tensor,
    settings: TrainSettings,
    checkpoint_dir: Path,
    dtype: torch.dtype,
    log=print,
    on_step=None,
    teacher=None,
) -> list[tuple[int, float]]:
    """Train attention, norms and MLPs; the router and the (tied) token
    embedding stay fixed. Routes come from the frozen router. The model
    trains on its own device, autocast to ``dtype``. With ``teacher`` (the
    dense model) the loss is KL(teacher || student) per token."""
    device = model_device(model)
    for name, param in model.named_parameters():
        param.requires_grad = not (name.startswith("router.") or "embed_tokens" in name or name == "lm_head.weight")
    routes = predicted_experts(model.router, blocks)

    def loss_fn(rows: torch.Tensor) -> torch.Tensor:
        batch = blocks[rows].to(device)
        with autocast(device, dtype):
            if teacher is None:
                return model(batch, expert_ids=routes[rows].to(device), labels=batch).loss
            with torch.no_grad():
                target = teacher(batch).logits.float().log_softmax(-1)
            student = model(batch, expert_ids=routes[rows].to(device)).logits.float().log_softmax(-1)
        return torch.nn.functional.kl_div(
            student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    history = train(
        "expert tuning", params, model, loss_fn, len(blocks), settings, checkpoint_dir, log, on_step=on_step
    )
    model.eval()
    for param in model.parameters():
        param.requires_grad = True
    return history
