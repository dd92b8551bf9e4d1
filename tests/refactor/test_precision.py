# SPDX-License-Identifier: Apache-2.0
"""Precision and device come from the hardware: bf16 only where it is native
(a GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere; explicit
choices override; bad values fail with the fix; the refactor stage cache
never mixes precisions. No engine, no weights: milliseconds."""

import dataclasses
import json
import sys

import pytest
import torch

from vllm_readme import ReadMEConfigError
from vllm_readme.cli import main as cli_main
from vllm_readme.precision import (
    Machine,
    autocast,
    choose_device,
    choose_dtype,
    machine_description,
    read_cpu_flags,
    resolve_precision,
)
from vllm_readme.refactor.pipeline import Refactor, RefactorOptions, options_of_build

# /proc/cpuinfo flags (the relevant part) of real CPU generations.
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c"}  # Haswell .. Zen 3
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # Skylake-SP, Ice Lake
AVX512_BF16 = AVX512_NO_BF16 | {"avx512_bf16"}  # Cooper Lake, Zen 4
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids
STAGES = ("experts", "router", "tune", "baselines")


def test_avx2_only_cpu_gets_fp32_and_says_why():
    dtype, reason = choose_dtype("auto", "cpu", AVX2_ONLY, cuda_bf16=False)
    assert dtype == torch.float32
    assert reason == "CPU has no native bf16: AVX2 only; bf16 would be emulated"


def test_avx512_without_bf16_gets_fp32():
    dtype, reason = choose_dtype("auto", "cpu", AVX512_NO_BF16, cuda_bf16=False)
    assert dtype == torch.float32 and "AVX-512 without AVX512-BF16" in reason


def test_avx512_bf16_cpu_gets_bf16():
    assert choose_dtype("auto", "cpu", AVX512_BF16, cuda_bf16=False) == (torch.bfloat16, "CPU has avx512_bf16")


def test_amx_cpu_gets_bf16():
    dtype, reason = choose_dtype("auto", "cpu", AMX, cuda_bf16=False)
    assert dtype == torch.bfloat16 and "amx_bf16" in reason
    # AMX alone suffices
    assert choose_dtype("auto", "cpu", AVX2_ONLY | {"amx_bf16"}, cuda_bf16=False)[0] == torch.bfloat16


def test_unknown_cpu_flags_mean_fp32():
    assert choose_dtype("auto", "cpu", set(), cuda_bf16=False) == (
        torch.float32,
        "CPU has no native bf16: CPU flags unknown; bf16 would be emulated",
    )


def test_gpu_with_bf16_gets_bf16_whatever_the_cpu():
    assert choose_dtype("auto", "cuda", AVX2_ONLY, cuda_bf16=True) == (torch.bfloat16, "GPU computes bf16 natively")


def test_gpu_without_bf16_gets_fp32_even_on_an_amx_host():
    dtype, reason = choose_dtype("auto", "cuda", AMX, cuda_bf16=False)
    assert dtype == torch.float32 and "GPU has no native bf16" in reason


def test_explicit_choices_override_the_hardware():
    assert choose_dtype("fp32", "cpu", AMX, cuda_bf16=False)[0] == torch.float32
    assert choose_dtype("fp32", "cuda", set(), cuda_bf16=True)[0] == torch.float32
    dtype, reason = choose_dtype("bf16", "cpu", AVX2_ONLY, cuda_bf16=False)
    assert dtype == torch.bfloat16 and "emulated" in reason  # allowed, and the log says what it costs
    # vLLM's spellings are accepted too
    assert choose_dtype("bfloat16", "cpu", AVX2_ONLY, cuda_bf16=False)[0] == torch.bfloat16
    assert choose_dtype("float32", "cuda", set(), cuda_bf16=True)[0] == torch.float32


@pytest.mark.parametrize("bad", ["fp16", "half", "", "BF16"])
def test_bad_dtype_is_refused_with_the_choices(bad):
    with pytest.raises(ReadMEConfigError, match="--dtype must be one of auto, bf16, fp32"):
        choose_dtype(bad, "cpu", AMX, cuda_bf16=False)


def test_bf16_on_a_gpu_without_it_is_refused_with_the_fix():
    with pytest.raises(ReadMEConfigError, match="Use --dtype fp32"):
        choose_dtype("bf16", "cuda", AMX, cuda_bf16=False)


def test_device_auto_prefers_cuda_when_available():
    assert choose_device("auto", cuda_available=True) == "cuda"
    assert choose_device("auto", cuda_available=False) == "cpu"
    assert choose_device("cpu", cuda_available=True) == "cpu"
    assert choose_device("cuda", cuda_available=True) == "cuda"


def test_bad_device_and_missing_gpu_are_refused_with_the_fix():
    with pytest.raises(ReadMEConfigError, match="--device must be one of auto, cpu, cuda; got 'gpu'"):
        choose_device("gpu", cuda_available=True)
    with pytest.raises(ReadMEConfigError, match="Use --device cpu"):
        choose_device("cuda", cuda_available=False)


def _machine(flags, cuda=False, cuda_bf16=False) -> Machine:
    return Machine("Test CPU", 2, frozenset(flags), "test", cuda, cuda_bf16, "Test GPU" if cuda else None)


def test_resolved_precision_gives_vllm_dtype_and_autocast():
    on_avx2 = resolve_precision("auto", "auto", _machine(AVX2_ONLY))
    assert (on_avx2.device, on_avx2.name, on_avx2.vllm_dtype) == ("cpu", "fp32", "float32")
    with on_avx2.autocast():
        assert not torch.is_autocast_enabled("cpu")  # fp32: no autocast at all
    on_gpu = resolve_precision("auto", "auto", _machine(AVX2_ONLY, cuda=True, cuda_bf16=True))
    assert (on_gpu.device, on_gpu.vllm_dtype) == ("cuda", "bfloat16")
    on_amx = resolve_precision("auto", "auto", _machine(AMX))
    assert str(on_amx) == "bf16 (CPU has avx512_bf16, amx_bf16)"
    with on_amx.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_machine_description_names_cpu_cores_flags_and_choice():
    machine = _machine(AVX512_BF16)
    line = machine_description(machine, resolve_precision("auto", "cpu", machine))
    assert line == (
        "Test CPU, 2 cores, avx avx2 avx512f avx512_bf16 (test), no GPU; precision bf16 on cpu (CPU has avx512_bf16)"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx avx2 avx512f avx512_bf16\n\n")
    assert read_cpu_flags(cpuinfo) == ({"fpu", "avx", "avx2", "avx512f", "avx512_bf16"}, str(cpuinfo))


def _build(tmp_path, dtype: str) -> Refactor:
    # Refactor() resolves the precision and prepares OUT/.refactor; it loads nothing.
    return Refactor(RefactorOptions(out=tmp_path / "out", dense=tmp_path / "dense", dtype=dtype, device="cpu"))


def test_stage_cache_key_differs_between_fp32_and_bf16_builds(tmp_path):
    fp32, bf16 = _build(tmp_path, "fp32"), _build(tmp_path, "bf16")
    for stage in STAGES:
        assert fp32.options.stage_key(stage)["dtype"] == "fp32"
        assert fp32.options.stage_key(stage) != bf16.options.stage_key(stage), stage
    fp32._mark("experts")
    assert bf16._cached("experts") is None  # an fp32 build's statistics are not reused in bf16...
    assert _build(tmp_path, "fp32")._cached("experts") is not None  # ...but are by another fp32 build


def test_auto_is_resolved_before_it_reaches_the_cache(tmp_path):
    build = _build(tmp_path, "auto")
    assert build.options.dtype == resolve_precision("auto", "cpu").name
    with pytest.raises(ValueError, match="resolved dtype"):
        RefactorOptions(out=tmp_path).stage_key("experts")


def test_stage_markers_from_before_dtype_was_keyed_count_as_bf16(tmp_path):
    bf16 = _build(tmp_path, "bf16")
    legacy = {k: v for k, v in bf16.options.stage_key("experts").items() if k != "dtype"}
    (bf16.work / "experts.json").write_text(json.dumps(legacy))
    assert bf16._cached("experts") is not None
    assert _build(tmp_path, "fp32")._cached("experts") is None


def test_eval_reads_the_precision_the_build_used(tmp_path):
    work = tmp_path / "out" / ".refactor"
    work.mkdir(parents=True)
    options = dataclasses.asdict(RefactorOptions(out=tmp_path / "out", dtype="fp32"))
    (work / "options.json").write_text(json.dumps(options, default=str))
    assert options_of_build(tmp_path / "out").dtype == "fp32"
    legacy = {k: v for k, v in options.items() if k not in ("dtype", "device")} | {"bf16": True}
    (work / "options.json").write_text(json.dumps(legacy, default=str))
    assert options_of_build(tmp_path / "out").dtype == "bf16"


def test_refactor_help_explains_dtype_and_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["refactor", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dtype {auto,bf16,fp32}" in help_text and "--device {auto,cpu,cuda}" in help_text
    assert "AVX512-BF16 or AMX" in help_text and "emulated" in help_text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_refactor_on_cuda_without_gpu_fails_before_loading(tmp_path, capsys):
    argv = ["refactor", "--out", str(tmp_path / "o"), "--dense", str(tmp_path / "missing"), "--device", "cuda"]
    assert cli_main(argv) == 2
    assert "Use --device cpu" in capsys.readouterr().err
