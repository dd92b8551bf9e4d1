"""The plugin's serving options, the way vLLM hands options to plugins.

One key of ours in ``--additional-config`` / ``LLM(additional_config=...)``::

    vllm serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler \\
        --additional-config '{"vllm_readme": {"policy": "cost-model", "max_held_back": 4}}'

Environment variables (``VLLM_README_POLICY``, ``VLLM_README_MAX_HELD_BACK``,
``VLLM_README_COST_MODEL``, ``VLLM_README_ROUTE_WINDOW``,
``VLLM_README_LOG_EVERY``) are read only for fields the config leaves out.
Every value is checked when the engine starts; a bad one stops it with a
message that names the field and what it accepts. Plain Python: no vLLM, no
torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from vllm_readme.scheduler.cost_model import StepCostModel
from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL, POLICIES

CONFIG_KEY = "vllm_readme"
# Fields that belong to the expert cache (issue-tracked, same key): accepted
# here so one dict configures both parts.
EXPERT_CACHE_FIELDS = frozenset({"expert_pool", "eviction", "prefetch", "backing_store"})


class ReadMEOptionsError(ValueError):
    """A bad value under ``additional_config["vllm_readme"]``."""


@dataclasses.dataclass(frozen=True)
class SchedulerOptions:
    policy: str = "cost-model"
    # Consecutive steps a runnable request may be held back: a decode's
    # inter-token gap can grow to (1 + max_held_back) steps. 4 is the
    # simulator's setting (benchmarks/routes.py); docs/scheduling.md.
    max_held_back: int = 4
    cost_model: str | None = None  # JSON file written by benchmarks/calibrate_cost_model.py
    route_window: int = 64  # tokens of context the scheduler's router copy attends to
    log_every: int = 100  # steps between the scheduler's log lines (0: never)

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None, env=os.environ) -> SchedulerOptions:
        given = (additional or {}).get(CONFIG_KEY) or {}
        if not isinstance(given, Mapping):
            raise ReadMEOptionsError(
                f'additional_config["{CONFIG_KEY}"] must be a JSON object, e.g. {{"policy": "cost-model"}}; '
                f"got {given!r}."
            )
        raw = dict(given)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields) - EXPERT_CACHE_FIELDS)
        if unknown:
            raise ReadMEOptionsError(
                f'additional_config["{CONFIG_KEY}"]: unknown option(s) {unknown}; '
                f"scheduler options are {sorted(fields)}."
            )
        values = {}
        for name in fields:
            if name in raw:
                values[name] = raw[name]
            elif f"VLLM_README_{name.upper()}" in env:
                values[name] = env[f"VLLM_README_{name.upper()}"]
        return cls(**{k: _coerce(k, v, fields[k]) for k, v in values.items()}).validated()

    def validated(self) -> SchedulerOptions:
        where = f'additional_config["{CONFIG_KEY}"]'
        if self.policy not in POLICIES:
            raise ReadMEOptionsError(f"{where}.policy: unknown policy {self.policy!r}; choose one of {list(POLICIES)}.")
        if self.max_held_back < 0:
            raise ReadMEOptionsError(
                f"{where}.max_held_back must be >= 0 (steps a request may wait), got {self.max_held_back}."
            )
        if self.route_window < 1:
            raise ReadMEOptionsError(f"{where}.route_window must be >= 1 token, got {self.route_window}.")
        if self.log_every < 0:
            raise ReadMEOptionsError(f"{where}.log_every must be >= 0 (0 = no log lines), got {self.log_every}.")
        self.load_cost_model()  # an unreadable file fails now, not at the first step
        return self

    def load_cost_model(self) -> StepCostModel:
        if self.cost_model is None:
            return DEFAULT_COST_MODEL
        try:
            return StepCostModel.load(self.cost_model)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReadMEOptionsError(
                f'additional_config["{CONFIG_KEY}"].cost_model: cannot read {self.cost_model!r} ({exc}). '
                "Write one with `python benchmarks/calibrate_cost_model.py --out FILE`, or leave the option out "
                "for the default."
            ) from exc


def _coerce(name: str, value: Any, field: dataclasses.Field) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        return None if value in (None, "") else str(value)
    except (TypeError, ValueError):
        raise ReadMEOptionsError(
            f'additional_config["{CONFIG_KEY}"].{name}: expected {kind.replace(" | None", " or null")}, got {value!r}.'
        ) from None
