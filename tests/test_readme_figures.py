# SPDX-License-Identifier: Apache-2.0
"""Every figure in the README's results table is found in the results file
its row names (benchmarks/readme_figures.py), and the check catches a
figure that disagrees with its file or that no file gives."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_readme_figure_is_in_its_results_file():
    assert _checker().check() == []


def test_the_check_fails_on_a_figure_no_file_gives(tmp_path):
    checker = _checker()
    readme = (ROOT / "README.md").read_text()
    quoted = checker.FIGURES[0].fmt.format(
        checker.FIGURES[0].value(json.loads((checker.RESULTS / checker.FIGURES[0].file).read_text()))
    )
    row_start = readme.index("| " + checker.FIGURES[0].row)
    row_end = readme.index("\n", row_start)
    row = readme[row_start:row_end]
    assert quoted in row
    changed = tmp_path / "README.md"
    changed.write_text(readme[:row_start] + row.replace(quoted, "9.99x", 1) + readme[row_end:])
    problems = set(checker.check(changed)) - set(checker.check())
    assert any("9.99x" in p for p in problems)
    assert any(quoted in p for p in problems)


def test_the_check_fails_when_a_results_value_changes(tmp_path):
    checker = _checker()
    results = tmp_path / "results"
    shutil.copytree(checker.RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    path = results / "refactor_smollm2.json"
    data = json.loads(path.read_text())
    data["ratios"]["Read-ME / dense"] += 0.5
    path.write_text(json.dumps(data))
    new = set(checker.check(results=results)) - set(checker.check())
    assert len(new) == 2, new  # the README's figure no value gives, and the value the README lacks
