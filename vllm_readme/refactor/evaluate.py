# SPDX-License-Identifier: Apache-2.0
"""Evaluation: perplexity of the dense model, the Read-ME MoE and a dense
model pruned to the same active MLP size (the paper's comparison), plus
routing statistics; written as JSON and a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.loss.loss_utils import ForCausalLMLoss

from vllm_readme.refactor.activations import model_device
from vllm_readme.refactor.router import predicted_experts


@torch.no_grad()
def perplexity(
    forward, blocks: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu", desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) over ``[rows, seq]`` blocks; ``forward(batch)``
    returns logits for a batch on ``device``. Always fp32 (no autocast), so
    perplexities compare across machines and build precisions."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch"):
        batch = blocks[start : start + batch_size].to(device)
        logits = forward(batch)
        # num_items_in_batch=1: the summed NLL (the mean over the whole set is taken below).
        total += float(ForCausalLMLoss(logits, batch, logits.shape[-1], num_items_in_batch=1))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def pruned_forward(dense, keep_masks: torch.Tensor):
    """Dense model whose every MLP keeps only ``keep_masks[layer]`` channels."""

    def forward(batch):
        hooks = [
            block.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args, mask=keep_masks[layer]: (args[0] * mask.to(args[0].device, args[0].dtype),)
            )
            for layer, block in enumerate(dense.model.layers)
        ]
        try:
            return dense(batch).logits
        finally:
            for hook in hooks:
                hook.remove()

    return forward


@torch.no_grad()
def routing_statistics(model, blocks: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """Expert load, how often a token keeps the previous token's expert (the
    paper: 2921 of 4096 for Read-ME vs 850 for Mixtral) and, with targets,
    the router's accuracy against the best-covering expert."""
    routes = predicted_experts(model.router, blocks)
    num_experts = model.config.num_experts
    load = torch.bincount(routes.flatten(), minlength=num_experts).float()
    same = (routes[:, 1:] == routes[:, :-1]).float().mean()
    stats = {
        "tokens": routes.numel(),
        "expert_load_fraction": (load / load.sum()).tolist(),
        "load_max_over_mean": float(load.max() / load.mean()),
        "same_expert_as_previous_token": float(same),
        "same_expert_per_4096_tokens": round(float(same) * 4096),
    }
    if targets is not None:
        stats["router_accuracy"] = float((routes == targets).float().mean())
    return stats


def write_report(results: dict, out_dir: Path, name: str = "refactor") -> tuple[Path, Path]:
    """``name.json`` and ``name.png`` (perplexities, tuning curve, expert load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ppl = results["perplexity"]
    labels = list(ppl)[::-1]
    colors = ["#dd8452" if k.startswith("Read-ME") else "#4c72b0" for k in labels]
    axes[0].barh(labels, [ppl[k] for k in labels], color=colors)
    for i, key in enumerate(labels):
        axes[0].text(ppl[key], i, f" {ppl[key]:.2f}", va="center")
    axes[0].set_xlabel("held-out perplexity (lower is better)")
    axes[0].set_xlim(0, max(ppl.values()) * 1.18)
    axes[0].set_title(f"{results.get('model', '')}: active MLP {results.get('active_mlp_fraction', 0):.0%}")
    curve = results.get("tuning_curve") or []
    if curve:
        axes[1].plot(
            [c["tokens"] for c in curve],
            [c["perplexity"] for c in curve],
            marker="o",
            color="#dd8452",
            label="Read-ME MoE",
        )
        axes[1].axhline(ppl["dense"], color="gray", ls="--", label="dense (untuned)")
        tuned = ppl.get("dense (tuned, same tokens)")
        if tuned is not None:
            axes[1].axhline(tuned, color="#4c72b0", ls="--", label="dense tuned, same tokens")
            axes[1].axhline(tuned * 1.25, color="#4c72b0", ls=":", label="x 1.25")
        axes[1].set_xlabel("expert-tuning tokens")
        axes[1].set_ylabel("held-out perplexity")
        axes[1].legend(fontsize=8)
    axes[1].set_title("perplexity vs tuning tokens")
    load = results["routing"]["expert_load_fraction"]
    axes[2].bar(range(len(load)), load)
    axes[2].set_xlabel("expert")
    axes[2].set_ylabel("fraction of held-out tokens")
    axes[2].set_title(
        f"expert load; same expert as previous token: {results['routing']['same_expert_as_previous_token']:.0%}"
    )
    fig.tight_layout()
    png_path = out_dir / f"{name}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


# Short chat questions for the chat check: greedy answers of the Read-ME model
# against the dense model's (does the refactor keep the instruct behaviour?).
# The first 16 are a smaller check of their own (some frontier rows report
# only those: ``repetition_*_first16`` keeps every row comparable with them).
CHAT_PROMPTS = (
    "How many days are in a week?",
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What do bees make?",
    "Give me a tip for sleeping better.",
    "What is the opposite of hot?",
    "Why is the sky blue?",
    "Write one sentence about autumn.",
    "What is two plus three?",
    "What should I pack for a beach trip?",
    "Describe a cat in one sentence.",
    "What is a verb?",
    "How do plants get energy?",
    "Suggest a name for a pet dog.",
    "What is the boiling point of water in Celsius?",
    "Say hello in Spanish.",
    "What is the largest planet in our solar system?",
    "How do I make a cup of tea?",
    "What is a noun?",
    "Give me a word that rhymes with cat.",
    "Why do leaves change colour in the fall?",
    "What is the tallest animal?",
    "How many legs does a spider have?",
    "Write a short greeting for a birthday card.",
    "What is the freezing point of water in Fahrenheit?",
    "Name a fruit that is yellow.",
    "How can I stay focused while studying?",
    "What does a doctor do?",
    "Tell me a fun fact about the ocean.",
    "What is ten minus four?",
    "Describe the moon in one sentence.",
    "What language is spoken in Brazil?",
    "Why do we need to drink water?",
    "Suggest a healthy breakfast.",
    "What is the main ingredient of bread?",
    "How many hours are in a day?",
    "What is a mammal?",
    "Give me a tip for saving money.",
    "What colour do you get by mixing blue and yellow?",
    "Who wrote Romeo and Juliet?",
    "What is the sun made of?",
    "Name two musical instruments.",
    "How do birds fly?",
    "What is the plural of mouse?",
    "Write one sentence about the sea.",
    "What should I do if I feel tired?",
    "What is the capital of Japan?",
    "Explain what a computer is in one sentence.",
)
ORIGINAL_CHAT_PROMPTS = 16
CHAT_MAX_NEW_TOKENS = 80  # tokens a chat-check answer may run to


def repeated_ngram_fraction(tokens: list[int], n: int = 4) -> float:
    """Share of an answer's n-grams that already occurred earlier in it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def token_f1(answer: list[int], reference: list[int]) -> float:
    """Bag-of-tokens F1 of an answer against a reference answer."""
    from collections import Counter

    common = sum((Counter(answer) & Counter(reference)).values())
    if not common:
        return 0.0
    precision, recall = common / len(answer), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt`` as a user turn in the chat template, up to where the assistant's answer starts."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return ids["input_ids"] if hasattr(ids, "keys") else ids


@torch.no_grad()
def greedy_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 16,
    sampling: dict | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy continuations of token-id ``prompts``, batch by batch with left
    padding (every prompt ends where generation starts; each answer equals the
    prompt's answer alone). Each answer is cut after its EOS, if it has one:
    (answer ids, whether the model ended it). ``sampling`` (``temperature``,
    ``top_p``, ``seed``) samples instead of taking the argmax; the seed is set
    once, before the first batch, on a forked generator state, so the
    caller's random state is left as it was."""
    if sampling is None:
        return _generate(model, prompts, max_new_tokens, pad_id, eos_id, batch_size, {"do_sample": False})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sampling.get("seed", 0))
        options = {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"]}
        return _generate(model, prompts, max_new_tokens, pad_id, eos_id, batch_size, options)


def _generate(model, prompts, max_new_tokens: int, pad_id: int, eos_id: int, batch_size: int, options: dict):
    device = model_device(model)
    answers: list[tuple[list[int], bool]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        out = model.generate(
            input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **options
        )
        for row in out[:, width:].tolist():
            ended = eos_id in row
            answers.append((row[: row.index(eos_id) + 1] if ended else row, ended))
    return answers


def pad_and_eos(tokenizer) -> tuple[int, int]:
    """The ids that batched generation pads with and stops at."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad, tokenizer.eos_token_id


def greedy_answers(
    model,
    tokenizer,
    prompts,
    max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    sampling: dict | None = None,
) -> list[list[int]]:
    """Greedy (or, with ``sampling``, sampled) answers (token ids, EOS cut) to
    ``prompts``, chat-formatted when the tokenizer has a chat template."""
    if getattr(tokenizer, "chat_template", None):
        ids = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    else:
        ids = [tokenizer(f"Question: {p}\nAnswer:", add_special_tokens=False)["input_ids"] for p in prompts]
    answers = greedy_generate(
        model, ids, max_new_tokens, *pad_and_eos(tokenizer), batch_size=batch_size, sampling=sampling
    )
    return [answer[:-1] if ended else answer for answer, ended in answers]


def chat_check(
    dense, model, tokenizer, prompts=CHAT_PROMPTS, max_new_tokens: int = CHAT_MAX_NEW_TOKENS, dense_answers=None
) -> dict:
    """Repetition (repeated 4-gram fraction) of dense and Read-ME answers and
    the Read-ME answers' token F1 against the dense ones, over all ``prompts``
    and over the first 16 (comparable with reports of the 16-question check).
    ``dense_answers``: the dense model's answers to ``prompts`` when a caller
    kept them (they depend only on the dense model, the prompts, the limit
    and the machine's arithmetic)."""
    if dense_answers is None:
        dense_answers = greedy_answers(dense, tokenizer, prompts, max_new_tokens)
    elif len(dense_answers) != len(prompts):
        raise ValueError(f"{len(dense_answers)} dense answers for {len(prompts)} chat prompts")
    readme_answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rep_dense = [repeated_ngram_fraction(a) for a in dense_answers]
    rep_readme = [repeated_ngram_fraction(a) for a in readme_answers]
    f1 = [token_f1(r, d) for r, d in zip(readme_answers, dense_answers, strict=True)]
    first = min(ORIGINAL_CHAT_PROMPTS, len(prompts))
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repetition_dense": mean(rep_dense),
        "repetition_readme": mean(rep_readme),
        "token_f1_vs_dense": mean(f1),
        # Short answers repeat less by construction: how long the answers are, and how many ran to the limit.
        "answer_tokens_dense": mean([len(a) for a in dense_answers]),
        "answer_tokens_readme": mean([len(a) for a in readme_answers]),
        "at_limit_dense": mean([len(a) >= max_new_tokens for a in dense_answers]),
        "at_limit_readme": mean([len(a) >= max_new_tokens for a in readme_answers]),
        "repetition_dense_first16": mean(rep_dense[:first]),
        "repetition_readme_first16": mean(rep_readme[:first]),
        "token_f1_vs_dense_first16": mean(f1[:first]),
        "per_prompt": [
            {"repetition_dense": d, "repetition_readme": r, "token_f1": f}
            for d, r, f in zip(rep_dense, rep_readme, f1, strict=True)
        ],
        "examples": [
            {"prompt": p, "dense": tokenizer.decode(d), "readme": tokenizer.decode(r)}
            for p, d, r in list(zip(prompts, dense_answers, readme_answers, strict=True))[:4]
        ],
    }


# The sampling a user of the dense model would choose: SmolLM2-135M-Instruct's
# model card generates with temperature 0.2 and top-p 0.9. A dense model whose
# generation_config.json samples gives its own settings instead.
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
SAMPLING_SEEDS = (0, 1, 2)


def recommended_sampling(dense) -> dict:
    """``dense``'s own sampling settings when its generation config samples,
    else RECOMMENDED_SAMPLING; the dict says where it came from."""
    config = getattr(dense, "generation_config", None)
    if config is not None and getattr(config, "do_sample", False) and config.temperature:
        return {"temperature": float(config.temperature), "top_p": float(config.top_p or 1.0), "source": "dense"}
    return {**RECOMMENDED_SAMPLING, "source": "model card"}


@contextmanager
def routing_override(model, mode: str | int) -> Iterator[None]:
    """Generate with the router's choice replaced, to separate what the tuned
    weights do from what routing does. ``"all"``: every expert computes for
    every token and their outputs add up (with disjoint experts, the tuned
    weights as one dense-size MLP: nothing pruned, nothing routed); an int:
    every token goes to that expert in every layer (a fixed cut)."""
    patched: list[tuple[object, str]] = []
    try:
        if mode == "all":
            for layer in model.model.layers:
                experts = layer.mlp.experts

                def every_expert(x, expert_ids, act, experts=experts):
                    inner = act(torch.einsum("th,eih->eti", x, experts.gate_proj)) * torch.einsum(
                        "th,eih->eti", x, experts.up_proj
                    )
                    return torch.einsum("eti,ehi->th", inner, experts.down_proj).to(x.dtype)

                experts.forward = every_expert
                patched.append((experts, "forward"))
        else:
            expert = int(mode)

            def fixed(input_ids, attention_mask=None):
                return None, torch.full_like(input_ids, expert)

            model.route = fixed
            patched.append((model, "route"))
        yield
    finally:
        for obj, name in patched:
            del obj.__dict__[name]


def _repetition_summary(answers: list[list[int]], dense_answers: list[list[int]]) -> dict:
    """Mean repeated-4-gram fraction of ``answers``, its ratio to the dense
    answers', that ratio on the even and the odd questions (its spread), and
    token F1 against the dense answers."""
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    rep = [repeated_ngram_fraction(a) for a in answers]
    rep_dense = [repeated_ngram_fraction(a) for a in dense_answers]
    ratio = lambda a, d: mean(a) / mean(d) if mean(d) else math.inf  # noqa: E731
    return {
        "repetition": mean(rep),
        "ratio_to_dense": ratio(rep, rep_dense),
        "ratio_to_dense_halves": [ratio(rep[0::2], rep_dense[0::2]), ratio(rep[1::2], rep_dense[1::2])],
        "token_f1_vs_dense": mean([token_f1(a, d) for a, d in zip(answers, dense_answers, strict=True)]),
        "answer_tokens": mean([len(a) for a in answers]),
    }


def chat_ablation(
    model, tokenizer, dense_answers, disjoint: bool, prompts=CHAT_PROMPTS, max_new_tokens: int = CHAT_MAX_NEW_TOKENS
) -> dict:
    """The chat check's greedy repetition with the router replaced
    (routing_override): every expert active (disjoint experts only: there it
    is the tuned dense-size MLP, so its excess over dense is what tuning
    moved) and each expert fixed for every token (what a fixed cut of the
    same active size gives). The served model's own figure is the chat
    check's ``repetition_readme``."""
    modes: list[tuple[str, str | int]] = [("every expert active", "all")] if disjoint else []
    modes += [(f"expert {e} for every token", e) for e in range(model.config.num_experts)]
    out = {}
    for name, mode in modes:
        with routing_override(model, mode):
            answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
        out[name] = _repetition_summary(answers, dense_answers)
    return out


def chat_sampled(
    dense,
    model,
    tokenizer,
    sampling: dict,
    seeds=SAMPLING_SEEDS,
    prompts=CHAT_PROMPTS,
    max_new_tokens=CHAT_MAX_NEW_TOKENS,
) -> dict:
    """The chat check with ``sampling`` (the settings a user would serve
    with) instead of greedy decoding, once per seed for both models: the
    repetition of each and their ratio per seed and pooled."""
    runs = []
    for seed in seeds:
        params = {**sampling, "seed": seed}
        dense_answers = greedy_answers(dense, tokenizer, prompts, max_new_tokens, sampling=params)
        readme_answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, sampling=params)
        summary = _repetition_summary(readme_answers, dense_answers)
        summary["repetition_dense"] = sum(repeated_ngram_fraction(a) for a in dense_answers) / len(dense_answers)
        runs.append({"seed": seed, **summary})
    pooled_dense = sum(r["repetition_dense"] for r in runs) / len(runs)
    pooled = sum(r["repetition"] for r in runs) / len(runs)
    return {
        "sampling": sampling,
        "seeds": list(seeds),
        "repetition_dense": pooled_dense,
        "repetition_readme": pooled,
        "ratio_to_dense": pooled / pooled_dense if pooled_dense else math.inf,
        "per_seed": runs,
    }
