# SPDX-License-Identifier: Apache-2.0
"""`vllm-readme import` on checkpoints laid out as the authors' code writes
them: vLLM on the imported model against an independent
implementation of the authors' forward (tests/checkpoint/authors_layout.py)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from authors_layout import AuthorsModel, Shape, write_authors_checkpoint
from conftest import edit_config, load_reference, start_route_trace, take_route_trace, vllm_engine

from vllm_readme import ReadMEConfigError
from vllm_readme.checkpoint.authors import import_authors_checkpoint
from vllm_readme.cli import main as cli_main

PROMPTS = [
    "The logger",
    "Return a new list containing all items from the iterable in ascending order",
    "Logging is performed by calling methods on instances of the Logger class",
]
NEW_TOKENS = 12
# fp32, vLLM's kernels against plain PyTorch (docs/authors_checkpoint.md's target: 1e-4).
LOGIT_ATOL = 1e-4


def _import_with_cli(src, out, *extra) -> None:
    """Exactly what a user types: no option beyond the paths."""
    assert cli_main(["import", "--llama", str(src), "--masks", str(src / "mask.pt"), "--out", str(out), *extra]) == 0


@pytest.mark.parametrize("fmt", ["bin", "safetensors-sharded"])
def test_vllm_on_the_imported_checkpoint_reproduces_the_authors_precise_generation(tmp_path, fmt):
    """Greedy tokens, raw logits (every prompt and generated position, top 5)
    and the route of every token equal the authors' precise-mode generation."""
    from vllm import SamplingParams

    authors = write_authors_checkpoint(tmp_path / "authors", fmt)
    out = tmp_path / "readme"
    _import_with_cli(tmp_path / "authors", out)

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    with vllm_engine(out, max_model_len=256, logprobs_mode="raw_logits", max_num_seqs=1) as llm:
        results = []
        for prompt in PROMPTS:  # one at a time: the route trace is per engine step
            llm.apply_model(start_route_trace)
            output = llm.generate([prompt], params)[0]
            results.append((output, llm.apply_model(take_route_trace)[0]))

    worst, distinct_routes = 0.0, set()
    for output, trace in results:
        prompt_ids = list(output.prompt_token_ids)
        tokens, routes, logits = authors.generate(prompt_ids, NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == tokens, output.prompt
        vllm_routes = {}
        for positions, expert_ids in trace:
            vllm_routes.update(zip(positions.tolist(), expert_ids.tolist(), strict=True))
        assert [vllm_routes[p] for p in range(len(routes))] == routes, output.prompt
        distinct_routes.update(routes)
        worst = max(worst, _max_logit_error(output, logits))
    print(f"\n[{fmt}] max |logit(vLLM) - logit(authors)| = {worst:.2e}; experts used: {sorted(distinct_routes)}")
    assert len(distinct_routes) >= 3, "the test model must route tokens to several experts"
    assert worst < LOGIT_ATOL


def _max_logit_error(output, authors_logits: torch.Tensor) -> float:
    """vLLM returns raw logits (logprobs_mode='raw_logits') for its top-k."""
    prompt_len = len(output.prompt_token_ids)
    worst = 0.0
    for position, entries in enumerate(output.prompt_logprobs or []):
        for token, lp in (entries or {}).items():
            worst = max(worst, abs(lp.logprob - float(authors_logits[position - 1, token])))
    for step, entries in enumerate(output.outputs[0].logprobs):
        for token, lp in entries.items():
            worst = max(worst, abs(lp.logprob - float(authors_logits[prompt_len - 1 + step, token])))
    return worst


# ---------------------------------------------------------------------------
# The comparison catches the usual importer bugs (negative controls). The
# reference model (transformers) stands in for vLLM here: the tests above and
# test_vllm_model.py prove the two compute the same.

IDS = torch.tensor([[5, 77, 130, 9, 250, 31, 64, 18, 300, 42, 7, 199, 88, 150, 3, 260, 111, 47, 222, 90]])


def _mismatch(authors: AuthorsModel, imported) -> str | None:
    """What differs between the imported model and the authors' forward on
    IDS: routes, router logits, or backbone logits (None if nothing)."""
    model = load_reference(imported)
    with torch.no_grad():
        router_logits, routes = model.route(IDS)
        logits = model(IDS).logits[0]
    their_router = authors.router_logits(IDS)
    their_routes = their_router.argmax(-1)
    problems = []
    if not torch.equal(routes, their_routes):
        problems.append(f"routes differ at {int((routes != their_routes).sum())} of {IDS.shape[1]} tokens")
    if not torch.allclose(router_logits, their_router, atol=LOGIT_ATOL, rtol=0):
        problems.append(f"router logits differ by {float((router_logits - their_router).abs().max()):.2e}")
    their_logits = authors.logits(IDS, their_routes[0])
    if not torch.allclose(logits, their_logits, atol=LOGIT_ATOL, rtol=0):
        problems.append(f"logits differ by {float((logits - their_logits).abs().max()):.2e}")
    return "; ".join(problems) or None


@pytest.fixture(scope="module")
def authors_safetensors(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    return root / "ckpt", write_authors_checkpoint(root / "ckpt", "safetensors")


def test_imported_model_matches_the_authors_forward(authors_safetensors, tmp_path):
    src, authors = authors_safetensors
    _import_with_cli(src, tmp_path / "out")
    assert _mismatch(authors, tmp_path / "out") is None
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["router"]["rms_norm_eps"] == 1e-6 and config["router"]["rope_theta"] == 50000.0
    assert config["router"]["attention_scale"] == 1.0 and config["router"]["num_attention_heads"] == 2


@pytest.mark.parametrize(
    "bug",
    ["router eps of the backbone", "attention scale 1/sqrt(d)", "masks on the wrong layer", "expert order off by one"],
)
def test_the_comparison_catches_importer_bugs(authors_safetensors, tmp_path, bug):
    src, authors = authors_safetensors
    out = tmp_path / "out"
    if bug in ("masks on the wrong layer", "expert order off by one"):
        masks = torch.load(src / "mask.pt", weights_only=True)
        keys = sorted(masks)
        if bug == "masks on the wrong layer":
            masks = {keys[i]: masks[keys[(i + 1) % len(keys)]] for i in range(len(keys))}
        else:
            masks = {
                k: {"residual": v["residual"], **{e: v[(e + 1) % (len(v) - 1)] for e in range(len(v) - 1)}}
                for k, v in masks.items()
            }
        torch.save(masks, tmp_path / "mask.pt")
        assert cli_main(["import", "--llama", str(src), "--masks", str(tmp_path / "mask.pt"), "--out", str(out)]) == 0
    else:
        _import_with_cli(src, out)
        if bug == "router eps of the backbone":
            edit_config(out, **{"router.rms_norm_eps": 1e-5})
        else:
            edit_config(out, **{"router.attention_scale": 32**-0.5})
    problem = _mismatch(authors, out)
    print(f"\n[{bug}] caught: {problem}")
    assert problem is not None


def test_a_two_layer_router_matches_the_authors_training_forward(tmp_path):
    """With more than one router layer their decode-step code cannot run (its
    shapes stop broadcasting); the imported model follows their training-time
    forward, which is what the router learned (docs/authors_checkpoint.md)."""
    shape = Shape(router_layers=2, router_heads=4, normalizer=8.0, experts=3)
    authors = write_authors_checkpoint(tmp_path / "authors", "bin-sharded", shape, seed=1)
    _import_with_cli(tmp_path / "authors", tmp_path / "out")
    assert _mismatch(authors, tmp_path / "out") is None


def test_overrides_only_replace_config_values(authors_safetensors, tmp_path):
    src, _ = authors_safetensors
    _import_with_cli(src, tmp_path / "out", "--router-normalizer", "4", "--router-heads", "4")
    router = json.loads((tmp_path / "out" / "config.json").read_text())["router"]
    assert router["attention_scale"] == 0.25 and router["num_attention_heads"] == 4 and router["head_dim"] == 16


def test_overlapping_masks_are_imported_as_the_authors_sum(tmp_path):
    """Their MLP multiplies by residual + mask_e: a channel in both counts twice."""
    authors = write_authors_checkpoint(tmp_path / "authors", "safetensors", seed=2)
    masks = torch.load(tmp_path / "authors" / "mask.pt", weights_only=True)
    for entry in masks.values():
        entry[1] = torch.clamp(entry[1] + entry["residual"], max=1)  # expert 1 now includes the shared channels
    torch.save(masks, tmp_path / "authors" / "mask.pt")
    authors.masks = [masks[f"module.model.layers.{i}.mlp.down_proj"] for i in range(authors.shape.layers)]
    _import_with_cli(tmp_path / "authors", tmp_path / "out")
    assert _mismatch(authors, tmp_path / "out") is None


# ---------------------------------------------------------------------------
# Bad input: the error names what was expected and what was found; nothing
# is written.


def _rewrite_masks(src, change) -> None:
    masks = torch.load(src / "mask.pt", weights_only=True)
    torch.save(change(masks), src / "mask.pt")


def _drop_last_layer(masks):
    return {k: v for k, v in masks.items() if not k.startswith("module.model.layers.1.")}


def _cut_channels(masks):
    return {k: {e: m[:200] for e, m in v.items()} for k, v in masks.items()}


def _drop_an_expert(masks):
    return {k: {e: m for e, m in v.items() if e != 3} for k, v in masks.items()}


def _bad_keys(masks):
    return {f"encoder.block.{i}": v for i, v in enumerate(masks.values())}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_last_layer, r"masks for layer\(s\) \[0\], but the model has 2 layers"),
        (_cut_channels, r"covers 200 channels, but the MLP has intermediate_size=256"),
        (_drop_an_expert, r"masks for 3 experts, but the router predicts 4"),
        (_bad_keys, r"key 'encoder.block.0' names no MLP"),
    ],
)
def test_a_mask_file_that_does_not_fit_is_named(tmp_path, change, message):
    src = tmp_path / "authors"
    write_authors_checkpoint(src, "safetensors")
    _rewrite_masks(src, change)
    with pytest.raises(ReadMEConfigError, match=message):
        import_authors_checkpoint(src, src / "mask.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite_weights(src, change) -> None:
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(src / "model.safetensors")), src / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_without_the_router_is_named(tmp_path):
    src = tmp_path / "authors"
    write_authors_checkpoint(src, "safetensors")
    _rewrite_weights(src, lambda w: {k: v for k, v in w.items() if not k.startswith("cluster_predictor.")})
    with pytest.raises(ReadMEConfigError, match=r"no cluster_predictor\.\* weights, so the router is missing"):
        import_authors_checkpoint(src, None, tmp_path / "out")


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("wpe", r"cluster_predictor.wpe \(learned position embeddings"),
        ("nonautoregressive", r"nonautoregressive=true"),
        ("old nested names", r"unknown router variant: unexpected cluster_predictor parameters"),
    ],
)
def test_an_unknown_router_variant_is_named(tmp_path, variant, message):
    src = tmp_path / "authors"
    write_authors_checkpoint(src, "safetensors")
    if variant == "wpe":
        _rewrite_weights(src, lambda w: {**w, "cluster_predictor.wpe.weight": torch.zeros(4096, 64)})
    elif variant == "nonautoregressive":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "nonautoregressive": True}))
    else:
        _rewrite_weights(
            src,
            lambda w: {
                k.replace("cluster_predictor.q_proj_0", "cluster_predictor.layers.0.self_attn.q_proj"): v
                for k, v in w.items()
            },
        )
    with pytest.raises(ReadMEConfigError, match=message):
        import_authors_checkpoint(src, None, tmp_path / "out")


def test_the_cli_names_the_problem_and_exits_2(tmp_path, capsys):
    src = tmp_path / "authors"
    write_authors_checkpoint(src, "bin")
    config = json.loads((src / "config.json").read_text())
    del config["n_head"]
    (src / "config.json").write_text(json.dumps(config))
    assert cli_main(["import", "--llama", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"vllm-readme import: error: {src}/config.json has no n_head" in err and "--router-heads" in err


# ---------------------------------------------------------------------------
# The output appears whole or not at all; unreadable inputs end the command
# in one line naming the file.


def test_an_import_that_fails_after_writing_leaves_no_folder(tmp_path):
    """The tokenizer has more tokens than the router can route: the check
    runs on the written checkpoint, and what was written is removed."""
    from vllm_readme.checkpoint.tiny import train_tokenizer

    src = tmp_path / "authors"
    write_authors_checkpoint(src, "safetensors")
    train_tokenizer(vocab_size=512).save_pretrained(src)
    with pytest.raises(ReadMEConfigError, match=r"the tokenizer has 512 tokens but router.vocab_size is"):
        import_authors_checkpoint(src, None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authors"]


def test_an_import_does_not_write_into_a_folder_that_holds_files(authors_safetensors, tmp_path):
    src, _ = authors_safetensors
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ReadMEConfigError, match=r"already exists and is not empty"):
        import_authors_checkpoint(src, None, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def _garbage(file) -> None:
    file.write_bytes(b"PK\x03\x04 not a torch file")


def _truncate(file) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize(
    ("fmt", "bad_file", "corrupt", "message"),
    [
        ("bin", "mask.pt", _garbage, r"not a readable mask file .* Pass the mask.pt"),
        ("bin", "pytorch_model.bin", _truncate, r"cannot be read as weights .* truncated or corrupt"),
        ("bin", "config.json", lambda f: f.write_text("{'n_head': 2}"), r"not valid JSON"),
        (
            "bin-sharded",
            "pytorch_model.bin.index.json",
            lambda f: f.write_text('{"metadata": {}}'),
            r"has no weight_map object",
        ),
        ("safetensors", "model.safetensors", _truncate, r"cannot be read as weights .* truncated or corrupt"),
    ],
)
def test_import_names_an_unreadable_file_in_one_line(tmp_path, fmt, bad_file, corrupt, message):
    src = tmp_path / "authors"
    write_authors_checkpoint(src, fmt)
    corrupt(src / bad_file)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_readme.cli", "import", "--llama", str(src), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vllm-readme import: error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"vllm-readme import: error: {src / bad_file}: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["authors"]
