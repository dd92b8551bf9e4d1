# SPDX-License-Identifier: Apache-2.0
"""The plugin's serving options, the way vLLM hands options to plugins.

One key of ours in ``--additional-config`` / ``LLM(additional_config=...)``
configures both serving parts::

    vllm serve MODEL --scheduler-cls vllm_readme.scheduler.ExpertAwareScheduler \\
        --additional-config '{"vllm_readme": {"policy": "cost-model", "expert_pool": "50%"}}'

* ``SchedulerOptions``: the expert-aware scheduler (docs/scheduling.md).
* ``ExpertCacheOptions``: the paged expert cache (docs/expert_cache.md).

An environment variable ``VLLM_README_<FIELD>`` (e.g. ``VLLM_README_POLICY``,
``VLLM_README_EXPERT_POOL``; envs.py) is read only for a field the config
leaves out. Every value is checked where vLLM validates its config, before
any process or weight is started (model_executor/config.py, which also
checks the bounds that depend on the model: the route window and the pool's
minimum); a bad one stops start-up with a message that names the field (or
the environment variable), the value and what it accepts.

The engine's parts read their options with ``SchedulerOptions.of(vllm_config)``
and ``ExpertCacheOptions.of(vllm_config)``: parsed once per process and
config object, the same options object every later time. Plain Python: no
vLLM, no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

from vllm_readme import envs
from vllm_readme.experts.eviction import EVICTION_POLICIES
from vllm_readme.scheduler.cost_model import StepCostModel
from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL, POLICIES

CONFIG_KEY = "vllm_readme"
WHERE = f'additional_config["{CONFIG_KEY}"]'
BACKING_STORES = ("auto", "disk", "checkpoint", "memory")
ROUTE_SOURCES = ("router", "model")
# A request held back longer than this many consecutive steps would stall
# its stream for long enough to look hung to a client: the fairness bound
# exists to prevent exactly that.
MAX_HELD_BACK = 64


def env_variable(name: str) -> str:
    """The environment variable that may give option ``name``."""
    return f"VLLM_README_{name.upper()}"


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
    def of(cls, vllm_config: Any):
        """This group's options of an engine's ``vllm_config.additional_config``,
        parsed once per process and config object; a bad value raises as
        ``from_additional_config`` does, every time it is asked for."""
        return _parsed_options(vllm_config, cls)

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None, env: Mapping[str, str] | None = None):
        """Parse and check this group's fields; ``env`` (default: the
        process environment, envs.py) gives the fields ``additional`` leaves out."""
        if env is None:
            env = envs.option_variables()
        if additional is None:
            additional = {}
        if not isinstance(additional, Mapping):
            raise ReadMEOptionsError(f"additional_config must be a JSON object, got {additional!r}.")
        given = additional.get(CONFIG_KEY)
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise ReadMEOptionsError(f'{WHERE} must be a JSON object, e.g. {{"policy": "cost-model"}}; got {given!r}.')
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {f.name for group in PluginOptions.groups for f in dataclasses.fields(group)}
        unknown = sorted(set(given) - known, key=repr)  # keys from Python need not be strings
        if unknown:
            raise ReadMEOptionsError(f"{WHERE}: unknown option(s) {unknown}; the options are {sorted(known)}.")
        values, from_environment = {}, set()
        for name in fields:
            if name in given:
                values[name] = given[name]
            elif env_variable(name) in env:
                values[name] = env[env_variable(name)]
                from_environment.add(name)
        where = {name: _where(name, name in from_environment) for name in fields}
        options = cls(**{k: _coerce(where[k], v, fields[k]) for k, v in values.items()})
        # Not a field: only how messages name the options read from the environment.
        object.__setattr__(options, "_from_environment", frozenset(from_environment))
        return options.validated()

    def validated(self):
        return self

    def where(self, name: str) -> str:
        """How a message names field ``name``: its key in additional_config,
        or the environment variable it was read from."""
        return _where(name, name in getattr(self, "_from_environment", ()))


def _where(name: str, from_environment: bool) -> str:
    return f"environment variable {env_variable(name)}" if from_environment else f"{WHERE}.{name}"


class _Parsed:
    """The option groups parsed from one config object's additional_config."""

    def __init__(self, config: weakref.ref, additional: Any):
        self.config = config
        self.additional = additional
        self.groups: dict[type, PluginOptions] = {}


# id(vllm_config) -> its parsed groups. A weak reference tells a live config
# from a later object given the same id, and drops the entry with the config.
_PARSED: dict[int, _Parsed] = {}


def _parsed_options(vllm_config: Any, group: type[PluginOptions]) -> PluginOptions:
    key = id(vllm_config)
    additional = vllm_config.additional_config
    parsed = _PARSED.get(key)
    # The same object with the same additional_config: parsed already.
    if parsed is None or parsed.config() is not vllm_config or parsed.additional is not additional:
        try:
            config = weakref.ref(vllm_config, lambda ref, key=key: _forget(key, ref))
        except TypeError:  # an object that takes no weak reference: parsed on every call
            return group.from_additional_config(additional)
        parsed = _PARSED[key] = _Parsed(config, additional)
    options = parsed.groups.get(group)
    if options is None:
        options = parsed.groups[group] = group.from_additional_config(additional)
    return options


def _forget(key: int, config: weakref.ref) -> None:
    """Drop a collected config's entry (not a newer one under its id)."""
    parsed = _PARSED.get(key)
    if parsed is not None and parsed.config is config:
        del _PARSED[key]


@dataclasses.dataclass(frozen=True)
class SchedulerOptions(PluginOptions):
    policy: str = "cost-model"
    # Consecutive steps a runnable request may be held back: a decode's
    # inter-token gap can grow to (1 + max_held_back) steps. 4 is the
    # simulator's setting (benchmarks/routes.py); docs/scheduling.md.
    max_held_back: int = 4
    cost_model: str | None = None  # JSON file written by `vllm-readme calibrate`
    # Where the scheduler's routes ahead come from (docs/scheduling.md,
    # "Routes ahead"): "model", the routes the model computed for each
    # request's last token, handed over through the plan file (one token
    # late: right as often as the model's route persistence; a dictionary
    # lookup per request); "router", its own copy of the router (exact for
    # a sync scheduler, but a router step per running request in the
    # scheduler's process, which on a CPU costs more than the guess loses).
    # docs/scheduling.md, "What it measured", has both sources' figures.
    route_source: str = "model"
    route_window: int = 64  # tokens of context the scheduler's router copy attends to
    # Take turns between the policy and FCFS in windows of this many steps
    # and keep the policy only while it is measured not slower
    # (scheduler/self_check.py); 0 (the default): always the policy. Off by
    # default: neighbouring windows differ by the load they see as well as
    # by the mode, so over minute-long runs its verdicts are noise
    # (docs/scheduling.md, "Self-check").
    self_check_window: int = 0
    log_every: int = 100  # steps between the scheduler's and the expert cache's log lines (0: never)

    def validated(self) -> SchedulerOptions:
        if self.policy not in POLICIES:
            raise ReadMEOptionsError(
                f"{self.where('policy')}: unknown policy {self.policy!r}; choose one of {list(POLICIES)}."
            )
        if not 0 <= self.max_held_back <= MAX_HELD_BACK:
            raise ReadMEOptionsError(
                f"{self.where('max_held_back')} must be >= 0 and <= {MAX_HELD_BACK} (consecutive steps a runnable "
                f"request may be held back; more would stall its stream), got {self.max_held_back}."
            )
        if self.route_source not in ROUTE_SOURCES:
            raise ReadMEOptionsError(
                f"{self.where('route_source')}: {self.route_source!r} is not one of {list(ROUTE_SOURCES)}: "
                '"router" (a router copy next to the scheduler) or "model" (the model\'s own routes, one token late).'
            )
        if self.route_window < 1:
            raise ReadMEOptionsError(f"{self.where('route_window')} must be >= 1 token, got {self.route_window}.")
        if self.self_check_window != 0 and self.self_check_window < 8:
            raise ReadMEOptionsError(
                f"{self.where('self_check_window')} must be 0 (off) or >= 8 steps, got {self.self_check_window}."
            )
        if self.log_every < 0:
            raise ReadMEOptionsError(
                f"{self.where('log_every')} must be >= 0 (0 = no log lines), got {self.log_every}."
            )
        self.load_cost_model()  # an unreadable file fails now, not at the first step
        return self

    def check_route_window(self, router_max_positions: int) -> None:
        """The router never sees more than its max positions of context, so
        a longer window would only grow the router copy's cache."""
        if self.route_window > router_max_positions:
            raise ReadMEOptionsError(
                f"{self.where('route_window')} must be <= the router's max_position_embeddings="
                f"{router_max_positions} (config.json: the router attends to no more context), "
                f"got {self.route_window}."
            )

    def load_cost_model(self) -> StepCostModel:
        if self.cost_model is None:
            return DEFAULT_COST_MODEL
        try:
            return StepCostModel.load(self.cost_model)
        # Every way a user's file can fail to be read (malformed JSON of any
        # shape and depth included) is the same error: it cannot be the cost model.
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            raise ReadMEOptionsError(
                f"{self.where('cost_model')}: cannot read {self.cost_model!r} ({type(exc).__name__}: {exc}). "
                "Write one with `vllm-readme calibrate MODEL --out FILE`, or leave the option out "
                "to fit step costs online from the engine's own steps."
            ) from exc


_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_UNIT_NAMES = {"b": "B", "kb": "KB", "mb": "MB", "gb": "GB", "kib": "KiB", "mib": "MiB", "gib": "GiB"}


@dataclasses.dataclass(frozen=True)
class PoolSize:
    """``expert_pool`` parsed: one of a share of all pages, experts per
    layer, or bytes. A page is one expert of one layer."""

    fraction: float | None = None
    experts_per_layer: float | None = None
    nbytes: int | None = None
    byte_unit: str = "b"  # the unit the bytes were given in, for messages

    def pages(self, num_layers: int, num_experts: int, page_bytes: int) -> int:
        """Pages of the pool, in [1, all pages]."""
        total = num_layers * num_experts
        if self.fraction is not None:
            pages = round(self.fraction * total)
        elif self.experts_per_layer is not None:
            pages = round(min(self.experts_per_layer, num_experts) * num_layers)
        else:
            pages = self.nbytes // page_bytes
        return max(1, min(total, pages))

    def in_same_form(self, pages: int, num_layers: int, num_experts: int, page_bytes: int) -> str:
        """``pages`` written as this pool size was given (a share, experts
        per layer or bytes), rounded up so that it gives at least ``pages``."""
        if self.fraction is not None:
            return f'"{_round_up(100 * pages / (num_layers * num_experts))}%"'
        if self.experts_per_layer is not None:
            return _round_up(pages / num_layers)
        return f'"{_round_up(pages * page_bytes / _BYTES[self.byte_unit])}{_UNIT_NAMES[self.byte_unit]}"'


def _round_up(value: float) -> str:
    """``value`` rounded up to two decimals, written without an exponent
    (the parsers read it back)."""
    return f"{math.ceil(value * 100 - 1e-9) / 100:.2f}".rstrip("0").rstrip(".")


@dataclasses.dataclass(frozen=True)
class ExpertCacheOptions(PluginOptions):
    # None: every expert resident (no loads). "50%": that share of all
    # (layer, expert) pages; a number: experts per layer; "64MiB": bytes.
    expert_pool: str | None = None
    eviction: str = "belady"
    prefetch: bool = True
    # How many layers ahead a layer's prefetch reaches (past the last layer:
    # the next step's first layers). 2: each load has two layers' compute to
    # overlap, at the price of pages evicted earlier; the trade-off is
    # measured in docs/expert_cache.md, "Prefetch depth".
    prefetch_layers: int = 2
    # disk: a file of packed pages written at start-up, read with O_DIRECT;
    # checkpoint: the checkpoint's safetensors, read (O_DIRECT), converted
    # and packed per load; memory: a host copy (on GPU: pinned). auto: disk
    # on CPU, memory on GPU.
    backing_store: str = "auto"
    # Where the "disk" store writes its page file: a folder on disk (not
    # tmpfs). None: $XDG_CACHE_HOME/vllm_readme, i.e. ~/.cache/vllm_readme.
    page_dir: str | None = None

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
                f"{self.where('prefetch_layers')} must be >= 1 (layers ahead a prefetch reaches), "
                f'got {self.prefetch_layers}; to turn prefetching off give "prefetch": false.'
            )
        if self.page_dir is not None:
            _check_writable_folder(self.page_dir, self.where("page_dir"))
        self.pool_size()
        return self

    def pool_pages(self, num_layers: int, num_experts: int, page_bytes: int, minimum_pages: int) -> int | None:
        """Pages of the pool for a model of these dimensions (None: every
        expert resident). A pool below ``minimum_pages`` is refused, naming
        the minimum in the form the pool was given in."""
        size = self.pool_size()
        if size is None:
            return None
        pages = size.pages(num_layers, num_experts, page_bytes)
        if pages >= minimum_pages:
            return pages
        share = f'"{_round_up(100 * minimum_pages / (num_layers * num_experts))}%"'
        raise ReadMEOptionsError(
            f"{self.where('expert_pool')}={self.expert_pool!r} gives {pages} expert pages "
            f"({pages * page_bytes / 2**20:.2f} MiB), but a step may route to all {num_experts} experts of a layer: "
            f"the pool needs at least {minimum_pages} pages (expert_pool >= "
            f"{size.in_same_form(minimum_pages, num_layers, num_experts, page_bytes)}, that is {share} of this "
            f"model's {num_layers * num_experts} pages). Give at least that, or leave expert_pool out to keep every "
            "expert resident."
        )

    def pool_size(self) -> PoolSize | None:
        """None when every expert stays resident."""
        text = self.expert_pool
        if text is None or text.strip().lower() in ("all", "100%"):
            return None
        text = text.strip().lower()
        where = self.where("expert_pool")
        bad = ReadMEOptionsError(
            f'{where}: cannot read {self.expert_pool!r}. Give a share of all expert pages ("50%"), '
            'experts per layer (4), or bytes ("512MiB"); leave it out to keep every expert resident.'
        )
        if text.endswith("%"):
            share = _finite_number(text[:-1], bad) / 100
            if not 0 < share <= 1:
                raise ReadMEOptionsError(f"{where}: a share must be in (0%, 100%], got {self.expert_pool!r}.")
            return PoolSize(fraction=share)
        match = re.fullmatch(r"([0-9.]+)\s*([kmg]i?b|b)", text)
        if match:
            value = _finite_number(match.group(1), bad) * _BYTES[match.group(2)]
            if not 1 <= value < math.inf:
                raise ReadMEOptionsError(
                    f'{where}: a size in bytes must be at least 1 B and finite, got {self.expert_pool!r}; e.g. "512MiB".'
                )
            # round, not int: 2.01 * 10**6 is 2009999.99... in floating point
            return PoolSize(nbytes=round(value), byte_unit=match.group(2))
        per_layer = _finite_number(text, bad)
        if per_layer <= 0:
            raise ReadMEOptionsError(f"{where}: experts per layer must be > 0, got {self.expert_pool!r}.")
        return PoolSize(experts_per_layer=per_layer)


def _finite_number(text: str, bad: ReadMEOptionsError) -> float:
    """``text`` as a finite number; ``bad`` for anything else ("nan",
    "inf", "1.2.3")."""
    try:
        value = float(text)
    except ValueError:
        raise bad from None
    if not math.isfinite(value):
        raise bad
    return value


_ACCEPTS = {
    "int": "int (a whole number, e.g. 4)",
    "bool": 'bool (true or false; from the environment also "1"/"0", "yes"/"no", "on"/"off")',
    "str": "str",
    "str | None": "str or null",
}


def _check_writable_folder(folder: str, where: str) -> None:
    """``folder`` exists as a writable folder, or can be created: its
    nearest existing parent is one."""
    path = os.path.abspath(os.path.expanduser(folder))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ReadMEOptionsError(f"{where}: {existing} is not a folder; give a folder for the expert page file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        raise ReadMEOptionsError(
            f"{where}: {path} {what}; give a folder on disk this user can write, for the expert page file."
        )


def _coerce(where: str, value: Any, field: dataclasses.Field) -> Any:
    """``value`` as the field's type; ``where`` names the field in errors."""
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
    except (TypeError, ValueError, OverflowError):
        raise ReadMEOptionsError(f"{where}: expected {_ACCEPTS.get(kind, kind)}, got {value!r}.") from None
