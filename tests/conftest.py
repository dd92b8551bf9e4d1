# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: tiny Read-ME checkpoints built here (nothing downloaded),
in-process vLLM engines, and the reference model as oracle."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path

# In-process engines start faster (no engine-core process to spawn); tests that need vLLM's
# multi-process layout (server, TP) start their own subprocesses.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_readme.checkpoint.tiny import SHAPES, build_tiny_checkpoint  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "Return a new list containing all items from the iterable in ascending order, and",
    "A",
    "Logging is performed by calling methods on instances of the Logger class, which are arranged",
]


# `vllm-readme refactor` options small enough for a test (a tiny dense Llama, minutes).
TINY_REFACTOR = dict(
    calib=["python-docs", "stdlib-docstrings"],
    num_experts=4,
    keep=0.5,
    stats_tokens=2048,
    router_tokens=4096,
    router_steps=20,
    router_batch=4,
    router_hidden=64,
    router_heads=2,
    tune_tokens=2048,
    tune_batch=4,
    held_out_tokens=1024,
    ood_tokens=1024,
    block_len=128,
    tune_eval_points=2,
    checkpoint_every=5,
)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_tiny_checkpoint(root / name, SHAPES[name](), seed=7) for name in SHAPES}


@pytest.fixture(scope="session")
def tiny_gqa(tiny_checkpoints) -> Path:
    return tiny_checkpoints["gqa"]


@pytest.fixture(scope="session")
def tiny_mha(tiny_checkpoints) -> Path:
    return tiny_checkpoints["mha"]


def engine_kwargs(**overrides) -> dict:
    kwargs = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        kv_cache_memory_bytes=32 << 20,
        max_num_seqs=8,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


@contextmanager
def vllm_engine(model: Path, **overrides):
    """An in-process vLLM engine, torn down afterwards so the next can start."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = None
    try:
        llm = LLM(model=str(model), **engine_kwargs(**overrides))
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def greedy_outputs(model: Path, probe=None, max_tokens: int = 24, **overrides) -> tuple[list[list[int]], object]:
    """Greedy token ids for PROMPTS from an in-process engine, and what
    ``probe(model)`` returns in the worker afterwards (None without one)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with vllm_engine(model, max_num_seqs=4, **overrides) as llm:
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        found = llm.apply_model(probe)[0] if probe is not None else None
    return outputs, found


SERVE_TIMEOUT_S = 240


@contextmanager
def served(model: Path, log_path: Path, *args: str, env: dict | None = None, timeout_s: float = SERVE_TIMEOUT_S):
    """``vllm-readme serve MODEL`` as a real multi-process server; yields
    (process, base URL without /v1). Terminated afterwards."""
    from vllm_readme.server_process import served as serve

    with serve(
        model, *args, env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}, log_path=log_path, timeout_s=timeout_s
    ) as (proc, url):
        yield proc, url


def post_json(url: str, body: bytes) -> tuple[int, str]:
    """POST raw bytes as JSON: (HTTP status, body), errors included."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def varied_prompt(i: int) -> str:
    """The i-th of many different prompts for concurrent clients."""
    words = ["logging", "the fox", "a list", "tokens", "experts", "caching", "routes", "the river"]
    return f"Request {i} about {words[i % len(words)]}" + " and more" * (i % 5)


async def stream_greedy(client, model: str, prompt: str, new_tokens: int) -> tuple[str, list[int]]:
    """One streaming completion through the openai client, greedy, without
    stopping at EOS: ("completed", its token ids) or ("refused STATUS", [])."""
    from openai import APIStatusError

    try:
        ids: list[int] = []
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                ids.extend(getattr(choice, "token_ids", None) or [])
        return "completed", ids
    except APIStatusError as exc:
        return f"refused {exc.status_code}", []


def scrape(url: str) -> dict[str, float]:
    """A server's /metrics as {'name{labels}': value} (histogram buckets dropped)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("engine", "model_name"))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


def streams_off_reference(model: Path, results: list, prompts: list[str], new_tokens: int) -> list[int]:
    """The indices of the streams (``stream_greedy`` results) whose tokens
    are not the reference's greedy tokens for their prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = load_reference(model)
    return [
        i
        for i, (result, prompt) in enumerate(zip(results, prompts, strict=True))
        if not isinstance(result, tuple)
        or result[1] != reference_greedy(reference, tokenizer(prompt).input_ids, new_tokens)
    ]


def load_reference(model: Path):
    from vllm_readme.modeling_readme import ReadMEForCausalLM

    return ReadMEForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def reference_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """``n`` greedy token ids after ``prompt_ids`` from the reference model
    (a checkpoint folder, or a model already loaded): the oracle for what
    vLLM serves."""
    if isinstance(model, (str, Path)):
        model = load_reference(Path(model))
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


class RouteRecorder:
    """A route observer (the model calls it with positions and expert ids
    after every forward); tests add it in the worker via LLM.apply_model."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, positions: torch.Tensor, expert_ids: torch.Tensor) -> None:
        self.steps.append((positions.cpu().clone(), expert_ids.cpu().clone()))


def start_route_trace(model) -> None:
    model.route_observers.append(RouteRecorder())


def take_route_trace(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    recorder = next(o for o in model.route_observers if isinstance(o, RouteRecorder))
    model.route_observers.remove(recorder)
    return recorder.steps


def edit_config(path: Path, **changes) -> None:
    """Change config.json fields in place; ``router.X`` edits the router's."""
    import json

    data = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("router."):
            data["router"][key.split(".", 1)[1]] = value
        else:
            data[key] = value
    (path / "config.json").write_text(json.dumps(data))


def error_chain(exc: BaseException) -> str:
    """All messages along an exception's cause/context chain."""
    messages, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        messages.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)
