# SPDX-License-Identifier: Apache-2.0
"""Precision and device chosen from the hardware, never assumed.

bf16 pays only where the hardware computes it: a GPU with bf16 units, or a
CPU with AVX512-BF16 or AMX. Elsewhere PyTorch emulates it (widen to fp32,
compute, round back), so every bf16 operation costs more than the same one
in fp32 and saves only memory. So ``auto`` means bf16 where it is native and
fp32 everywhere else; ``bf16`` and ``fp32`` are explicit overrides.

:func:`choose_device` and :func:`choose_dtype` decide from plain data (CPU
flags, whether a GPU computes bf16), so they are tested on any machine;
:func:`read_machine` is the one place that looks at the real hardware, and
:func:`resolve_precision` joins the two. The refactoring pipeline uses the
result for autocast; the examples and benchmarks turn it into vLLM's dtype
string. Imports torch only, no vLLM.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_readme.configuration_readme import ReadMEConfigError

DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
# /proc/cpuinfo flags of CPUs that compute bf16 natively (oneDNN uses them).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The flags worth printing when explaining a choice.
RELEVANT_CPU_FLAGS = ("avx", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

_ALIASES = {"bfloat16": "bf16", "float32": "fp32"}  # vLLM's spelling, accepted too
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
_VLLM_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
# Without /proc/cpuinfo, torch's dispatch level is all we know; it never
# says whether bf16 is native, so auto stays fp32 there.
_FLAGS_OF_CAPABILITY = {"AVX2": {"avx", "avx2"}, "AVX512": {"avx", "avx2", "avx512f"}}


# -- decisions (pure) ----------------------------------------------------------
def choose_device(requested: str = "auto", cuda_available: bool | None = None) -> str:
    """``auto``: cuda when a GPU is available, else cpu. ``cuda_available``
    None asks torch."""
    if requested not in DEVICES:
        raise ReadMEConfigError(f"--device must be one of {', '.join(DEVICES)}; got {requested!r}.")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise ReadMEConfigError(
            f"--device cuda, but torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False). "
            "Use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU."
        )
    return requested


def choose_dtype(requested: str, device: str, cpu_flags: set[str], cuda_bf16: bool) -> tuple[torch.dtype, str]:
    """(dtype, why) for ``requested`` in auto|bf16|fp32 on the chosen
    ``device`` (cpu|cuda), given the CPU's flags and whether the GPU computes
    bf16 natively."""
    name = _ALIASES.get(requested, requested)
    if name not in DTYPES:
        raise ReadMEConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {requested!r}.")
    if device not in ("cpu", "cuda"):
        raise ReadMEConfigError(f"choose_dtype needs a chosen device, cpu or cuda; got {device!r}.")
    if device == "cuda":
        if name == "fp32":
            return torch.float32, "asked for"
        if cuda_bf16:
            return torch.bfloat16, "asked for" if name == "bf16" else "GPU computes bf16 natively"
        if name == "bf16":
            raise ReadMEConfigError(
                "--dtype bf16, but this GPU has no native bf16 (compute capability below 8.0). "
                "Use --dtype fp32 (or auto)."
            )
        return torch.float32, "GPU has no native bf16 (compute capability below 8.0)"
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in cpu_flags]
    if name == "fp32":
        return torch.float32, "asked for" + (f"; this CPU has {', '.join(native)}" if native else "")
    if name == "bf16":
        if native:
            return torch.bfloat16, f"asked for; CPU has {', '.join(native)}"
        return torch.bfloat16, (
            f"asked for; CPU has no native bf16 ({_cpu_isa(cpu_flags)}): emulated, several times slower than fp32"
        )
    if native:
        return torch.bfloat16, f"CPU has {', '.join(native)}"
    return torch.float32, f"CPU has no native bf16: {_cpu_isa(cpu_flags)}; bf16 would be emulated"


def _cpu_isa(cpu_flags: set[str]) -> str:
    if "avx512f" in cpu_flags:
        return "AVX-512 without AVX512-BF16"
    if "avx2" in cpu_flags:
        return "AVX2 only"
    if "avx" in cpu_flags:
        return "AVX only"
    return "neither AVX512-BF16 nor AMX" if cpu_flags else "CPU flags unknown"


# -- the machine ----------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_cores: int  # cores this process may run on
    cpu_flags: frozenset[str] = field(repr=False)
    cpu_flags_source: str  # "/proc/cpuinfo" or torch's cpu capability
    cuda_available: bool
    cuda_bf16: bool
    gpu_name: str | None = None


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[set[str], str]:
    """(flags, where they came from): the ``flags`` line of /proc/cpuinfo on
    Linux, else torch's dispatch capability (AVX2, AVX512, ...)."""
    if sys.platform.startswith("linux") and cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return set(value.split()), str(cpuinfo)
    capability = torch.backends.cpu.get_cpu_capability()
    return set(_FLAGS_OF_CAPABILITY.get(capability, ())), f"torch cpu capability {capability}"


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cuda_bf16() -> bool:
    """Native bf16 only: recent torch also answers True for GPUs that emulate it."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts native only
        return torch.cuda.is_bf16_supported()


def read_machine() -> Machine:
    flags, source = read_cpu_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    return Machine(
        cpu_model=_cpu_model(),
        cpu_cores=cores,
        cpu_flags=frozenset(flags),
        cpu_flags_source=source,
        cuda_available=cuda,
        cuda_bf16=cuda and _cuda_bf16(),
        gpu_name=torch.cuda.get_device_name() if cuda else None,
    )


# -- the result ----------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """A resolved choice: where to compute, in which dtype, and why."""

    device: str  # "cpu" | "cuda"
    dtype: torch.dtype  # torch.bfloat16 | torch.float32
    reason: str

    @property
    def name(self) -> str:
        """``bf16`` or ``fp32`` (the CLI's and the stage cache's spelling)."""
        return _NAMES[self.dtype]

    @property
    def vllm_dtype(self) -> str:
        """``bfloat16`` or ``float32``, for ``vllm.LLM(dtype=...)`` / ``--dtype``."""
        return _VLLM_DTYPES[self.dtype]

    def autocast(self):
        return autocast(self.device, self.dtype)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def autocast(device: str | torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``'s type; nothing in fp32, the
    weights' own precision."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def resolve_precision(dtype: str = "auto", device: str = "auto", machine: Machine | None = None) -> Precision:
    """The device and dtype to use on ``machine`` (default: this one)."""
    machine = machine or read_machine()
    chosen_device = choose_device(device, machine.cuda_available)
    chosen_dtype, reason = choose_dtype(dtype, chosen_device, set(machine.cpu_flags), machine.cuda_bf16)
    return Precision(chosen_device, chosen_dtype, reason)


def serving_dtype(dtype: str = "auto", device: str = "auto") -> str:
    """vLLM's dtype string (``bfloat16`` / ``float32``) chosen by the same rule."""
    return resolve_precision(dtype, device).vllm_dtype


def machine_description(machine: Machine | None = None, precision: Precision | None = None) -> str:
    """One line for logs and benchmark JSON, e.g. ``AMD EPYC, 2 cores, avx avx2
    avx512f avx512_bf16 (/proc/cpuinfo), no GPU; precision bf16 on cpu (CPU has
    avx512_bf16)``."""
    machine = machine or read_machine()
    flags = " ".join(f for f in RELEVANT_CPU_FLAGS if f in machine.cpu_flags) or "no AVX"
    gpu = "no GPU"
    if machine.cuda_available:
        gpu = f"GPU {machine.gpu_name} ({'native bf16' if machine.cuda_bf16 else 'no native bf16'})"
    line = f"{machine.cpu_model}, {machine.cpu_cores} cores, {flags} ({machine.cpu_flags_source}), {gpu}"
    if precision is not None:
        line += f"; precision {precision.name} on {precision.device} ({precision.reason})"
    return line
