# SPDX-License-Identifier: Apache-2.0
"""Every vLLM internal the plugin reads is still where vllm_readme/vllm_internals.py
reads it, with the parameters the plugin passes. The list is the adapter's own
``REQUIRED`` table, so an upgrade that moves a private method, an attribute or
a raw op fails here, naming it and the adapter to fix, instead of deep inside
a running engine. No engine is started."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch
from vllm.platforms import current_platform

from vllm_readme import vllm_internals
from vllm_readme.vllm_internals import REQUIRED, VLLM_VERSION, Internal


def _owner(internal: Internal):
    """The module, class or op namespace ``internal.owner`` names."""
    if internal.owner == "torch.ops._C":
        importlib.import_module("vllm._custom_ops")  # loads vLLM's compiled ops into torch.ops._C
        return torch.ops._C
    module, _, qualname = internal.owner.partition(":")
    found = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part)
    return found


def _set_by_class(owner: type, name: str) -> bool:
    """Whether ``name`` is an instance attribute of ``owner`` or a base: a
    dataclass field, an annotation, ``self.name = ...`` in its source, or a
    parameter it registers by name (``register_parameter("name", ...)``)."""
    assignment = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)|[\"']{re.escape(name)}[\"']")
    for klass in owner.__mro__:
        if name in getattr(klass, "__dataclass_fields__", {}) or name in vars(klass).get("__annotations__", {}):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # builtins, classes without a source file
            continue
        if assignment.search(source):
            return True
    return False


def _parameters(found) -> list[str]:
    """Parameter names of a Python callable or of a torch op's schema."""
    if isinstance(found, torch._ops.OpOverloadPacket):
        return [argument.name for argument in found.default._schema.arguments]
    return [name for name in inspect.signature(found).parameters if name != "self"]


def _in_order(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether every expected parameter is in ``actual``, in the same order."""
    rest = iter(actual)
    return all(name in rest for name in expected)


def _problem(internal: Internal) -> str | None:
    try:
        owner = _owner(internal)
    except (ImportError, AttributeError) as exc:
        return f"{internal.owner} is gone ({type(exc).__name__}: {exc})"
    if hasattr(owner, internal.name):
        found = getattr(owner, internal.name)
    elif inspect.isclass(owner) and _set_by_class(owner, internal.name):
        return None  # an instance attribute: nothing to call, nothing more to check
    else:
        return f"{internal.owner} has no {internal.name!r}"
    if internal.params and not _in_order(internal.params, _parameters(found)):
        return f"it takes {_parameters(found)}, not {list(internal.params)} in this order"
    return None


@pytest.mark.parametrize("internal", REQUIRED, ids=lambda i: f"{i.owner.rpartition('.')[2]}.{i.name}")
def test_vllm_internal_is_where_the_adapter_reads_it(internal: Internal):
    if internal.cpu_only and not current_platform.is_cpu():
        pytest.skip("in vLLM's CPU build only")
    problem = _problem(internal)
    assert problem is None, (
        f"vLLM internal {internal.owner}.{internal.name} ({internal.vllm_file} in vLLM {VLLM_VERSION}) moved: "
        f"{problem}. Fix vllm_readme/vllm_internals.py: {', '.join(internal.adapters)}; then its REQUIRED table "
        "and docs/design.md, 'vLLM internals the plugin reads'."
    )


def test_every_adapter_is_in_the_table():
    """Each function, class and constant of the adapter module names the
    internal it reads in REQUIRED, and every adapter REQUIRED names exists."""
    named = {adapter for internal in REQUIRED for adapter in internal.adapters}
    defined = {
        name
        for name, value in vars(vllm_internals).items()
        if not name.startswith("_")
        and (getattr(value, "__module__", None) == vllm_internals.__name__ or (name.isupper() and not callable(value)))
    } - {"Internal", "REQUIRED", "VLLM_VERSION", "TYPE_CHECKING"}
    assert named <= set(vars(vllm_internals)), (
        f"REQUIRED names adapters that do not exist: {sorted(named - set(vars(vllm_internals)))}"
    )
    assert defined <= named, f"adapters missing from REQUIRED: {sorted(defined - named)}"


@pytest.mark.skipif(not current_platform.is_cpu(), reason="vLLM's CPU grouped GEMM")
def test_cpu_grouped_gemm_pads_expert_channels_as_the_adapter_says():
    """The expert cache's page size (model_executor/config.py) assumes the
    CPU grouped GEMM pads each rank's expert channels to
    CPU_MOE_CHANNEL_MULTIPLE on the x86 (vec, AMX) and Arm kernels."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    for kernel in (cpu_moe.CPUUnquantizedExperts, cpu_moe.X86CPUUnquantizedExperts, cpu_moe.ArmCPUUnquantizedExperts):
        assert kernel._intermediate_alignment() == vllm_internals.CPU_MOE_CHANNEL_MULTIPLE, kernel.__name__
