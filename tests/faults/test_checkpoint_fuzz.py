# SPDX-License-Identifier: Apache-2.0
"""Every checkpoint reader under random, truncated and mutated input: it
returns a value or raises ReadMEConfigError (whose subclasses name the file),
never another exception. Inputs: config.json, a safetensors header, the
safetensors index, the authors' mask.pt, pytorch_model.bin and config.json."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_readme.checkpoint.authors import import_authors_checkpoint, load_mask_file, read_checkpoint_weights
from vllm_readme.checkpoint.io import load_readme_config, read_safetensors_shapes, safetensors_files
from vllm_readme.configuration_readme import ReadMEConfigError, checkpoint_tensor_shapes

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW_FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Integers stay below sizes that would make a reader allocate per layer for
# minutes; the point is types and structure, not scale.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 4096) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def value_or_named_error(read, *args):
    """``read(*args)``; a ReadMEConfigError is an allowed outcome and must say something."""
    try:
        return read(*args)
    except ReadMEConfigError as exc:
        assert str(exc).strip()
        return exc


def mutated_json(draw, document: dict) -> dict:
    """``document`` with one to three fields (top level or one level down)
    removed or replaced by any JSON value."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        holder = document
        nested = [k for k, v in document.items() if isinstance(v, dict) and v]
        if nested and draw(st.booleans()):
            holder = document[draw(st.sampled_from(sorted(nested)))]
        if not holder:
            continue
        key = draw(st.sampled_from(sorted(holder)))
        if draw(st.booleans()):
            del holder[key]
        else:
            holder[key] = draw(JSON_VALUES)
    return document


def file_contents(valid: bytes, mutations=None):
    """Random bytes, a truncation of ``valid``, or (if given) a mutation."""
    choices = [st.binary(max_size=300), st.integers(0, len(valid)).map(lambda n: valid[:n])]
    if mutations is not None:
        choices.append(mutations)
    return st.one_of(*choices)


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="checkpoint-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------
# Our format


@st.composite
def config_documents(draw, valid: dict) -> bytes:
    return json.dumps(mutated_json(draw, valid)).encode()


def test_config_json(tiny_gqa, scratch):
    folder = scratch / "config"
    folder.mkdir()
    valid = (tiny_gqa / "config.json").read_bytes()

    @FUZZ
    @given(file_contents(valid, config_documents(json.loads(valid))))
    @example(valid[:-2])
    @example(json.dumps({**json.loads(valid), "num_experts": "4"}).encode())
    def check(content: bytes):
        (folder / "config.json").write_bytes(content)
        config = value_or_named_error(load_readme_config, folder)
        if not isinstance(config, ReadMEConfigError):
            value_or_named_error(checkpoint_tensor_shapes, config)

    check()


@st.composite
def safetensors_with_mutated_header(draw, valid: bytes) -> bytes:
    (length,) = struct.unpack("<Q", valid[:8])
    header = mutated_json(draw, json.loads(valid[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + valid[8 + length :]


def test_safetensors_header(tiny_gqa, scratch):
    file = scratch / "model.safetensors"
    valid = (tiny_gqa / "model.safetensors").read_bytes()

    @FUZZ
    @given(file_contents(valid, safetensors_with_mutated_header(valid)))
    @example(valid[:-1])
    def check(content: bytes):
        file.write_bytes(content)
        value_or_named_error(read_safetensors_shapes, file)

    check()


@st.composite
def index_documents(draw) -> bytes:
    valid = {"metadata": {"total_size": 8}, "weight_map": {"lm_head.weight": "model-1.safetensors"}}
    return json.dumps(mutated_json(draw, valid)).encode()


def test_safetensors_index(scratch):
    folder = scratch / "index"
    folder.mkdir()
    (folder / "model-1.safetensors").write_bytes(b"")
    valid = b'{"weight_map": {"lm_head.weight": "model-1.safetensors"}}'

    @FUZZ
    @given(file_contents(valid, index_documents()))
    def check(content: bytes):
        (folder / "model.safetensors.index.json").write_bytes(content)
        value_or_named_error(safetensors_files, folder)

    check()


# ---------------------------------------------------------------------------
# The authors' files (importer)


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory) -> Path:
    from authors_layout import write_authors_checkpoint

    src = tmp_path_factory.mktemp("authors") / "ckpt"
    write_authors_checkpoint(src, "bin")
    return src


MASK_KEYS = st.sampled_from(["model.layers.0.mlp.down_proj", "module.model.layers.1.mlp.down_proj", 0, 1, "1", "x"])
MASK_VALUES = st.one_of(
    st.none(),
    st.integers(-2, 2),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(-1, 2), max_size=10),
    st.lists(st.lists(st.integers(0, 1), max_size=9), max_size=3),
    st.lists(st.integers(0, 1), min_size=8, max_size=8).map(lambda v: torch.tensor(v, dtype=torch.float16)),
)
MASK_ENTRIES = (
    st.fixed_dictionaries(
        {"residual": MASK_VALUES}, optional={0: MASK_VALUES, "1": MASK_VALUES, "experts": MASK_VALUES}
    )
    | st.dictionaries(st.sampled_from(["residual", "experts", 0, 1, "2", "a"]), MASK_VALUES, max_size=4)
    | MASK_VALUES
)
# Mostly one entry per layer of the 2-layer model the reader is asked for,
# so that the values themselves are read.
MASK_FILES = st.one_of(
    st.fixed_dictionaries({"model.layers.0.mlp.down_proj": MASK_ENTRIES, 1: MASK_ENTRIES}),
    st.dictionaries(MASK_KEYS, MASK_ENTRIES, max_size=3),
    st.lists(MASK_ENTRIES, max_size=3),
)


def test_mask_file(authors_checkpoint, scratch):
    path = scratch / "mask.pt"
    valid = (authors_checkpoint / "mask.pt").read_bytes()

    @FUZZ
    @given(file_contents(valid) | MASK_FILES)
    @example(b"\x80")  # the unpickler's own IndexError
    @example({0: {"residual": "01", 0: [0] * 8}, 1: {"residual": [0] * 8, 0: [0] * 8}})
    @example({0: {"residual": [[0, 1], [0]], 0: [0] * 8}, 1: {"residual": [0] * 8, 0: [0] * 8}})
    @example({0: {"residual": [0] * 8, "experts": None}, 1: {"residual": [0] * 8, 0: [0] * 8}})
    def check(content):
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        value_or_named_error(load_mask_file, path, 2, 8, 2)

    check()


def test_pytorch_model_bin(authors_checkpoint, scratch):
    folder = scratch / "bin"
    folder.mkdir()
    valid = (authors_checkpoint / "pytorch_model.bin").read_bytes()

    @SLOW_FUZZ
    @given(file_contents(valid))
    @example(b"\x80")
    @example(valid[: len(valid) // 2])
    def check(content: bytes):
        (folder / "pytorch_model.bin").write_bytes(content)
        value_or_named_error(read_checkpoint_weights, folder)

    check()


@st.composite
def authors_config_documents(draw, valid: dict) -> bytes:
    return json.dumps(mutated_json(draw, valid)).encode()


def test_authors_config_json(authors_checkpoint, scratch):
    """The whole import on a mutated config.json: a finished checkpoint or
    a named error (and then no output folder)."""
    src = scratch / "authors"
    shutil.copytree(authors_checkpoint, src)
    valid = (authors_checkpoint / "config.json").read_bytes()

    @SLOW_FUZZ
    @given(file_contents(valid, authors_config_documents(json.loads(valid))))
    def check(content: bytes):
        (src / "config.json").write_bytes(content)
        out = scratch / "imported"
        result = value_or_named_error(import_authors_checkpoint, src, None, out)
        assert out.is_dir() != isinstance(result, ReadMEConfigError)
        shutil.rmtree(out, ignore_errors=True)

    check()
