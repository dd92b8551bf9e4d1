# SPDX-License-Identifier: Apache-2.0
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


def test_serving_benchmark_quick_smoke(tiny_gqa, tmp_path):
    """Both servers start, every workload runs against both through vLLM's
    benchmark client, the Read-ME server's expert metrics are read, and the
    JSON, PNG and Markdown report are written."""
    dense = build_tiny_dense(tmp_path / "dense", intermediate_size=128)
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--dense", str(dense)]
    proc = subprocess.run(
        [*cmd, "--readme", str(tiny_gqa), "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    dense_label, readme_label = list(results["engines"])
    assert set(results["runs"]) == {"random c1", "random c4", "chat c1", "chat c4"} | {
        k for k in results["runs"] if k.startswith("chat rate ")
    }
    assert len(results["runs"]) == 5
    for key, row in results["runs"].items():
        for label in (dense_label, readme_label):
            run = row[label]
            assert run["failed"] == 0 and run["completed"] == 8, (key, label)
            assert run["output_throughput"] > 0 and run["p95_tpot_ms"] > 0
            assert run["normalised_latency_ms_per_token"]["p95"] >= run["normalised_latency_ms_per_token"]["p50"]
        experts = row[readme_label]["mean_unique_experts_per_step"]
        assert 1.0 <= experts <= 8.0, "unique experts per step must come from the Read-ME server's /metrics"
        assert "mean_unique_experts_per_step" not in row[dense_label]
    assert set(results["ratios"][readme_label]) == set(results["runs"])
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| random c1 |" in out.with_suffix(".md").read_text()
