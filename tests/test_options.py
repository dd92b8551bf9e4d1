# SPDX-License-Identifier: Apache-2.0
"""The plugin's options (vllm_readme/options.py): every bad value is refused
at start-up, before any weight loads, with a message that names the field
(or the environment variable), the value and what it accepts; fuzzed, the
parsers give a valid options object or a ReadMEOptionsError, nothing else."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import pytest
from conftest import error_chain, vllm_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_readme.configuration_readme import ReadMEConfig
from vllm_readme.model_executor.config import expert_page_bytes
from vllm_readme.options import (
    MAX_HELD_BACK,
    WHERE,
    ExpertCacheOptions,
    PoolSize,
    ReadMEOptionsError,
    SchedulerOptions,
    _coerce,
)

GROUPS = (SchedulerOptions, ExpertCacheOptions)
FIELDS = {f.name: f for group in GROUPS for f in dataclasses.fields(group)}


def parse(options, env=None) -> tuple[SchedulerOptions, ExpertCacheOptions]:
    additional = {"vllm_readme": options}
    return tuple(group.from_additional_config(additional, env=env or {}) for group in GROUPS)


# (options, the field named, the value as the message shows it, what it accepts)
BAD_VALUES = [
    ({"expert_pool": "nan"}, "expert_pool", "'nan'", '"512MiB"'),
    ({"expert_pool": "inf"}, "expert_pool", "'inf'", '"512MiB"'),
    ({"expert_pool": "-inf"}, "expert_pool", "'-inf'", '"512MiB"'),
    ({"expert_pool": "nan%"}, "expert_pool", "'nan%'", '("50%")'),
    ({"expert_pool": "1.2.3MiB"}, "expert_pool", "'1.2.3MiB'", '"512MiB"'),
    ({"expert_pool": "1" * 400 + "GiB"}, "expert_pool", "'1111", '"512MiB"'),
    ({"expert_pool": "9" * 305 + "GiB"}, "expert_pool", "'9999", "at least 1 B and finite"),
    ({"expert_pool": "0.5b"}, "expert_pool", "'0.5b'", "at least 1 B"),
    ({"expert_pool": "0"}, "expert_pool", "'0'", "must be > 0"),
    ({"expert_pool": "-2"}, "expert_pool", "'-2'", "must be > 0"),
    ({"expert_pool": "150%"}, "expert_pool", "'150%'", "(0%, 100%]"),
    ({"expert_pool": 1e400}, "expert_pool", "'inf'", '"512MiB"'),
    ({"expert_pool": True}, "expert_pool", "True", "str or null"),
    ({"expert_pool": [50]}, "expert_pool", "[50]", "str or null"),
    ({"max_held_back": math.nan}, "max_held_back", "nan", "a whole number"),
    ({"max_held_back": math.inf}, "max_held_back", "inf", "a whole number"),
    ({"max_held_back": 2.5}, "max_held_back", "2.5", "a whole number"),
    ({"max_held_back": "2.5"}, "max_held_back", "'2.5'", "a whole number"),
    ({"max_held_back": True}, "max_held_back", "True", "a whole number"),
    ({"max_held_back": -1}, "max_held_back", "-1", f"<= {MAX_HELD_BACK}"),
    ({"max_held_back": MAX_HELD_BACK + 1}, "max_held_back", str(MAX_HELD_BACK + 1), f"<= {MAX_HELD_BACK}"),
    ({"max_held_back": 10**30}, "max_held_back", str(10**30), f"<= {MAX_HELD_BACK}"),
    ({"max_held_back": "9" * 5000}, "max_held_back", "'9999", "a whole number"),
    ({"route_window": 0}, "route_window", "0", ">= 1 token"),
    ({"route_window": -64}, "route_window", "-64", ">= 1 token"),
    ({"route_window": math.nan}, "route_window", "nan", "a whole number"),
    ({"route_window": None}, "route_window", "None", "a whole number"),
    ({"prefetch_layers": 0}, "prefetch_layers", "0", '"prefetch": false'),
    ({"prefetch_layers": math.inf}, "prefetch_layers", "inf", "a whole number"),
    ({"prefetch_layers": "two"}, "prefetch_layers", "'two'", "a whole number"),
    ({"log_every": -1}, "log_every", "-1", "0 = no log lines"),
    ({"log_every": 0.5}, "log_every", "0.5", "a whole number"),
    ({"self_check_window": 3}, "self_check_window", "3", "0 (off) or >= 8"),
    ({"self_check_window": -math.inf}, "self_check_window", "-inf", "a whole number"),
    ({"prefetch": "maybe"}, "prefetch", "'maybe'", "true or false"),
    ({"prefetch": 1}, "prefetch", "1", "true or false"),
    ({"prefetch": None}, "prefetch", "None", "true or false"),
    ({"policy": 5}, "policy", "5", "expected str"),
    ({"policy": "shortest-job"}, "policy", "'shortest-job'", "choose one of"),
    ({"eviction": ["lru"]}, "eviction", "['lru']", "expected str"),
    ({"backing_store": "nvme"}, "backing_store", "'nvme'", "is not one of"),
    ({"route_source": "oracle"}, "route_source", "'oracle'", "is not one of"),
    ({"cost_model": True}, "cost_model", "True", "str or null"),
]


@pytest.mark.parametrize("options, field, value, accepts", BAD_VALUES, ids=lambda x: repr(x)[:40])
def test_bad_value_is_refused_naming_field_value_and_what_it_accepts(options, field, value, accepts):
    with pytest.raises(ReadMEOptionsError) as info:
        parse(options)
    message = str(info.value)
    assert f"{WHERE}.{field}" in message and value in message and accepts in message, message


# (field, text in the environment, what it accepts)
BAD_ENVIRONMENT = [
    ("expert_pool", "nan", '"512MiB"'),
    ("expert_pool", "1.2.3MiB", '"512MiB"'),
    ("max_held_back", "2.5", "a whole number"),
    ("max_held_back", "1000", f"<= {MAX_HELD_BACK}"),
    ("route_window", "0", ">= 1 token"),
    ("prefetch_layers", "inf", "a whole number"),
    ("prefetch", "maybe", "true or false"),
    ("log_every", "-1", "0 = no log lines"),
    ("policy", "sjf", "choose one of"),
    ("cost_model", "/nonexistent/cost.json", "vllm-readme calibrate"),
]


@pytest.mark.parametrize("field, text, accepts", BAD_ENVIRONMENT)
def test_bad_environment_value_is_refused_naming_the_variable(field, text, accepts):
    variable = f"VLLM_README_{field.upper()}"
    with pytest.raises(ReadMEOptionsError) as info:
        parse({}, env={variable: text})
    message = str(info.value)
    assert f"environment variable {variable}" in message and text in message and accepts in message, message
    assert WHERE not in message  # the config did not give it: the message must not send the user there


@pytest.mark.parametrize("given", [[], False, "cost-model", 5])
def test_plugin_key_must_be_an_object(given):
    with pytest.raises(ReadMEOptionsError, match=re.escape(f"{WHERE} must be a JSON object")):
        parse(given)


def test_integral_values_in_any_json_form_are_accepted():
    scheduler, cache = parse({"max_held_back": 4.0, "route_window": "32", "prefetch": "off", "expert_pool": 2})
    assert (scheduler.max_held_back, scheduler.route_window) == (4, 32)
    assert cache.prefetch is False and cache.pool_size() == PoolSize(experts_per_layer=2.0)


def test_byte_sizes_are_read_to_the_byte():
    """2.01 * 10**6 is 2009999.99... in floating point: one byte short of
    what the user wrote, and a page short when that is a page boundary."""
    assert [parse({"expert_pool": text})[1].pool_size().nbytes for text in ("2.01MB", "0.29MB", "1.5KiB")] == [
        2_010_000,
        290_000,
        1536,
    ]


COST_FILES = {
    "not JSON": "{base_ms: 1",
    "a list": "[1, 2, 3]",
    "a string": '"fast"',
    "true": "true",
    "nested too deep": "[" * 100_000 + "]" * 100_000,
    "missing fields": '{"base_ms": 1}',
    "unknown field": '{"base_ms": 1, "per_token_ms": 1, "per_expert_ms": 1, "per_layer_ms": 1}',
    "negative": '{"base_ms": -1, "per_token_ms": 1, "per_expert_ms": 1}',
    "NaN": '{"base_ms": NaN, "per_token_ms": 1, "per_expert_ms": 1}',
    "infinite": '{"base_ms": 1, "per_token_ms": Infinity, "per_expert_ms": 1}',
    "a string number": '{"base_ms": "1", "per_token_ms": 1, "per_expert_ms": 1}',
    "zero step time": '{"base_ms": 0, "per_token_ms": 0, "per_expert_ms": 1}',
}


@pytest.mark.parametrize("what", [*COST_FILES, "not UTF-8", "a folder", "a NUL in the path"])
def test_every_bad_cost_model_file_is_a_named_error(tmp_path, what):
    path = tmp_path / "cost.json"
    if what in COST_FILES:
        path.write_text(COST_FILES[what])
    elif what == "not UTF-8":
        path.write_bytes(b"\xff\xfe\x00{")
    elif what == "a folder":
        path.mkdir()
    given = f"{path}\x00" if what == "a NUL in the path" else str(path)
    with pytest.raises(ReadMEOptionsError) as info:
        parse({"cost_model": given})
    message = str(info.value)
    assert f"{WHERE}.cost_model" in message and repr(given) in message and "vllm-readme calibrate" in message


def test_route_window_is_bounded_by_the_routers_positions():
    """Beyond its max positions the router sees no more context: a longer
    window only grows the scheduler's router copy."""
    (scheduler, _) = parse({"route_window": 513})
    scheduler.check_route_window(513)
    with pytest.raises(ReadMEOptionsError) as info:
        scheduler.check_route_window(512)
    message = str(info.value)
    assert f"{WHERE}.route_window" in message and "513" in message and "max_position_embeddings=512" in message


@pytest.mark.parametrize(
    "pool, minimum_given_as",
    [("1", "2"), ("12%", '"50%"'), ("64KiB", '"192KiB"'), ("0.1MB", '"0.2MB"'), ("1000b", '"196608B"')],
)
def test_pool_below_the_minimum_names_it_in_the_form_given(pool, minimum_given_as):
    """The smallest pool that works, in the unit the user chose, and it
    does work."""
    layers, experts, page_bytes = 2, 4, 3 * 64 * 64 * 4
    (_, cache) = parse({"expert_pool": pool})
    with pytest.raises(ReadMEOptionsError) as info:
        cache.pool_pages(layers, experts, page_bytes, minimum_pages=experts)
    message = str(info.value)
    assert f"{WHERE}.expert_pool={pool!r}" in message and f"expert_pool >= {minimum_given_as}," in message, message
    assert '"50%" of this model\'s 8 pages' in message and "leave expert_pool out" in message
    (_, enough) = parse({"expert_pool": minimum_given_as.strip('"')})
    assert enough.pool_pages(layers, experts, page_bytes, minimum_pages=experts) == experts


def corrupt_copy(model, tmp_path):
    """The checkpoint with its weights file overwritten by garbage: any
    engine that reaches weight loading fails there."""
    copy = tmp_path / "corrupt"
    shutil.copytree(model, copy)
    for weights in copy.glob("*.safetensors"):
        weights.write_bytes(b"\x00garbage, not safetensors" * 64)
    return copy


@pytest.mark.parametrize(
    "options, env, message",
    [
        ({"expert_pool": "1"}, {}, r"expert_pool='1' gives 2 expert pages .*\(expert_pool >= 2,"),
        ({"expert_pool": "nan"}, {}, r"expert_pool: cannot read 'nan'"),
        ({"expert_pool": "1KiB"}, {}, r"expert_pool='1KiB' gives 1 expert pages .* needs at least 4 pages"),
        ({}, {"VLLM_README_EXPERT_POOL": "inf"}, r"environment variable VLLM_README_EXPERT_POOL: cannot read 'inf'"),
    ],
)
def test_bad_pool_fails_before_weights_load(tiny_gqa, tmp_path, monkeypatch, options, env, message):
    """The option error comes from config verification: a checkpoint whose
    weights cannot be read still reports the bad pool, not the weights."""
    corrupt = corrupt_copy(tiny_gqa, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Exception) as info:
        with vllm_engine(corrupt, additional_config={"vllm_readme": options}):
            pass
    chain = error_chain(info.value)
    assert re.search(message, chain), chain
    # vLLM validates its config before it builds an engine, a worker or a model.
    assert "validation error for VllmConfig" in chain and "safetensors" not in chain.lower(), chain


def test_corrupt_weights_fail_at_load_when_the_options_are_good(tiny_gqa, tmp_path):
    """The control for the test above: with a valid pool the same engine
    gets as far as the weights and fails there."""
    corrupt = corrupt_copy(tiny_gqa, tmp_path)
    with pytest.raises(Exception) as info:
        with vllm_engine(corrupt, additional_config={"vllm_readme": {"expert_pool": "50%"}}):
            pass
    chain = error_chain(info.value)
    assert "SafetensorError" in chain and "expert_pool" not in chain, chain


@pytest.mark.slow  # a real `vllm-readme serve`, multi-process
def test_served_bad_pool_exits_before_weights_load(tiny_gqa, tmp_path):
    """As users run it: the server process refuses the option and exits;
    its engine never starts, so the unreadable weights are never reached."""
    from conftest import served

    corrupt = corrupt_copy(tiny_gqa, tmp_path)
    log = tmp_path / "serve.log"
    options = '{"vllm_readme": {"expert_pool": "nan"}}'
    with pytest.raises(RuntimeError, match="the server exited"):
        with served(corrupt, log, "--dtype", "float32", "--additional-config", options):
            pass
    text = log.read_text()
    assert "additional_config[\"vllm_readme\"].expert_pool: cannot read 'nan'" in text, text[-3000:]
    assert "SafetensorError" not in text and "Loading weights" not in text, text[-3000:]


def _pool_pages(model):
    cache = model.model.expert_cache
    return cache.pool.capacity, cache.page_bytes


def loaded_pool(model, expert_pool: str) -> tuple[int, int]:
    """(pages, page bytes) of the engine's expert cache. The engine lives in
    this frame only, so it is gone before the next one starts."""
    with vllm_engine(model, additional_config={"vllm_readme": {"expert_pool": expert_pool}}) as llm:
        return llm.apply_model(_pool_pages)[0]


@pytest.mark.parametrize("checkpoint", ["tiny_gqa", "tiny_mha"])  # mha: 48 expert channels, padded to 64
def test_byte_pool_is_checked_at_start_up_with_the_page_size_loading_gives(checkpoint, request):
    """Start-up knows a page's bytes from config.json alone: the smallest
    byte pool it accepts is exactly the smallest the loaded cache can hold."""
    import torch

    model = request.getfixturevalue(checkpoint)
    config = ReadMEConfig.from_pretrained(model)
    page_bytes = expert_page_bytes(config, torch.float32, tp=1)
    smallest = config.num_experts * page_bytes
    assert loaded_pool(model, f"{smallest}b") == (config.num_experts, page_bytes)
    with pytest.raises(Exception) as info:
        with vllm_engine(model, additional_config={"vllm_readme": {"expert_pool": f"{smallest - 1}b"}}):
            pass
    assert f"needs at least {config.num_experts} pages" in error_chain(info.value)


# Any JSON value: what additional_config can carry.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Strings that look like numbers, sizes and shares, near and past the edges.
NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats().map(repr),
    st.sampled_from(["nan", "inf", "-inf", "Infinity", "1e400", "1.2.3", ".", "", " ", "1_0", "0x10", "٣"]),
)
POOL_TEXT = st.one_of(
    st.text(max_size=12),
    st.tuples(NUMBERS, st.sampled_from(["", "%", "b", "KB", "kib", " MiB", "gb", "GiB", "tb", "%%"])).map("".join),
)
# Every field but cost_model, a path whose reading the file tests cover.
FUZZED_FIELDS = sorted(set(FIELDS) - {"cost_model"})


def check_valid(scheduler: SchedulerOptions, cache: ExpertCacheOptions) -> None:
    """What a valid options object guarantees its readers."""
    for options in (scheduler, cache):
        for field in dataclasses.fields(options):
            value = getattr(options, field.name)
            kind = {"int": int, "bool": bool, "str": str}.get(field.type, (str, type(None)))
            assert isinstance(value, kind) and (kind is not int or not isinstance(value, bool)), (field.name, value)
    assert 0 <= scheduler.max_held_back <= MAX_HELD_BACK and scheduler.route_window >= 1
    assert scheduler.log_every >= 0 and cache.prefetch_layers >= 1
    size = cache.pool_size()
    if size is not None:
        numbers = [v for v in (size.fraction, size.experts_per_layer, size.nbytes) if v is not None]
        assert len(numbers) == 1 and math.isfinite(numbers[0]) and numbers[0] > 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    options=st.one_of(
        JSON,
        st.dictionaries(
            st.sampled_from(FUZZED_FIELDS) | st.text(max_size=8) | st.integers() | st.none(),
            JSON | NUMBERS | POOL_TEXT,
            max_size=4,
        ),
    ),
    env=st.dictionaries(st.sampled_from([f"VLLM_README_{f.upper()}" for f in FUZZED_FIELDS]), NUMBERS | POOL_TEXT),
)
def test_fuzzed_options_give_valid_options_or_a_named_error(options, env):
    try:
        scheduler, cache = parse(options, env)
    except ReadMEOptionsError as exc:
        assert "vllm_readme" in str(exc) or "VLLM_README_" in str(exc), str(exc)
        return
    check_valid(scheduler, cache)


@settings(max_examples=300, deadline=None)
@given(
    pool=POOL_TEXT,
    layers=st.integers(1, 128),
    experts=st.integers(1, 64),
    page_bytes=st.integers(1, 2**30),
)
def test_fuzzed_pool_gives_pages_within_the_model_or_a_named_error(pool, layers, experts, page_bytes):
    """A valid expert_pool gives between 1 page and all of them; below the
    minimum it is refused, and the minimum it names is accepted."""
    try:
        (_, cache) = parse({"expert_pool": pool})
    except ReadMEOptionsError as exc:
        assert f"{WHERE}.expert_pool" in str(exc)
        return
    size = cache.pool_size()
    if size is None:
        return
    total = layers * experts
    assert 1 <= size.pages(layers, experts, page_bytes) <= total
    try:
        pages = cache.pool_pages(layers, experts, page_bytes, minimum_pages=experts)
    except ReadMEOptionsError as exc:
        suggested = re.search(r"expert_pool >= ([^,]+),", str(exc)).group(1).strip('"')
        (_, enough) = parse({"expert_pool": suggested})
        pages = enough.pool_pages(layers, experts, page_bytes, minimum_pages=experts)
        assert pages is None or experts <= pages <= total  # None: "100%", every expert resident
        return
    assert experts <= pages <= total


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(FIELDS)), value=JSON | NUMBERS)
def test_fuzzed_coerce_gives_the_fields_type_or_a_named_error(field, value):
    where = f"{WHERE}.{field}"
    try:
        coerced = _coerce(where, value, FIELDS[field])
    except ReadMEOptionsError as exc:
        assert str(exc).startswith(f"{where}: expected "), str(exc)
        return
    kind = FIELDS[field].type
    if kind == "int":
        assert type(coerced) is int
    elif kind == "bool":
        assert type(coerced) is bool
    elif kind == "str":
        assert type(coerced) is str
    else:
        assert coerced is None or type(coerced) is str
