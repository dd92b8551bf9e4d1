# SPDX-License-Identifier: Apache-2.0
"""`vllm-readme serve` (vLLM's own `vllm serve`) as a real multi-process
OpenAI server, queried with the `openai` client."""

import pytest
from conftest import reference_greedy, served
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow  # multi-process vLLM


@pytest.fixture(scope="module")
def server(tiny_gqa, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ("--dtype", "float32", "--max-model-len", "512", "--served-model-name", "tiny-readme")
    with served(tiny_gqa, log_path, *args, "--enforce-eager", "--max-num-seqs", "4") as (_, url):
        yield url + "/v1"


def greedy_completion(prompt) -> dict:
    """12 greedy tokens with their ids, for comparison with the reference."""
    return dict(
        model="tiny-readme",
        prompt=prompt,
        max_tokens=12,
        temperature=0.0,
        logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )


def test_completions_plain_and_streaming_match_the_reference(server, tiny_gqa):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused")
    prompt = "The quick brown fox"
    kwargs = greedy_completion(prompt)
    plain = client.completions.create(**kwargs)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs))
    assert plain.usage.completion_tokens == 12
    assert streamed == plain.choices[0].text
    tok = AutoTokenizer.from_pretrained(tiny_gqa)
    expected = reference_greedy(tiny_gqa, tok(prompt).input_ids, 12)
    assert _token_ids(plain.choices[0].logprobs.tokens) == expected


def test_chat_plain_and_streaming(server, tiny_gqa):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    kwargs = dict(
        model="tiny-readme",
        messages=messages,
        max_tokens=10,
        temperature=0.0,
        logprobs=True,
        top_logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.role == "assistant"
    assert streamed == plain.choices[0].message.content
    # The server applied the checkpoint's chat template.
    tok = AutoTokenizer.from_pretrained(tiny_gqa)
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert plain.usage.prompt_tokens == len(templated)
    expected = reference_greedy(tiny_gqa, templated, 10)
    assert _token_ids(t.token for t in plain.choices[0].logprobs.content) == expected


def _token_ids(tokens) -> list[int]:
    """`return_tokens_as_token_ids` spells each token "token_id:N": compare ids,
    not text, which may hold back an incomplete UTF-8 byte at the end."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_models_endpoint_lists_the_served_model(server):
    from openai import OpenAI

    assert [m.id for m in OpenAI(base_url=server, api_key="unused").models.list()] == ["tiny-readme"]


def test_expert_aware_scheduler_gets_the_models_routes_through_vllm_serve(tiny_gqa, tmp_path):
    """`vllm serve` runs three processes (API server, engine core with the
    scheduler, worker with the model): the model's routes must cross from
    the worker to the scheduler (route_source=model, the default) and the
    outputs stay the reference's."""
    import json
    import urllib.request

    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    args = ("--dtype", "float32", "--max-model-len", "512", "--served-model-name", "tiny-readme", "--enforce-eager")
    options = json.dumps({"vllm_readme": {"policy": "cost-model"}})
    scheduler = ("--scheduler-cls", "vllm_readme.scheduler.ExpertAwareScheduler", "--additional-config", options)
    prompts = ["The quick brown fox", "Once upon a time", "In the beginning"]
    with served(tiny_gqa, tmp_path / "server.log", *args, *scheduler) as (_, url):
        out = OpenAI(base_url=url + "/v1", api_key="unused").completions.create(**greedy_completion(prompts))
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            samples = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    tok = AutoTokenizer.from_pretrained(tiny_gqa)
    for choice in out.choices:
        expected = reference_greedy(tiny_gqa, tok(prompts[choice.index]).input_ids, 12)
        assert _token_ids(choice.logprobs.tokens) == expected
    guesses = samples.get("vllm_readme:scheduler_route_guesses_total", 0)
    # Every decode after a request's first has its previous token's route.
    assert guesses >= len(prompts) * 8, samples
    assert 0 <= samples["vllm_readme:scheduler_route_guesses_right_total"] <= guesses
