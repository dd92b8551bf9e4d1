"""The benchmarks run in CI only as smoke tests on tiny models: they must
start, measure and write their files; their numbers are not checked here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_readme.checkpoint.tiny import build_tiny_dense

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_decode_benchmark_quick_smoke(tiny_gqa, tmp_path):
    dense = build_tiny_dense(tmp_path / "dense", intermediate_size=128)
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "decode.py"),
            "--quick",
            "--dense",
            str(dense),
            "--readme",
            str(tiny_gqa),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["bandwidth_gbs"] > 0
    resident = results["resident_weight_params"]
    assert resident["readme"]["router"] > 0 and resident["readme"]["routed experts"] > 0
    assert resident["dense"]["total"] == sum(v for k, v in resident["dense"].items() if k != "total")
    for rows in results["runs"].values():
        assert [r["batch"] for r in rows] == [1, 4]
        assert all(r["decode_step_ms"] > 0 and 0 < r["roofline_fraction"] for r in rows)
    assert out.with_suffix(".png").stat().st_size > 10_000
