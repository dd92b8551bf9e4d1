# SPDX-License-Identifier: Apache-2.0
"""How long an engine step takes, from what it runs (paper §4.2).

A Read-ME step reads the shared weights once, every *distinct* routed expert
once, and does work per token. So its time is modelled as

    step_ms = base_ms + per_token_ms * tokens + per_expert_ms * distinct_experts
              + per_load_ms * experts_not_resident

(the last term only with an expert cache: a missing expert must be loaded).
Whether grouping tokens by expert pays is exactly the question of how large
``per_expert_ms`` is against ``per_token_ms``: the fit on a machine answers
it. Plain Python: no vLLM, no torch.

``OnlineCostFit`` answers it while the engine serves: a least-squares fit
over the engine's own recent steps, with standard errors, and a verdict on
whether a distinct expert is measured to cost time at all. Until it is,
the scheduler keeps vLLM's order.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

# The least time a step can take in a model: a step of tokens is never free,
# and the policy divides tokens by step time.
MIN_STEP_MS = 1e-3

COEFFICIENTS = ("base_ms", "per_token_ms", "per_expert_ms", "per_load_ms")


@dataclasses.dataclass(frozen=True)
class StepCostModel:
    base_ms: float
    per_token_ms: float
    per_expert_ms: float
    per_load_ms: float = 0.0
    source: str = "default"

    def __post_init__(self):
        for name in COEFFICIENTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (milliseconds), got {value!r}")
        if self.base_ms + self.per_token_ms < MIN_STEP_MS:
            raise ValueError(
                f"base_ms + per_token_ms must be >= {MIN_STEP_MS} ms (a step of one token takes time), "
                f"got {self.base_ms!r} + {self.per_token_ms!r}"
            )

    def step_ms(self, tokens: int, experts: int, loads: int = 0) -> float:
        if tokens <= 0:
            return 0.0
        return self.base_ms + self.per_token_ms * tokens + self.per_expert_ms * experts + self.per_load_ms * loads

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]], per_load_ms: float = 0.0, source: str = "fit") -> StepCostModel:
        """Least squares over (tokens, distinct experts, measured ms) samples.
        A negative per-token or per-expert cost is noise (0); the fixed part
        is floored so that a step always takes time."""
        if len(samples) < 3:
            raise ValueError(f"step cost model: need at least 3 samples to fit, got {len(samples)}.")
        rows = [(1.0, float(t), float(e)) for t, e, _ in samples]
        ys = [float(ms) for _, _, ms in samples]
        coef = _least_squares(rows, ys)
        if not all(math.isfinite(c) for c in coef):
            raise ValueError("step cost model: the samples give no finite fit (non-finite times?).")
        per_token, per_expert = max(0.0, coef[1]), max(0.0, coef[2])
        base = max(coef[0], MIN_STEP_MS - per_token, 0.0)
        return cls(base, per_token, per_expert, per_load_ms, source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StepCostModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"step cost model file {path} cannot be read ({exc.strerror}).") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"step cost model file {path} is not JSON ({exc.msg}).") from exc
        if not isinstance(data, dict):
            raise ValueError(f"step cost model file {path}: expected a JSON object of coefficients, got {data!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted({"base_ms", "per_token_ms", "per_expert_ms"} - set(data))
        if unknown or missing:
            raise ValueError(
                f"step cost model file {path}: "
                + (f"unknown field(s) {unknown}; " if unknown else "")
                + (f"missing {missing}; " if missing else "")
                + f"expected {sorted(known)}."
            )
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(
                f"step cost model file {path}: {exc}. Measure this machine's costs with "
                "`vllm-readme calibrate MODEL --out FILE`, or leave cost_model out to fit them online."
            ) from exc


@dataclasses.dataclass(frozen=True)
class CostFit:
    """One online fit: coefficients, their standard errors, and whether a
    distinct expert is measured to cost time (``significant``)."""

    samples: int
    base_ms: float
    per_token_ms: float
    per_expert_ms: float
    per_token_se: float
    per_expert_se: float
    significant: bool

    def model(self) -> StepCostModel:
        """The fit as a step-cost model; a distinct expert costs nothing in it
        until its cost is significant."""
        per_token = max(0.0, self.per_token_ms)
        base = max(self.base_ms, MIN_STEP_MS - per_token, 0.0)
        per_expert = max(0.0, self.per_expert_ms) if self.significant else 0.0
        return StepCostModel(base, per_token, per_expert, source="fitted online")

    def describe(self) -> str:
        return (
            f"{self.base_ms:.2f} ms + {self.per_token_ms:.3f} ms/token (SE {self.per_token_se:.3f}) + "
            f"{self.per_expert_ms:.3f} ms/expert (SE {self.per_expert_se:.3f}) over the last {self.samples} steps"
        )


class OnlineCostFit:
    """The step-cost model fitted from the engine's own recent steps.

    Over a sliding window of ``window`` steps (running sums: O(1) per step).
    What a distinct expert costs is measured only between steps that ran the
    same number of tokens for the same number of requests (a within-group
    least squares, "fixed effects"): a step's time is any function of its
    tokens and requests (attention and batching make it far from linear)
    plus ``per_expert_ms`` per distinct expert. Across groups, experts
    saturate as the batch grows while the time per token falls, and a
    straight line through both would read that curvature as an expert cost.
    The time per token is then the straight-line fit of what is left.

    A distinct expert counts as costing time only when even the low end of
    its cost (``per_expert_ms - z * SE``) is above 0 and makes the step's
    experts at least ``min_share`` of a mean step, and has done so at each of
    the last ``persist`` refits; until then the fitted model charges nothing
    per expert and the scheduler keeps vLLM's order. Grouping requests by
    expert can save at most the experts' share of a step, and every request
    it holds back waits a whole step: below a tenth of the step the saving
    cannot pay for the inter-token gaps it opens. Steps whose experts never
    vary at a given batch (every decode a new expert) cannot tell the two
    costs apart: such a fit is not significant either.
    """

    def __init__(
        self, window: int = 512, min_samples: int = 64, z: float = 3.0, min_share: float = 0.10, persist: int = 64
    ):
        if window < min_samples or min_samples < 4:
            raise ValueError(f"online cost fit: need window ({window}) >= min_samples ({min_samples}) >= 4.")
        self.window, self.min_samples, self.z, self.min_share = window, min_samples, z, min_share
        self.persist = persist
        self.samples: collections.deque[tuple[float, float, float, tuple]] = collections.deque()
        self.latest: CostFit | None = None
        self._sums = [0.0] * 9  # t, e, y, tt, ee, te, ty, ey, yy
        # Per (tokens, requests): n, e, y, ee, ey, yy.
        self._groups: dict[tuple, list[float]] = {}
        self._within_sums = [0.0] * 3  # centred ee, ey, yy summed over the groups, kept as groups change
        self._since_rebuild = 0
        self._measured_for = 0  # consecutive refits whose expert cost was material

    def add(self, tokens: int, experts: int, ms: float, requests: int | None = None) -> None:
        """One finished step; a non-finite or non-positive time is dropped."""
        if not (math.isfinite(ms) and ms > 0 and tokens > 0):
            return
        sample = (float(tokens), float(experts), float(ms), (tokens, requests))
        self.samples.append(sample)
        self._accumulate(sample, 1.0)
        if len(self.samples) > self.window:
            self._accumulate(self.samples.popleft(), -1.0)
        self._since_rebuild += 1
        if self._since_rebuild >= self.window:  # running sums drift; rebuild them now and then
            self._sums, self._groups, self._within_sums = [0.0] * 9, {}, [0.0] * 3
            for old in self.samples:
                self._accumulate(old, 1.0)
            self._since_rebuild = 0

    def _accumulate(self, sample: tuple, sign: float) -> None:
        t, e, y, key = sample
        for i, value in enumerate((t, e, y, t * t, e * e, t * e, t * y, e * y, y * y)):
            self._sums[i] += sign * value
        group = self._groups.setdefault(key, [0.0] * 6)
        self._add_within(group, -1.0)  # the group's part changes: O(1) a step, not a pass over the groups
        for i, value in enumerate((1.0, e, y, e * e, e * y, y * y)):
            group[i] += sign * value
        if group[0] < 0.5:
            del self._groups[key]
        else:
            self._add_within(group, 1.0)

    def _add_within(self, group: list[float], sign: float) -> None:
        n, e, y, ee, ey, yy = group
        if n >= 0.5:
            for i, value in enumerate((ee - e * e / n, ey - e * y / n, yy - y * y / n)):
                self._within_sums[i] += sign * value

    def _within(self) -> tuple[float, float, float, int]:
        """Centred sums of experts and time within each group, and the groups."""
        return (*self._within_sums, len(self._groups))

    def refit(self) -> CostFit | None:
        """Fit the current window; None until it holds ``min_samples`` steps."""
        n = len(self.samples)
        if n < self.min_samples:
            return None
        st, se, sy, stt, see, ste, sty, sey, syy = self._sums
        mean_t, mean_e, mean_y = st / n, se / n, sy / n
        cee, cey, cyy, groups = self._within()
        dof = n - groups - 1
        if dof < 2 or cee <= 1e-9 * n:
            # Experts never vary at a given batch: no expert cost can be measured.
            per_expert, expert_se, material = 0.0, math.inf, False
        else:
            per_expert = cey / cee
            residual = max(0.0, cyy - per_expert * cey) / dof
            expert_se = math.sqrt(residual / cee)
            low_end = per_expert - self.z * expert_se
            material = low_end > 0 and low_end * mean_e >= self.min_share * mean_y
        self._measured_for = self._measured_for + 1 if material else 0
        # The rest of the time, a straight line in tokens.
        ctt, cte, cty = stt - st * st / n, ste - st * se / n, sty - st * sy / n
        per_token = (cty - per_expert * cte) / ctt if ctt > 0 else 0.0
        # Residual of the straight line over the whole window.
        c_ee, c_ey, c_yy = see - se * se / n, sey - se * sy / n, syy - sy * sy / n
        rss = (
            c_yy
            - 2 * per_token * cty
            - 2 * per_expert * c_ey
            + per_token**2 * ctt
            + 2 * per_token * per_expert * cte
            + per_expert**2 * c_ee
        )
        token_se = math.sqrt(max(0.0, rss) / (n - 3) / ctt) if ctt > 0 else math.inf
        base = mean_y - per_token * mean_t - per_expert * mean_e
        significant = self._measured_for >= self.persist
        fit = CostFit(n, base, per_token, per_expert, token_se, expert_se, significant)
        self.latest = fit
        return fit

    def model(self) -> StepCostModel | None:
        """The latest fit's model, None before the first fit."""
        return None if self.latest is None else self.latest.model()


def _least_squares(rows: list[tuple[float, ...]], ys: list[float]) -> list[float]:
    """Normal equations with a tiny ridge, solved by Gaussian elimination."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) + (1e-9 if i == j else 0.0) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(n):
            if r != col and a[col][col]:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] if a[i][i] else 0.0 for i in range(n)]
