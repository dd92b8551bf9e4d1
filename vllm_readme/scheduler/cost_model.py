"""How long an engine step takes, from what it runs (paper §4.2).

A Read-ME step reads the shared weights once, every *distinct* routed expert
once, and does work per token. So its time is modelled as

    step_ms = base_ms + per_token_ms * tokens + per_expert_ms * distinct_experts
              + per_load_ms * experts_not_resident

(the last term only with an expert cache: a missing expert must be loaded).
Whether grouping tokens by expert pays is exactly the question of how large
``per_expert_ms`` is against ``per_token_ms``: the fit on a machine answers
it. Plain Python: no vLLM, no torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class StepCostModel:
    base_ms: float
    per_token_ms: float
    per_expert_ms: float
    per_load_ms: float = 0.0
    source: str = "default"

    def __post_init__(self):
        for name in ("base_ms", "per_token_ms", "per_expert_ms", "per_load_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"step cost model: {name} must be a number >= 0, got {value!r}.")

    def step_ms(self, tokens: int, experts: int, loads: int = 0) -> float:
        if tokens <= 0:
            return 0.0
        return self.base_ms + self.per_token_ms * tokens + self.per_expert_ms * experts + self.per_load_ms * loads

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]], per_load_ms: float = 0.0, source: str = "fit") -> StepCostModel:
        """Least squares over (tokens, distinct experts, measured ms) samples;
        coefficients clamped at 0 (a negative cost is noise)."""
        if len(samples) < 3:
            raise ValueError(f"step cost model: need at least 3 samples to fit, got {len(samples)}.")
        rows = [(1.0, float(t), float(e)) for t, e, _ in samples]
        ys = [float(ms) for _, _, ms in samples]
        coef = _least_squares(rows, ys)
        base, per_token, per_expert = (max(0.0, c) for c in coef)
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
        return cls(**data)


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
