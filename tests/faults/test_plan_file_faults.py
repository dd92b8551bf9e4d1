# SPDX-License-Identifier: Apache-2.0
"""The plan file between the expert-aware scheduler and the workers
(experts/plan.py) under faults: engines starting at once, a name already
taken (a stale file of another user, a directory), a folder that cannot hold
it, tensor-parallel ranks. The plan only orders requests and evictions, so
every fault must leave the engine serving vLLM's own greedy tokens, with one
log line, and no file behind."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, vllm_engine

from vllm_readme.experts import plan as plan_module
from vllm_readme.experts.plan import PlanReader, PlanWriter, plan_path

OTHER_USER, THIS_TEST_USER = 65533, 65534  # ids no account here runs as


@contextmanager
def plan_log():
    """The plan module's log records (vLLM's logger tree does not propagate
    to pytest's capture)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = plan_module.logger
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def warnings_of(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


@pytest.fixture
def plan_dir(monkeypatch):
    """A folder for plan files, shared like /dev/shm: world-writable, sticky."""
    folder = Path(tempfile.mkdtemp(prefix="plan-dir-", dir="/tmp"))
    folder.chmod(0o1777)
    monkeypatch.setenv("VLLM_README_PLAN_DIR", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _start_engine(engine_id, barrier, done, results):
    """One engine's scheduler side, started at the same moment as others."""
    barrier.wait()
    writer = PlanWriter.create(8, engine_id)
    if writer is None:
        results.put((engine_id, None))
        return
    writer.publish({int(engine_id.rsplit("-", 1)[1])})
    results.put((engine_id, str(writer.path)))
    done.wait(60)
    writer.close()


def test_engines_starting_at_once_keep_their_own_files(plan_dir):
    """Every starting writer first removes the files of dead engines; one
    that starts while another is being created must not take it for dead."""
    context = multiprocessing.get_context("fork")
    engines = [f"engine-{i}" for i in range(6)]
    barrier, done, results = context.Barrier(len(engines)), context.Event(), context.Queue()
    children = [context.Process(target=_start_engine, args=(e, barrier, done, results)) for e in engines]
    for child in children:
        child.start()
    try:
        paths = dict(results.get(timeout=60) for _ in engines)
        assert all(paths[e] == str(plan_path(e)) for e in engines), paths
        for i, engine in enumerate(engines):
            assert Path(paths[engine]).exists()
            reader = PlanReader(8, engine)
            assert reader.read() == frozenset({i})  # its own plan, in its own file
            reader.close()
    finally:
        done.set()
        for child in children:
            child.join(30)
    assert [c.exitcode for c in children] == [0] * len(engines)
    assert not list(plan_dir.iterdir())  # each removed its own on close


def test_engines_with_one_pid_get_separate_buffers(plan_dir):
    """Two engines whose scheduler has the same pid (two containers with
    their own pid namespaces and one /dev/shm; here one process) write to
    two files; one name is never shared: the second writer of a name runs
    without a plan and logs why."""
    first, second = PlanWriter.create(8, "1765000000000000001"), PlanWriter.create(8, "1765000000000000002")
    try:
        first.publish({1})
        second.publish({2})
        assert PlanReader(8, "1765000000000000001").read() == frozenset({1})
        assert PlanReader(8, "1765000000000000002").read() == frozenset({2})
        with plan_log() as records:
            assert PlanWriter.create(8, "1765000000000000001") is None
        (line,) = warnings_of(records)
        assert "another file has its name" in line and "VLLM_README_PLAN_DIR" in line
        assert PlanReader(8, "1765000000000000001").read() == frozenset({1})  # the first engine's, untouched
    finally:
        first.close()
        second.close()
    assert not list(plan_dir.iterdir())


def _writer_as_another_user(folder, results):
    os.setgid(THIS_TEST_USER)
    os.setuid(THIS_TEST_USER)
    os.environ["VLLM_README_PLAN_DIR"] = folder
    with plan_log() as records:
        taken = PlanWriter.create(8, "taken")  # the stale file has this engine's name
        fresh = PlanWriter.create(8, "fresh")  # another name: the stale file must not stop it
        fresh.publish({3})
        reader = PlanReader(8, "taken")
        results.put(
            (
                taken,
                warnings_of(records),
                PlanReader(8, "fresh").read(),
                reader.read(),
                reader.publish_routes(b"\0" * 8, b"\0" * 4, b"\1"),
            )
        )
        fresh.close()


def test_a_stale_file_of_another_user_degrades_with_one_line(plan_dir):
    """A file left in the shared folder by another user's engine (mode 0600,
    not removable in a sticky folder): an engine of this user whose name it
    holds runs without a plan, with one log line, and its workers neither
    read nor write the other user's file; an engine with another name starts
    normally. The engine runs as an unprivileged user (this test runs as
    root, which no permission stops)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the engine side as another user")
    stale = plan_path("taken")
    stale.write_bytes(b"\1" * 4096)
    os.chown(stale, OTHER_USER, OTHER_USER)
    stale.chmod(0o600)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_writer_as_another_user, args=(str(plan_dir), results))
    child.start()
    taken, lines, fresh_plan, taken_plan, taken_routes = results.get(timeout=60)
    child.join(30)
    assert child.exitcode == 0
    assert taken is None and len(lines) == 1 and str(stale) in lines[0] and "another file has its name" in lines[0]
    assert fresh_plan == frozenset({3})
    assert taken_plan is None and taken_routes is False
    assert stale.read_bytes() == b"\1" * 4096 and stale.stat().st_uid == OTHER_USER  # left as it was
    assert [p.name for p in plan_dir.iterdir()] == [stale.name]


def test_a_directory_in_the_way_degrades_with_one_line(plan_dir):
    """Whatever holds the name (here a directory, which no cleaner removes):
    the writer does not start, logs one line, and leaves it."""
    plan_path("blocked").mkdir()
    with plan_log() as records:
        assert PlanWriter.create(8, "blocked") is None
        assert PlanReader(8, "blocked").read() is None
    assert len(warnings_of(records)) == 1
    assert plan_path("blocked").is_dir() and len(list(plan_dir.iterdir())) == 1


def _dead_engine(engine_id):
    writer = PlanWriter(8, engine_id)
    writer.publish({4})
    os._exit(0)  # no close(), no finalizer: the file stays


def test_a_dead_engines_file_is_removed_and_never_attached(plan_dir):
    """An engine that died without closing leaves its file; a reader of that
    name does not attach to it, and the next writer removes it."""
    child = multiprocessing.get_context("fork").Process(target=_dead_engine, args=("dead",))
    child.start()
    child.join(30)
    assert plan_path("dead").exists()
    reader = PlanReader(8, "dead")
    assert reader.read() is None and reader.publish_routes(b"\0" * 8, b"\0" * 4, b"\1") is False
    live = PlanWriter.create(8, "live")
    try:
        assert not plan_path("dead").exists() and live.path.exists()
    finally:
        live.close()


def test_the_name_goes_once_every_reader_has_the_file_open(plan_dir):
    """The name is only how readers find the file: once every reader the
    engine starts (a cache per tensor-parallel rank, the route publisher)
    has it open, the writer unlinks it, so an engine killed before it shuts
    down leaves nothing behind; the blocks keep working."""
    from vllm_readme.experts.plan import ROUTES_READER, expected_readers

    writer = PlanWriter.create(8, "engine", readers=expected_readers(2, caches=True, routes=True))
    readers = [PlanReader(8, "engine", rank=0), PlanReader(8, "engine", rank=0, role=ROUTES_READER)]
    try:
        for reader in readers:
            assert reader.attach()
            writer.publish({1})
            assert writer.path.exists()  # rank 1's cache has not opened it yet
        readers.append(PlanReader(8, "engine", rank=1))
        assert readers[-1].read() == frozenset({1})
        writer.publish({2})
        assert not list(plan_dir.iterdir())
        assert [r.read() for r in (readers[0], readers[2])] == [frozenset({2})] * 2
        readers[1].publish_routes(struct.pack("<q", 7), struct.pack("<i", 3), bytes([5]))
        assert writer.model_routes() == ((7,), (3,), bytes([5]))
    finally:
        for reader in readers:
            reader.close()
        writer.close()


def _cache(tp_rank: int, engine_id: str):
    from vllm_readme.experts.cache import ExpertCache
    from vllm_readme.options import ExpertCacheOptions

    layers, experts = 2, 4
    gen = torch.Generator().manual_seed(0)
    return ExpertCache(
        w13_layers=[torch.randn(experts, 8, 16, generator=gen) for _ in range(layers)],
        w2_layers=[torch.randn(experts, 16, 4, generator=gen) for _ in range(layers)],
        slot_table=torch.zeros((layers, experts), dtype=torch.int32),
        pages=6,
        options=ExpertCacheOptions(expert_pool="6", eviction="lru", prefetch=False, backing_store="memory"),
        checkpoint=None,
        isa="vec",
        tp_rank=tp_rank,
        tp_size=2,
        log_every=0,
        engine_id=engine_id,
    )


def _run_steps(cache, steps: int) -> None:
    for step in range(steps):
        for layer in range(cache.num_layers):
            cache.layer_slots(layer, torch.tensor([step % 4, 1]))


def test_one_cache_per_engine_writes_residency_under_tensor_parallelism(plan_dir):
    """Every tensor-parallel rank runs a cache that reads the plan; only the
    first writes residency, so the block's sequence number counts one
    rank's steps (two writers would each bump it with their own counter)."""
    writer = PlanWriter.create(8, "tp-engine")
    writer.publish({0, 1})
    first, second = _cache(0, "tp-engine"), _cache(1, "tp-engine")
    try:
        _run_steps(second, 5)
        assert second.next_plan == frozenset({0, 1})  # it reads the plan
        assert writer.residency() is None  # and writes nothing
        _run_steps(first, 3)
        _run_steps(second, 3)
        assert first.next_plan == frozenset({0, 1})
        seq, resident, _ = writer.residency_block.read(writer.buf, 8)
        assert seq == 2 and resident == first.resident_experts()  # one write per step of rank 0 but its last
    finally:
        first.close()
        second.close()
        writer.close()


def _engine_outputs(model, **overrides) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with vllm_engine(model, max_num_seqs=4, **overrides) as llm:
        return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


EXPERT_AWARE = dict(
    scheduler_cls="vllm_readme.scheduler.ExpertAwareScheduler",
    additional_config={"vllm_readme": {"route_source": "model", "expert_pool": "50%", "log_every": 0}},
)


def test_engine_without_a_usable_plan_folder_serves_vllms_tokens(tiny_gqa, tmp_path, monkeypatch):
    """The plan folder cannot hold files (a regular file stands where the
    folder should be): the expert-aware scheduler with the model's routes and
    a half-size pool schedules as vLLM does and the cache runs without a
    plan; greedy tokens are vLLM's scheduler's; one log line; no file."""
    reference = _engine_outputs(tiny_gqa)
    not_a_folder = tmp_path / "plan-folder"
    not_a_folder.write_text("")
    monkeypatch.setenv("VLLM_README_PLAN_DIR", str(not_a_folder))
    with plan_log() as records:
        outputs = _engine_outputs(tiny_gqa, **EXPERT_AWARE)
    assert outputs == reference
    (line,) = warnings_of(records)
    assert str(not_a_folder) in line and "schedules as vLLM does" in line
    assert not_a_folder.read_text() == ""


def test_engine_names_its_file_after_itself_and_removes_it(tiny_gqa, plan_dir):
    """The scheduler and the workers find one file by the engine's id, the
    model's routes and the cache's residency arrive through it, and its name
    is gone once they have it open, and after the engine shuts down."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with plan_log() as records, vllm_engine(tiny_gqa, max_num_seqs=4, **EXPERT_AWARE) as llm:
        llm.generate(PROMPTS, params, use_tqdm=False)
        engine_id = llm.llm_engine.vllm_config.instance_id
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        assert scheduler._readme_plan.path == plan_path(engine_id)
        assert not list(plan_dir.iterdir())  # the cache and the route publisher have it open
        assert scheduler.readme_last_residency is not None  # the cache's residency arrived
        assert scheduler.readme_routes.book.predicted > 0  # the model's routes arrived
        llm.llm_engine.engine_core.shutdown()  # what collecting the engine does
        assert not list(plan_dir.iterdir())
    assert not warnings_of(records)


SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], **json.loads(sys.argv[2]))
    outs = llm.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
"""
# Root that file permissions stop like any other user: what an engine of an
# ordinary user meets in a /dev/shm shared with other users.
WITHOUT_ROOTS_FILE_PRIVILEGES = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def _serve_in_processes(model, plan_folder: Path, **overrides) -> tuple[list[list[int]], str]:
    """The engine as ``vllm serve`` runs it (engine core and workers in their
    own processes), as a user without root's file privileges; (greedy tokens,
    log)."""
    import json
    import subprocess
    import sys

    from conftest import engine_kwargs

    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
        VLLM_CPU_OMP_THREADS_BIND="0|1",
        VLLM_LOGGING_LEVEL="INFO",
        VLLM_README_PLAN_DIR=str(plan_folder),
    )
    options = dict(
        EXPERT_AWARE, additional_config={"vllm_readme": {"route_source": "model", "expert_pool": "50%", "log_every": 5}}
    )
    kwargs = engine_kwargs(max_num_seqs=4, **options, **overrides)
    proc = subprocess.run(
        [
            *WITHOUT_ROOTS_FILE_PRIVILEGES,
            sys.executable,
            "-c",
            SCRIPT,
            str(model),
            json.dumps(kwargs),
            json.dumps(PROMPTS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    log = proc.stdout + proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, log[-4000:]
    return json.loads(results[0][len("RESULT ") :]), log


def _owned_by_another_user(path: Path, mode: int) -> None:
    os.chown(path, OTHER_USER, OTHER_USER)
    path.chmod(mode)


@pytest.mark.slow
def test_stale_file_of_another_user_does_not_stop_a_tensor_parallel_engine(tiny_gqa, plan_dir):
    """An ordinary user's TP=2 engine (engine core and two workers in their
    own processes) next to another user's stale plan file in the shared
    folder: the file is left alone, the scheduler and both workers find this
    engine's file by its id (the cache reads the scheduler's plan, the model
    hands its routes over), greedy tokens are vLLM's scheduler's, and the
    engine's file is gone when it exits."""
    reference = _engine_outputs(tiny_gqa)
    stale = plan_dir / "vllm_readme_plan_1765000000000000000"
    stale.write_bytes(b"\1" * 4096)
    _owned_by_another_user(stale, 0o600)
    outputs, log = _serve_in_processes(tiny_gqa, plan_dir, tensor_parallel_size=2)
    assert outputs == reference
    assert "cannot create the plan file" not in log
    assert "next-step plan: the scheduler's (#" in log  # a worker's cache read the engine core's plan
    assert "handing the model's routes to the expert-aware scheduler" in log
    assert stale.read_bytes() == b"\1" * 4096
    assert list(plan_dir.iterdir()) == [stale]


@pytest.mark.slow
def test_plan_folder_of_another_user_degrades_with_one_line(tiny_gqa, plan_dir):
    """The plan folder belongs to another user and this one may not write
    there: start-up goes on without a plan, one log line says why, greedy
    tokens are vLLM's scheduler's, nothing is left behind."""
    reference = _engine_outputs(tiny_gqa)
    _owned_by_another_user(plan_dir, 0o755)
    outputs, log = _serve_in_processes(tiny_gqa, plan_dir)
    assert outputs == reference
    lines = [line for line in log.splitlines() if "cannot create the plan file" in line]
    assert len(lines) == 1 and "Permission denied" in lines[0] and str(plan_dir) in lines[0], lines
    assert not list(plan_dir.iterdir())


NO_SPACE_SCRIPT = r"""
import sys
from vllm_readme.experts.plan import PlanReader, PlanWriter
writer = PlanWriter.create(8, "engine")
reader = PlanReader(8, "engine")
print("RESULT", writer is None, reader.read(), reader.publish_routes(b"\0" * 8, b"\0" * 4, b"\1"), flush=True)
"""


def test_a_full_plan_folder_degrades_with_one_line(tmp_path):
    """A tmpfs with no room for the file (a private 64 KiB mount): the
    writer fails at start-up with one log line instead of the process dying
    of SIGBUS at a later write into pages the tmpfs cannot give."""
    import subprocess
    import sys

    folder = tmp_path / "full"
    folder.mkdir()
    command = f"mount -t tmpfs -o size=64k tmpfs {folder} && exec {sys.executable} -c '{NO_SPACE_SCRIPT}'"
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", command],
        capture_output=True,
        text=True,
        env=dict(os.environ, VLLM_README_PLAN_DIR=str(folder)),
        timeout=120,
    )
    if "mount" in proc.stderr and "RESULT" not in proc.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RESULT True None False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "cannot create the plan file" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-2000:]


def test_a_draft_left_by_a_writer_killed_mid_creation_is_removed_once_old(plan_dir):
    """A writer killed between making its draft and publishing it leaves a
    dot-file no engine's name points to; a later writer removes it once it
    is too old to belong to a writer still starting, and keeps a young one."""
    old, young = plan_dir / ".vllm_readme_plan_gone.0", plan_dir / ".vllm_readme_plan_starting.1"
    for path in (old, young):
        path.write_bytes(b"\0" * 64)
    os.utime(old, (time.time() - 600, time.time() - 600))
    writer = PlanWriter.create(8, "engine-after-a-crash")
    try:
        assert writer is not None
        assert not old.exists(), "a killed writer's draft was left behind"
        assert young.exists(), "a draft young enough to be a starting writer's was removed"
    finally:
        writer.close()
