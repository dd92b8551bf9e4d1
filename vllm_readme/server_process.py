# SPDX-License-Identifier: Apache-2.0
"""Run `vllm-readme serve` as a child process: the demo, the tests and the
serving benchmark start their servers the same way (local only, 127.0.0.1).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str | Path, port: int, *args: str) -> list[str]:
    """``vllm-readme serve MODEL`` on 127.0.0.1:PORT with vLLM's ``args``."""
    executable = Path(sys.executable).parent / "vllm-readme"
    return [str(executable), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]


def launch(
    model: str | Path,
    *args: str,
    port: int,
    env: dict[str, str] | None = None,
    log=subprocess.DEVNULL,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", **(env or {}))
    return subprocess.Popen(
        serve_command(model, port, *args), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn
    )


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path | None = None) -> None:
    """Until ``url``/health answers 200; a server that exits or never
    answers raises with the end of its log."""

    def tail() -> str:
        return log_path.read_text()[-4000:] if log_path is not None and log_path.is_file() else ""

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s:\n{tail()}")


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (vLLM shuts down cleanly), then kill if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def served(
    model: str | Path,
    *args: str,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    timeout_s: float = 600,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """A healthy server for the block; yields (process, base URL without /v1)."""
    port = free_port()
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = launch(model, *args, port=port, env=env, log=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(proc, url, timeout_s, log_path)
            yield proc, url
        finally:
            stop(proc)
    finally:
        if log_path is not None:
            log.close()
