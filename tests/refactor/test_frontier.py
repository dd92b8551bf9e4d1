# SPDX-License-Identifier: Apache-2.0
"""benchmarks/frontier.py's judgement of each point against its per-point
targets (``TARGETS``, the table the default was chosen from), on rows
given here."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _frontier_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontier_table_judges_every_point_against_the_targets(tmp_path):
    """frontier.md: each point's figures against the per-point targets, best
    out-of-domain quality first; a figure a point did not measure is '-'."""
    frontier = _frontier_module()
    common = {"expert_cut": "disjoint", "num_experts": 4}

    def row(keep, ood, decode, persistence, chat):
        return {
            "options": {**common, "keep": keep},
            "ood_readme_over_dense": ood,
            "ood_readme_over_pruned": 0.9,
            "decode_speedup_over_dense": decode,
            "parameters_over_dense": 1.2,
            "route_persistence": persistence[0],
            "route_persistence_out_of_domain": persistence[1],
            "chat_repetition_over_dense": chat,
        }

    rows = [
        row(0.5, 2.1, {"batch 1": 1.2, "batch 8": 0.99, "batch 32": 1.0}, (0.7, 0.45), 1.4),
        row(0.875, 1.14, {"skipped": "--skip-decode"}, (0.7, 0.69), 2.9),
    ]
    frontier.publish(rows, tmp_path / "frontier.json")
    lines = [line for line in (tmp_path / "frontier.md").read_text().splitlines() if line.startswith("| disjoint")]
    assert len(lines) == 2 and lines[0].startswith("| disjoint 4 x 0.875 | 4 of 5 |")
    cells = [cell.strip() for cell in lines[0].split("|")[3:-1]]
    assert cells[0] == "**yes** 1.14x" and cells[2:5] == ["-", "-", "-"] and cells[7] == "no 2.9x"
    cells = [cell.strip() for cell in lines[1].split("|")[3:-1]]
    # 1.2x at batch 1 meets 1.15x, 0.99x at batch 8 misses 1.0x, 1.0x meets it; persistence is the lower of in/out.
    assert cells[2:5] == ["**yes** 1.200x", "no 0.990x", "**yes** 1.000x"]
    assert cells[6] == "no 0.450" and cells[7] == "**yes** 1.4x"
    assert lines[1].startswith("| disjoint 4 x 0.5 | 5 of 8 |")
    assert json.loads((tmp_path / "frontier.json").read_text())["points"] == rows
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
