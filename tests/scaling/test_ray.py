# SPDX-License-Identifier: Apache-2.0
"""Multi-node serving through vLLM's Ray executor
(``distributed_executor_backend="ray"``): a Read-ME model split into two
pipeline stages over a Ray cluster of two nodes, one stage a node, gives the
reference's greedy tokens and logprobs, and each node's worker loads the
plugin (vLLM loads the ``vllm.general_plugins`` entry points in every worker
it starts, Ray actors included). Both nodes run on this machine, a head and
a second raylet: what this proves is the path between nodes (placement, TCP
message queues, a gloo process group across nodes), not a network between
machines.

vLLM's CPU platform names no Ray resource for its workers
(``CpuPlatform.ray_device_key`` is empty) and vLLM 0.32 refuses the Ray
executor there ("current platform cpu does not support ray."): the first
test checks that refusal, so that the day vLLM lifts it this test says so.
With the resource named, the executor runs on CPU as it is: on such a
platform the split runs under a test-only platform plugin, vLLM's CPU
platform with the resource named, the way plugins for other devices enable
Ray (docs/scaling.md, "Ray")."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest
from conftest import PROMPTS
from parallel_engines import assert_matches_reference, run_engine

from vllm_readme.checkpoint.tiny import TinyShape, build_tiny_checkpoint

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'vllm-readme[ray]')")

pytestmark = pytest.mark.slow  # a Ray cluster and a multi-process vLLM engine
NEW_TOKENS = 12
# Ray prefixes what an actor prints with its class and pid.
STAGE_LOG = re.compile(r"\(\w+ pid=(\d+)(?:, ip=[^)]*)?\).*this pipeline stage: layers (\d+-\d+)")

# vLLM's CPU platform with the Ray resource named: each worker takes one
# logical "GPU" slot of a node (Ray counts them; nothing uses a GPU).
PLATFORM_WITH_RAY = {
    "ray_platform_plugin.py": "def platform():\n    return 'ray_cpu_platform.CpuPlatformWithRay'\n",
    "ray_cpu_platform.py": (
        "from vllm.platforms.cpu import CpuPlatform\n\n\n"
        "class CpuPlatformWithRay(CpuPlatform):\n"
        '    ray_device_key = "GPU"\n'
    ),
    "ray_platform_plugin-0.dist-info/METADATA": "Metadata-Version: 2.1\nName: ray-platform-plugin\nVersion: 0\n",
    "ray_platform_plugin-0.dist-info/entry_points.txt": (
        "[vllm.platform_plugins]\nray_cpu = ray_platform_plugin:platform\n"
    ),
}


def ray_device_key() -> str:
    """The Ray resource vLLM's platform here gives each worker ("" where
    vLLM runs no Ray executor)."""
    from vllm.platforms import current_platform

    return current_platform.ray_device_key


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ray") / "tiny4", TinyShape(num_hidden_layers=4), seed=11)


@pytest.fixture(scope="module")
def platform_env(tmp_path_factory) -> dict[str, str]:
    """The environment under which vLLM runs its Ray executor here: none
    needed where the platform names a Ray resource, else the platform
    plugin above on the Python path."""
    if ray_device_key():
        return {}
    folder = tmp_path_factory.mktemp("ray_platform")
    for name, text in PLATFORM_WITH_RAY.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def two_nodes(platform_env):
    """A Ray cluster of a head and one more node on this machine, each with
    one CPU and one worker slot of the platform's resource, so that vLLM's
    placement group (one bundle a worker, packed) puts one worker on each.
    The nodes' processes (and so the workers) get ``platform_env``. Torn
    down however the test ends; Ray's files go with it."""
    from ray.cluster_utils import Cluster

    key = ray_device_key() or "GPU"
    per_node: dict = {"num_cpus": 1}
    if key == "GPU":
        per_node["num_gpus"] = 1
    else:
        per_node["resources"] = {key: 1}
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray puts Unix sockets in it
    cluster = Cluster()
    try:
        with pytest.MonkeyPatch.context() as ray_env:
            # Ray's session folders and its address file, in place of /tmp/ray.
            ray_env.setenv("RAY_TMPDIR", temp_dir)
            try:
                with pytest.MonkeyPatch.context() as node_env:
                    for name, value in platform_env.items():
                        node_env.setenv(name, value)
                    # The head's dashboard serves Ray's state API.
                    cluster.add_node(**per_node, include_dashboard=True)
                    cluster.add_node(**per_node)
                cluster.wait_for_nodes()
                yield cluster
            finally:
                cluster.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def worker_actors(cluster) -> list:
    """vLLM's worker actors the cluster has run (alive or not)."""
    from ray.util.state import list_actors

    return [
        actor
        for actor in list_actors(address=f"http://{cluster.webui_url}", detail=True, limit=1000)
        if actor.class_name in ("RayWorkerProc", "RayWorkerWrapper")
    ]


def test_vllm_refuses_the_ray_executor_where_its_platform_names_no_ray_resource(four_layers, two_nodes, tmp_path):
    """Why docs/scaling.md says vLLM's Ray executor does not run on its CPU
    build: vLLM's own refusal, before any worker starts."""
    if ray_device_key():
        pytest.skip(f"vLLM's platform here runs Ray workers on {ray_device_key()!r} resources")
    with pytest.raises(AssertionError) as failed:
        run_engine(
            four_layers,
            tmp_path,
            PROMPTS[:1],
            2,
            workers=2,
            env={"RAY_ADDRESS": two_nodes.address},
            distributed_executor_backend="ray",
            pipeline_parallel_size=2,
        )
    assert "current platform cpu does not support ray" in str(failed.value), str(failed.value)[-3000:]
    assert worker_actors(two_nodes) == []


def test_pp2_over_two_ray_nodes_matches_the_reference(four_layers, two_nodes, platform_env, tmp_path):
    results, log = run_engine(
        four_layers,
        tmp_path,
        PROMPTS,
        NEW_TOKENS,
        workers=2,
        # Every worker's line, not one for all: Ray merges lines that differ only in numbers.
        env={"RAY_ADDRESS": two_nodes.address, "RAY_DEDUP_LOGS": "0", **platform_env},
        distributed_executor_backend="ray",
        pipeline_parallel_size=2,
    )
    assert_matches_reference(four_layers, results, NEW_TOKENS)

    workers = worker_actors(two_nodes)
    node_of_pid = {actor.pid: actor.node_id for actor in workers}
    assert len(node_of_pid) == 2, workers
    assert set(node_of_pid.values()) == {node.node_id for node in two_nodes.list_all_nodes()}, workers
    # The plugin ran in each worker: its model logged the stage it holds.
    stage_of_pid = {int(pid): layers for pid, layers in STAGE_LOG.findall(log)}
    assert sorted(stage_of_pid.values()) == ["0-1", "2-3"], log[-3000:]
    assert set(stage_of_pid) == set(node_of_pid), (stage_of_pid, workers)
