# SPDX-License-Identifier: Apache-2.0
"""Faults around the expert cache's files, injected for real: a disk that
fills while the page file is written, a start killed mid-write, two writers
in one folder, reads that fail or files that change under a running engine,
a model given as a hub id. Each ends with the engine serving the model's
own greedy outputs, or refusing with a message, and no file left behind."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import PROMPTS, error_chain, greedy_outputs, vllm_engine

MAX_TOKENS = 24
CHILD_TIMEOUT_S = 240


def generate(model, **overrides) -> tuple[list[list[int]], dict | None]:
    return greedy_outputs(model, _cache_facts, MAX_TOKENS, **overrides)


def _cache_facts(model):
    cache = getattr(model.model, "expert_cache", None)
    if cache is None:
        return None
    cache.pool.check()
    return {
        "store": cache.store.kind,
        "folder": str(getattr(cache.store, "folder", "")),
        "loads": cache.total.misses + cache.total.prefetched,
        "fallback_loads": cache.fallback_loads,
    }


def pool_config(**options) -> dict:
    return {"additional_config": {"vllm_readme": {"expert_pool": "50%", "log_every": 0, **options}}}


@pytest.fixture(scope="module")
def resident_outputs(tiny_gqa):
    outputs, stats = generate(tiny_gqa)
    assert stats is None
    return outputs


def page_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# An engine in a child process: the faults below act on a whole process
# (a file-size limit, SIGKILL) or on module-level state (the hub's offline
# switch is read when huggingface_hub is imported).
_ENGINE_CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    model, kwargs, fsize_limit = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    if os.environ.get("KEEP_HUB_ID"):
        # vLLM swaps a hub id for its cached snapshot's path when the hub is
        # offline; online it keeps the id, which is the case to serve here
        # (with every hub call answered from the local cache).
        import vllm.engine.arg_utils
        vllm.engine.arg_utils.get_model_path = lambda model, revision: model
    if fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.RLIM_INFINITY))
    from vllm import LLM, SamplingParams
    try:
        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512,
                  kv_cache_memory_bytes=32 << 20, max_num_seqs=4, seed=0, **kwargs)
    except Exception as exc:
        chain = []
        while exc is not None:
            chain.append(f"{type(exc).__name__}: {exc}")
            exc = exc.__cause__ or exc.__context__
        print("START FAILED: " + " | ".join(chain), flush=True)
        sys.exit(3)
    params = SamplingParams(temperature=0, max_tokens=int(sys.argv[5]), ignore_eos=True)
    outputs = llm.generate(json.loads(sys.argv[4]), params, use_tqdm=False)
    print("OUTPUTS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
    """
)


def run_engine_child(model: str, kwargs: dict, fsize_limit: int = 0, env: dict | None = None):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _ENGINE_CHILD,
            model,
            json.dumps(kwargs),
            str(fsize_limit),
            json.dumps(PROMPTS),
            str(MAX_TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )
    outputs = next((json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("OUTPUTS ")), None)
    return proc, outputs


# A page-file writer in a child that stops after two pages until told to go
# on: a start caught mid-write, to kill or to run beside another engine.
_PAUSED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from vllm_readme.experts.store import PageFileStore
    folder, paused, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def page(layer, expert):
        if (layer, expert) == (0, 2):
            paused.touch()
            while not go.exists():
                time.sleep(0.05)
        value = float(10 * layer + expert)
        return torch.full((2, 1024), value), torch.full((1024,), value)

    store = PageFileStore(page, num_layers=2, num_experts=4, folder=folder)
    for layer in range(2):
        for expert in range(4):
            w13, w2 = store.packed(layer, expert)
            assert bool((w13 == 10 * layer + expert).all() and (w2 == 10 * layer + expert).all()), (layer, expert)
    print("READ BACK", flush=True)
    """
)


def start_paused_writer(folder: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    paused, go = tmp_path / "writer-paused", tmp_path / "writer-go"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_WRITER, str(folder), str(paused), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not paused.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the writer never reached its pause"
        time.sleep(0.05)
    return proc, go


def test_the_page_file_goes_in_the_chosen_folder_and_leaves_nothing(tiny_gqa, resident_outputs, tmp_path):
    folder = tmp_path / "pages" / "not-yet-made"
    outputs, stats = generate(tiny_gqa, **pool_config(page_dir=str(folder)))
    assert outputs == resident_outputs
    assert stats["store"] == "disk" and stats["folder"] == str(folder) and stats["loads"] > 0
    assert page_files(folder) == []  # written, opened, unlinked: no name left while serving or after


def test_disk_full_while_writing_the_page_file_refuses_and_leaves_nothing(tiny_gqa, resident_outputs, tmp_path):
    """The tiny model's page file is 768 KiB; with files limited to 256 KiB
    the write fails part-way (EFBIG, as on a full disk)."""
    folder = tmp_path / "pages"
    proc, outputs = run_engine_child(str(tiny_gqa), pool_config(page_dir=str(folder)), fsize_limit=256 << 10)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "writing the page file (786432 bytes) in " + str(folder) in proc.stdout
    assert "page_dir" in proc.stdout and '"backing_store": "checkpoint"' in proc.stdout
    assert page_files(folder) == []
    # With room again, the same folder serves the model's outputs.
    outputs, stats = generate(tiny_gqa, **pool_config(page_dir=str(folder)))
    assert outputs == resident_outputs and page_files(folder) == []


def test_too_little_free_space_is_refused_before_writing(tiny_gqa, tmp_path):
    """A real 256 KiB file system (tmpfs, mounted where this user may)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        message = refusal(lambda: vllm_engine(tiny_gqa, **pool_config(page_dir=str(folder))).__enter__())
        gc.collect()
        assert f"the page file needs 786432 bytes (0.00 GiB) in {folder}, which has 262144 bytes free" in message
        assert "page_dir" in message
        assert page_files(folder) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_start_killed_while_writing_leaves_a_file_the_next_start_removes(tiny_gqa, resident_outputs, tmp_path):
    folder = tmp_path / "pages"
    writer, _ = start_paused_writer(folder, tmp_path)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    (leftover,) = page_files(folder)
    assert leftover.startswith(f"expert-pages-{writer.pid}-") and leftover.endswith(".partial")
    outputs, _ = generate(tiny_gqa, **pool_config(page_dir=str(folder)))
    assert outputs == resident_outputs
    assert page_files(folder) == []


def test_two_engines_in_one_folder_keep_each_others_page_files(tiny_gqa, resident_outputs, tmp_path):
    """An engine starts while another process is writing its page file in
    the same folder: it leaves that file alone, and both read their own."""
    folder = tmp_path / "pages"
    writer, go = start_paused_writer(folder, tmp_path)
    try:
        (theirs,) = page_files(folder)
        outputs, _ = generate(tiny_gqa, **pool_config(page_dir=str(folder)))
        assert outputs == resident_outputs
        assert page_files(folder) == [theirs]  # alive, so not a leftover
        go.touch()
        out, _ = writer.communicate(timeout=CHILD_TIMEOUT_S)
        assert writer.returncode == 0 and "READ BACK" in out, out
        assert page_files(folder) == []
    finally:
        writer.kill()


def test_page_file_read_errors_fall_back_to_the_checkpoint(tiny_gqa, resident_outputs):
    """Every read of the page file fails (its descriptor now reads an empty
    file: short reads), on the loader thread and on demand: each page is
    tried twice, then read from the checkpoint. Same outputs, engine alive."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with vllm_engine(tiny_gqa, max_num_seqs=4, **pool_config()) as llm:
        assert llm.apply_model(_break_page_file)[0]
        for _ in range(2):  # still serving after the first round of failures
            outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            assert outputs == resident_outputs
        stats = llm.apply_model(_cache_facts)[0]
    assert stats["fallback_loads"] > 0


def _break_page_file(model) -> bool:
    store = model.model.expert_cache.store
    fd = store.reader.checked_fd(store.path)
    empty = os.open("/dev/null", os.O_RDONLY)
    os.dup2(empty, fd)
    os.close(empty)
    store.reader.opened[store.path] = store.reader.opened[store.path].__class__.of(os.fstat(fd))
    return True


def refusal(call) -> str:
    """The messages of what ``call`` raises (the exception itself is not
    kept: its traceback holds the engine)."""
    try:
        call()
    except Exception as exc:
        return error_chain(exc)
    raise AssertionError("expected a refusal")


def _copy_model(model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


def test_checkpoint_shard_deleted_or_replaced_while_serving_still_gives_its_weights(
    tiny_gqa, resident_outputs, tmp_path
):
    """backing_store "checkpoint": the shards are open from start-up, so a
    shard deleted, then another file renamed over its path, changes nothing
    the engine reads."""
    from vllm import SamplingParams

    model = _copy_model(tiny_gqa, tmp_path)
    (shard,) = model.glob("*.safetensors")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with vllm_engine(model, max_num_seqs=4, **pool_config(backing_store="checkpoint")) as llm:
        original = shard.read_bytes()
        shard.unlink()
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert outputs == resident_outputs
        other = tmp_path / "other.safetensors"
        other.write_bytes(original[: len(original) // 2] + bytes(len(original) - len(original) // 2))
        os.replace(other, shard)
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert outputs == resident_outputs
        assert llm.apply_model(_cache_facts)[0]["loads"] > 0


def test_checkpoint_rewritten_in_place_is_refused_not_read(tiny_gqa, resident_outputs, tmp_path):
    """backing_store "checkpoint" with a shard rewritten in place (same
    file, other bytes): the engine refuses to read it, with a message,
    rather than computing with other weights."""
    from vllm import SamplingParams

    model = _copy_model(tiny_gqa, tmp_path)
    (shard,) = model.glob("*.safetensors")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with vllm_engine(model, max_num_seqs=4, **pool_config(backing_store="checkpoint")) as llm:
        size = shard.stat().st_size
        with open(shard, "r+b") as f:  # the same inode, the experts' bytes zeroed
            f.seek(size // 2)
            f.write(bytes(size - size // 2))
        message = refusal(lambda: llm.generate(PROMPTS, params, use_tqdm=False))
    gc.collect()  # the failed step's frames held the engine: collect it now, not while another one starts
    assert f"{shard} was rewritten in place" in message, message
    assert "cannot be read from the checkpoint backing store" in message


def _hub_cache(model: Path, root: Path, revision: str) -> None:
    """``model`` laid out as huggingface_hub caches ``org/tiny-readme`` at
    ``revision`` (blobs, a snapshot of links, refs/main)."""
    repo = root / "models--org--tiny-readme"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"{index:040x}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("where", ["hf-home", "download-dir"])
def test_a_hub_id_with_a_pool_serves_from_the_hub_cache(tiny_gqa, resident_outputs, tmp_path, where):
    """``org/name`` with a revision, found offline where vLLM found it: the
    HF cache, or --download-dir (vLLM reads the config from the HF cache,
    the weights from the download folder)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    hf_home = tmp_path / "hf"
    _hub_cache(tiny_gqa, hf_home / "hub", revision)
    kwargs = pool_config(page_dir=str(tmp_path / "pages"))
    kwargs["revision"] = revision
    if where == "download-dir":
        _hub_cache(tiny_gqa, tmp_path / "downloads", revision)
        kwargs["download_dir"] = str(tmp_path / "downloads")
        for link in (hf_home / "hub" / "models--org--tiny-readme" / "snapshots" / revision).glob("*.safetensors"):
            link.unlink()  # the weights only in the download folder
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1", "KEEP_HUB_ID": "1"}
    proc, outputs = run_engine_child("org/tiny-readme", kwargs, env=env)
    assert outputs == resident_outputs, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert page_files(tmp_path / "pages") == []


def test_another_engines_cleanup_at_the_moment_a_page_file_is_created_leaves_it_alone(tmp_path, monkeypatch):
    """Two engines starting in one folder: the second's clean-up of leftovers
    can run at any instant of the first's writing, including right after the
    file is created (injected here at exactly that instant). The file being
    written must survive and be read back whole."""
    import tempfile

    import torch

    from vllm_readme.experts import store as store_module

    created = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_another_engine_cleans(*args, **kwargs):
        made = real_mkstemp(*args, **kwargs)
        created.append(made[1])
        created.append(store_module.remove_leftover_page_files(tmp_path))
        return made

    monkeypatch.setattr(store_module.tempfile, "mkstemp", mkstemp_then_another_engine_cleans)
    w13 = [torch.arange(2 * 64 * 32, dtype=torch.float32).view(2, 64, 32) + layer for layer in range(2)]
    w2 = [torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 32, 32) - layer for layer in range(2)]
    store = store_module.PageFileStore.from_layers(w13, w2, folder=tmp_path)
    try:
        assert created and created[1] == [], f"the other engine's clean-up removed {created[1]}"
        for layer in range(2):
            for expert in range(2):
                got13, got2 = store.packed(layer, expert)
                assert torch.equal(got13, w13[layer][expert]) and torch.equal(got2, w2[layer][expert])
    finally:
        store.close()
    assert not list(tmp_path.iterdir()), f"files left behind: {list(tmp_path.iterdir())}"


def _fail_prefetches(model) -> bool:
    """Every prefetch on the loader thread raises (not an I/O error: any
    fault of the store or the packing); loads on demand still work."""
    import threading

    cache = model.model.expert_cache
    load = cache._load_from_store  # noqa: SLF001

    def failing_on_the_loader_thread(*args, **kwargs):
        if threading.current_thread().name.startswith("readme-prefetch"):
            cache.injected_prefetch_faults = getattr(cache, "injected_prefetch_faults", 0) + 1
            raise RuntimeError("injected fault on the loader thread")
        return load(*args, **kwargs)

    cache._load_from_store = failing_on_the_loader_thread  # noqa: SLF001
    return cache.executor is not None


def test_any_fault_on_the_loader_thread_is_loaded_on_demand_instead(tiny_gqa, resident_outputs):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with vllm_engine(tiny_gqa, max_num_seqs=4, **pool_config()) as llm:
        assert llm.apply_model(_fail_prefetches)[0], "the cache has no loader thread to fault"
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        faults = llm.apply_model(lambda model: getattr(model.model.expert_cache, "injected_prefetch_faults", 0))[0]
    assert faults > 0, "no prefetch ran, so nothing was injected"
    assert outputs == resident_outputs
