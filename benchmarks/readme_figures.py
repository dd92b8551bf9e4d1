# SPDX-License-Identifier: Apache-2.0
"""Check that every figure in the README's results table is found in the
results file that row names.

    python benchmarks/readme_figures.py      # exit 1 and one line per problem

Each figure of the table's "result" column (every decimal number, with its
"x" or "%" if it has one) must be listed in FIGURES below with the file and
the value it comes from; the value, rounded as the README writes it, must
equal the README's text. A figure the table gains without an entry here, an
entry whose figure the README no longer shows, a file that is gone and a
value that changed all fail. tests/test_readme_figures.py runs this check.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# A figure: a decimal number, optionally followed by "x" or " %"/"%".
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+)(x| ?%)?(?![\w.])")


@dataclass(frozen=True)
class Figure:
    row: str  # text that starts the row's first cell
    fmt: str  # how the README writes it, e.g. "{:.2f}x"
    file: str  # under benchmarks/results/
    value: Callable[[dict[str, Any]], float]  # the value in that file's JSON


def _pooled(engine: str, workload: str, metric: str) -> Callable[[dict[str, Any]], float]:
    return lambda d: d["pooled_ratios"][engine][workload][metric]


def _pruned_over_dense(perplexities: Callable[[dict[str, Any]], dict]) -> Callable[[dict[str, Any]], float]:
    """The pruned dense model's perplexity over the dense model's."""
    return lambda d: perplexities(d)["pruned dense (same active size)"] / perplexities(d)["dense"]


def _fixed_expert_ratios(d: dict[str, Any]) -> list[float]:
    """The chat ablation's repetition ratios with one expert fixed for every token."""
    return [row["ratio_to_dense"] for name, row in d["chat"]["ablation"].items() if name.startswith("expert ")]


def _decode(batch: int) -> Callable[[dict[str, Any]], float]:
    """Read-ME over dense decode tokens/s at ``batch``, best round each, in the run's dtype."""
    return lambda d: next(iter(d["speedup_readme_over_dense"].values()))[str(batch)]["best"]


def _ratio(engine: str, workload: str, metric: str) -> Callable[[dict[str, Any]], float]:
    return lambda d: d["ratios"][engine][workload][metric]


EA = "expert-aware scheduler, default options"
README = "Read-ME (plugin, FCFS, all experts resident)"
POOL = "pool 50%, Belady + prefetch"
LARGE = "serve_expert_cache_large_experts.json"
REFACTOR = "refactor_smollm2.json"
PP, DP = "pipeline parallel x2", "data parallel x2"

FIGURES: list[Figure] = [
    Figure("quality", "{:.2f}x", REFACTOR, lambda d: d["ratios"]["Read-ME / dense"]),
    Figure("quality", "{:.2f}x", REFACTOR, lambda d: d["out_of_domain"]["Read-ME / dense"]),
    Figure("quality", "{:.2f}x", REFACTOR, _pruned_over_dense(lambda d: d["perplexity"])),
    Figure("quality", "{:.2f}x", REFACTOR, _pruned_over_dense(lambda d: d["out_of_domain"]["perplexity"])),
    Figure("chat", "{:.2f}", REFACTOR, lambda d: d["chat"]["repetition_readme"]),
    Figure("chat", "{:.2f}", REFACTOR, lambda d: d["chat"]["repetition_dense"]),
    Figure("chat", "{:.1f}x", REFACTOR, lambda d: d["chat"]["repetition_readme"] / d["chat"]["repetition_dense"]),
    Figure("chat", "{:.2f}x", REFACTOR, lambda d: d["chat"]["ablation"]["every expert active"]["ratio_to_dense"]),
    Figure("chat", "{:.1f}", REFACTOR, lambda d: min(_fixed_expert_ratios(d))),
    Figure("chat", "{:.1f}x", REFACTOR, lambda d: max(_fixed_expert_ratios(d))),
    Figure("chat", "{:.1f}", REFACTOR, lambda d: d["chat"]["sampled"]["sampling"]["temperature"]),
    Figure("chat", "{:.1f}", REFACTOR, lambda d: d["chat"]["sampled"]["sampling"]["top_p"]),
    Figure("chat", "{:.1f}x", REFACTOR, lambda d: d["chat"]["sampled"]["ratio_to_dense"]),
    *[Figure("decode vs stock vLLM", "{:.2f}x", "decode.json", _decode(batch)) for batch in (1, 8, 32)],
    *[
        Figure("serving vs stock vLLM", "{:.2f}x", "serve.json", _pooled(README, f"{data} c{c}", m))
        for data in ("random", "chat")
        for c in (1, 32)
        for m in ("output_throughput", "p95_tpot")
    ],
    *[
        Figure(
            "expert cache", "{:.2f}x", "serve_expert_cache.json", _pooled(engine, f"random c{c}", "output_throughput")
        )
        for engine in (POOL, "pool 50%, expert-aware scheduler + Belady + prefetch", "pool 50%, LRU on demand")
        for c in (1, 32)
    ],
    *[
        Figure("the same where experts", "{:.2f}x", LARGE, _ratio(engine, f"random c{c}", "output_throughput"))
        for engine in (POOL, "pool 50%, scheduler + Belady + prefetch")
        for c in (1, 32)
    ],
    Figure(
        "the same where experts",
        "{:.2f}x",
        LARGE,
        lambda d: (
            d["runs"]["random c32"]["pool 50%, scheduler + Belady + prefetch"]["output_throughput"]
            / d["runs"]["random c32"]["pool 50%, LRU on demand"]["output_throughput"]
        ),
    ),
    *[
        Figure("expert-aware scheduler", "{:.2f}x", "serve_scheduler_default.json", _pooled(EA, f"random c{c}", m))
        for c in (1, 8, 32, 64)
        for m in ("output_throughput", "p95_tpot")
    ],
    Figure(
        "expert-aware scheduler",
        "{:.2f}",
        "serve_scheduler_default.json",
        lambda d: max(run[EA]["scheduler_own_ms_per_step"] for run in d["runs"].values() if EA in run),
    ),
    *[
        Figure("split over two processes", "{:.2f}x", "serve_scale_out.json", _ratio(e, f"random c{c}", m))
        for e in (PP, DP)
        for c in (1, 32)
        for m in ("output_throughput",)
    ],
]


def _rows(readme: str) -> dict[str, str]:
    """The results table's rows: first cell -> the "result" cell."""
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("what", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = cells[1]
    return rows


def _row(rows: dict[str, str], start: str) -> tuple[str, str] | None:
    matches = [(k, v) for k, v in rows.items() if k.startswith(start)]
    return matches[0] if len(matches) == 1 else None


def check(readme_path: Path = ROOT / "README.md", results: Path = RESULTS) -> list[str]:
    """Every problem found, one line each (empty: every figure checks)."""
    problems: list[str] = []
    rows = _rows(readme_path.read_text())
    if not rows:
        return [f"{readme_path}: no results table under '## Results'"]
    expected: dict[str, list[str]] = {}
    for figure in FIGURES:
        row = _row(rows, figure.row)
        if row is None:
            problems.append(f"no single results row starts with {figure.row!r}")
            continue
        path = results / figure.file
        try:
            data = json.loads(path.read_text())
            value = figure.value(data)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
            problems.append(f"{figure.row!r}: cannot read its value from {path.name}: {type(err).__name__}: {err}")
            continue
        expected.setdefault(row[0], []).append(figure.fmt.format(value))
    for first, cell in rows.items():
        quoted = [number + (unit or "").strip() for number, unit in FIGURE.findall(cell)]
        wanted = expected.get(first, [])
        for text in quoted:
            if text in wanted:
                wanted.remove(text)
            else:
                problems.append(f"row {first[:40]!r}: the README says {text}, which no listed results value gives")
        for text in wanted:
            problems.append(f"row {first[:40]!r}: the results file gives {text}, which the README does not show")
    return problems


def main() -> None:
    problems = check()
    for line in problems:
        print(line)
    checked = len(FIGURES) - len(problems)
    print(f"{checked} of {len(FIGURES)} README figures found in benchmarks/results" if not problems else "")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
