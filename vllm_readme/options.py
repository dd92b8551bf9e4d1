"""The plugin's serving options, the way vLLM hands options to plugins.

One key of ours in ``--additional-config`` / ``LLM(additional_config=...)``
configures both serving parts::

    vllm serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler \\
        --additional-config '{"vllm_readme": {"policy": "cost-model", "expert_pool": "50%"}}'

* ``SchedulerOptions``: the expert-aware scheduler (docs/scheduling.md).
* ``ExpertCacheOptions``: the paged expert cache (docs/expert_cache.md).

An environment variable ``VLLM_README_<FIELD>`` (e.g. ``VLLM_README_POLICY``,
``VLLM_README_EXPERT_POOL``) is read only for a field the config leaves out.
Every value is checked where vLLM validates its config, before any process
or weight is started (model_executor/config.py); a bad one stops start-up
with a message that names the field and what it accepts. Plain Python: no
vLLM, no torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from vllm_readme.scheduler.cost_model import StepCostModel
from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL, POLICIES

CONFIG_KEY = "vllm_readme"
WHERE = f'additional_config["{CONFIG_KEY}"]'
EVICTION_POLICIES = ("belady", "lru", "lfu", "random")
BACKING_STORES = ("auto", "disk", "checkpoint", "memory")
ROUTE_SOURCES = ("router", "model")


class ReadMEOptionsError(ValueError):
    """A bad value under ``additional_config["vllm_readme"]``."""


class PluginOptions:
    """Parsing shared by the option groups: each reads its own fields from
    the one dict and accepts the other groups' fields."""

    groups: ClassVar[list[type]] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PluginOptions.groups.append(cls)

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None, env=os.environ):
        given = (additional or {}).get(CONFIG_KEY) or {}
        if not isinstance(given, Mapping):
            raise ReadMEOptionsError(f'{WHERE} must be a JSON object, e.g. {{"policy": "cost-model"}}; got {given!r}.')
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {f.name for group in PluginOptions.groups for f in dataclasses.fields(group)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ReadMEOptionsError(f"{WHERE}: unknown option(s) {unknown}; the options are {sorted(known)}.")
        values = {}
        for name in fields:
            if name in given:
                values[name] = given[name]
            elif f"VLLM_README_{name.upper()}" in env:
                values[name] = env[f"VLLM_README_{name.upper()}"]
        return cls(**{k: _coerce(k, v, fields[k]) for k, v in values.items()}).validated()

    def validated(self):
        return self


@dataclasses.dataclass(frozen=True)
class SchedulerOptions(PluginOptions):
    policy: str = "cost-model"
    # Consecutive steps a runnable request may be held back: a decode's
    # inter-token gap can grow to (1 + max_held_back) steps. 4 is the
    # simulator's setting (benchmarks/routes.py); docs/scheduling.md.
    max_held_back: int = 4
    cost_model: str | None = None  # JSON file written by benchmarks/calibrate_cost_model.py
    # Where the scheduler's routes ahead come from (docs/scheduling.md,
    # "Routes ahead"): "model", the routes the model computed for each
    # request's last token, handed over through the plan file (one token
    # late: right as often as the model's route persistence, 81-86 % in the
    # serving benchmark; 0.2-0.3 ms per step); "router", its own copy of the
    # router (exact for a sync scheduler, but a router step per running
    # request: 6-16 ms per step, 9-12 % of a step at concurrency 32-64,
    # benchmarks/results/serve_scheduler.md). Default chosen from that run.
    route_source: str = "model"
    route_window: int = 64  # tokens of context the scheduler's router copy attends to
    # Take turns between the policy and FCFS in windows of this many steps
    # and keep the policy only while it is measured not slower
    # (scheduler/self_check.py); 0 (the default): always the policy. Off by
    # default: on this machine's minute-long serving runs its verdicts were
    # noise (1.61x and 0.41x between two modes that scheduled identically;
    # docs/scheduling.md, "Self-check").
    self_check_window: int = 0
    log_every: int = 100  # steps between the scheduler's and the expert cache's log lines (0: never)

    def validated(self) -> SchedulerOptions:
        if self.policy not in POLICIES:
            raise ReadMEOptionsError(f"{WHERE}.policy: unknown policy {self.policy!r}; choose one of {list(POLICIES)}.")
        if self.max_held_back < 0:
            raise ReadMEOptionsError(
                f"{WHERE}.max_held_back must be >= 0 (steps a request may wait), got {self.max_held_back}."
            )
        if self.route_source not in ROUTE_SOURCES:
            raise ReadMEOptionsError(
                f"{WHERE}.route_source: {self.route_source!r} is not one of {list(ROUTE_SOURCES)}: "
                '"router" (a router copy next to the scheduler) or "model" (the model\'s own routes, one token late).'
            )
        if self.route_window < 1:
            raise ReadMEOptionsError(f"{WHERE}.route_window must be >= 1 token, got {self.route_window}.")
        if self.self_check_window != 0 and self.self_check_window < 8:
            raise ReadMEOptionsError(
                f"{WHERE}.self_check_window must be 0 (off) or >= 8 steps, got {self.self_check_window}."
            )
        if self.log_every < 0:
            raise ReadMEOptionsError(f"{WHERE}.log_every must be >= 0 (0 = no log lines), got {self.log_every}.")
        self.load_cost_model()  # an unreadable file fails now, not at the first step
        return self

    def load_cost_model(self) -> StepCostModel:
        if self.cost_model is None:
            return DEFAULT_COST_MODEL
        try:
            return StepCostModel.load(self.cost_model)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReadMEOptionsError(
                f"{WHERE}.cost_model: cannot read {self.cost_model!r} ({exc}). "
                "Write one with `python benchmarks/calibrate_cost_model.py --out FILE`, or leave the option out "
                "for the default."
            ) from exc


_BYTES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclasses.dataclass(frozen=True)
class PoolSize:
    """``expert_pool`` parsed: one of a share of all pages, experts per
    layer, or bytes. A page is one expert of one layer."""

    fraction: float | None = None
    experts_per_layer: float | None = None
    nbytes: int | None = None

    def pages(self, num_layers: int, num_experts: int, page_bytes: int) -> int:
        total = num_layers * num_experts
        if self.fraction is not None:
            return min(total, round(self.fraction * total))
        if self.experts_per_layer is not None:
            return min(total, round(self.experts_per_layer * num_layers))
        return min(total, self.nbytes // page_bytes)


@dataclasses.dataclass(frozen=True)
class ExpertCacheOptions(PluginOptions):
    # None: every expert resident (today's speed). "50%": that share of all
    # (layer, expert) pages; a number: experts per layer; "64MiB": bytes.
    expert_pool: str | None = None
    eviction: str = "belady"
    prefetch: bool = True
    # How many layers ahead a layer's prefetch reaches (past the last layer:
    # the next step's first layers). 2 measured best where loads take about
    # as long as compute (docs/expert_cache.md, "Prefetch depth").
    prefetch_layers: int = 2
    # disk: a file of packed pages written at start-up, read with O_DIRECT;
    # checkpoint: the checkpoint's safetensors, read (O_DIRECT), converted
    # and packed per load; memory: a host copy (on GPU: pinned). auto: disk
    # on CPU, memory on GPU.
    backing_store: str = "auto"

    def validated(self) -> ExpertCacheOptions:
        if self.eviction not in EVICTION_POLICIES:
            raise ReadMEOptionsError(
                f"{WHERE}.eviction: unknown policy {self.eviction!r}; choose one of {list(EVICTION_POLICIES)}."
            )
        if self.backing_store not in BACKING_STORES:
            raise ReadMEOptionsError(
                f"{WHERE}.backing_store: {self.backing_store!r} is not one of {list(BACKING_STORES)}."
            )
        if self.prefetch_layers < 1:
            raise ReadMEOptionsError(
                f"{WHERE}.prefetch_layers must be >= 1 (layers ahead a prefetch reaches), got {self.prefetch_layers}; "
                'to turn prefetching off give "prefetch": false.'
            )
        self.pool_size()
        return self

    def pool_size(self) -> PoolSize | None:
        """None when every expert stays resident."""
        text = self.expert_pool
        if text is None or text.strip().lower() in ("all", "100%"):
            return None
        text = text.strip().lower()
        bad = ReadMEOptionsError(
            f'{WHERE}.expert_pool: cannot read {self.expert_pool!r}. Give a share of all expert pages ("50%"), '
            'experts per layer (4), or bytes ("512MiB"); leave it out to keep every expert resident.'
        )
        if text.endswith("%"):
            try:
                share = float(text[:-1]) / 100
            except ValueError:
                raise bad from None
            if not 0 < share <= 1:
                raise ReadMEOptionsError(
                    f"{WHERE}.expert_pool: a share must be in (0%, 100%], got {self.expert_pool!r}."
                )
            return PoolSize(fraction=share)
        match = re.fullmatch(r"([0-9.]+)\s*([kmg]i?b|b)", text)
        if match:
            value = float(match.group(1)) * _BYTES[match.group(2)]
            if value <= 0:
                raise bad
            return PoolSize(nbytes=int(value))
        try:
            per_layer = float(text)
        except ValueError:
            raise bad from None
        if per_layer <= 0:
            raise ReadMEOptionsError(f"{WHERE}.expert_pool: experts per layer must be > 0, got {self.expert_pool!r}.")
        return PoolSize(experts_per_layer=per_layer)


def _coerce(name: str, value: Any, field: dataclasses.Field) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if value in (None, ""):
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ReadMEOptionsError(
            f"{WHERE}.{name}: expected {kind.replace(' | None', ' or null')}, got {value!r}."
        ) from None
