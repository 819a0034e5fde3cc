"""The runner pool: warm reuse, cold starts, eviction, idle teardown, min_warm, threads."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.workers.conftest import fault_argv, gone, runner_processes
from workers.engines.base import GenerateRequest, SamplingParams
from workers.pool import PoolExhausted, RunnerPool
from workers.runner.process import RunnerFatal, RunnerSetupFailed, RunnerState
from workers.runner.protocol import Token

MakePool = Callable[..., RunnerPool]
A, B, C = "a" * 64, "b" * 64, "c" * 64


def greedy(prompt: str, n: int = 8) -> GenerateRequest:
    return GenerateRequest(prompt, raw=True, params=SamplingParams(max_tokens=n, temperature=0.0))


def complete(pool: RunnerPool, key: str, bundle: Path, fmt: str, prompt: str) -> str:
    tokens: list[Token] = []
    with pool.acquire(key, bundle, fmt) as (runner, _, _):
        done = runner.generate(greedy(prompt), f"{key[:4]}-{prompt}", tokens.append)
    assert not done.error, done.detail
    return "".join(t.text for t in tokens)


def test_warm_runner_is_reused(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool()
    with pool.acquire(A, gguf_dir, "gguf") as (first, cold, cold_ms):
        assert cold and cold_ms > 0 and pool.stats().busy == 1
    with pool.acquire(A, gguf_dir, "gguf") as (second, cold, cold_ms):
        assert not cold and cold_ms == 0 and second is first
    stats = pool.stats()
    assert stats.cold_starts == 1 and stats.hits == 1 and stats.warm_models == [A]
    assert stats.runners == 1 and stats.busy == 0


def test_dead_runner_is_dropped_and_next_acquire_cold_starts(
    make_pool: MakePool, gguf_dir: Path
) -> None:
    pool = make_pool(runner_argv=fault_argv("exit_in_generate"))
    with pool.acquire(A, gguf_dir, "gguf") as (runner, _, _):
        dead_pid = runner.pid
        with pytest.raises(RunnerFatal):
            runner.generate(greedy("hi", 20), "t", lambda t: None)
    assert pool.stats().runners == 0 and gone(dead_pid or 0)
    with pool.acquire(A, gguf_dir, "gguf") as (fresh, cold, _):
        assert cold and fresh.pid != dead_pid and fresh.state is RunnerState.READY


def test_runner_killed_while_idle_is_never_handed_out(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool()
    with pool.acquire(A, gguf_dir, "gguf") as (runner, _, _):
        pid = runner.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while not gone(pid):
        time.sleep(0.01)
    with pool.acquire(A, gguf_dir, "gguf") as (fresh, cold, _):
        assert cold and fresh.pid != pid
        done = fresh.generate(greedy("hi", 2), "t", lambda t: None)
        assert not done.error


def test_setup_failure_frees_the_slot(make_pool: MakePool, gguf_truncated: Path) -> None:
    pool = make_pool(max_runners=1)
    for _ in range(2):
        with pytest.raises(RunnerSetupFailed), pool.acquire(A, gguf_truncated, "gguf"):
            pass
    assert pool.stats().runners == 0


def test_idle_runner_torn_down_after_ttl(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(idle_ttl_s=1.0, reap_interval_s=0.2)
    with pool.acquire(A, gguf_dir, "gguf") as (runner, _, _):
        pid, tmp = runner.pid, runner.tmpdir
    assert pool.reap_idle() == 0  # not idle long enough yet
    pool.start_reaper()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        pool.stats().reaped and gone(pid or 0) and tmp is not None and not tmp.exists()
    ):
        time.sleep(0.1)
    assert pool.stats().runners == 0 and pool.stats().reaped == 1
    assert gone(pid or 0) and not runner_processes()
    assert tmp is not None and not tmp.exists()


def test_min_warm_keeps_one_runner_loaded(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(idle_ttl_s=0.2, min_warm={A: 1})
    with pool.acquire(A, gguf_dir, "gguf"), pool.acquire(A, gguf_dir, "gguf"):
        pass  # two runners for A
    time.sleep(0.3)
    assert pool.reap_idle() == 1
    assert pool.stats().runners == 1 and pool.stats().warm_models == [A]


def test_min_warm_refills_a_model_seen_before(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(idle_ttl_s=0.1)
    with pool.acquire(B, gguf_dir, "gguf"):
        pass
    time.sleep(0.2)
    assert pool.reap_idle() == 1 and pool.stats().runners == 0
    pool.set_min_warm(B, 1)
    assert pool.fill_min_warm() == 1
    with pool.acquire(B, gguf_dir, "gguf") as (_, cold, _):
        assert not cold


def test_lru_idle_runner_evicted_at_max_runners(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(max_runners=2)
    pids = {}
    for key in (A, B, A, C):  # A used after B: B is the least recently used
        with pool.acquire(key, gguf_dir, "gguf") as (runner, _, _):
            pids.setdefault(key, runner.pid)
    stats = pool.stats()
    assert stats.warm_models == sorted([A, C]) and stats.evictions == 1
    assert gone(pids[B]) and not gone(pids[A])


def test_busy_runner_never_evicted_and_acquire_waits(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(max_runners=1)
    held = threading.Event()
    release = threading.Event()

    def hold_a() -> None:
        with pool.acquire(A, gguf_dir, "gguf"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_a)
    holder.start()
    assert held.wait(30)
    with pytest.raises(PoolExhausted), pool.acquire(B, gguf_dir, "gguf", timeout=0.3):
        pass
    threading.Timer(0.3, release.set).start()
    with pool.acquire(B, gguf_dir, "gguf", timeout=30) as (runner, cold, _):
        assert cold and runner.state is RunnerState.READY
    holder.join()
    assert pool.stats().warm_models == [B]


def test_memory_budget_evicts_to_fit(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(memory_budget_bytes=1)  # any runner fills it: one at a time
    with pool.acquire(A, gguf_dir, "gguf") as (a, _, _):
        assert a.rss_bytes() > 1
    with pool.acquire(B, gguf_dir, "gguf"):
        pass
    assert pool.stats().warm_models == [B] and pool.stats().evictions == 1


def test_concurrent_requests_on_two_models_are_not_crossed(
    make_pool: MakePool, gguf_dir: Path, transformers_bundle_seed1: Path
) -> None:
    pool = make_pool(max_runners=4)
    models = {A: (gguf_dir, "gguf"), B: (transformers_bundle_seed1, "transformers")}
    prompts = ["The quick brown fox", "Hello, world", "Once upon a time", "What is the"]
    expected = {(k, p): complete(pool, k, *models[k], p) for k in models for p in prompts}
    assert len(set(expected.values())) > len(prompts)  # the two models differ
    jobs = [(k, p) for k in models for p in prompts] * 4  # 32 requests
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda job: complete(pool, job[0], *models[job[0]], job[1]), jobs))
    assert got == [expected[j] for j in jobs]
    assert pool.stats().runners <= 4


def _name(pid: int) -> str:
    import psutil  # type: ignore[import-untyped]

    return str(psutil.Process(pid).name())


def test_cold_start_loads_into_a_spare_and_a_new_spare_follows(
    make_pool: MakePool, gguf_dir: Path
) -> None:
    pool = make_pool(spares=1)
    assert pool.refill_spares() == 1 and pool.spare_count() == 1
    (spare_pid,) = [p.pid for p in runner_processes()]
    deadline = time.monotonic() + 30  # the name is set once it found no Setup waiting
    while _name(spare_pid) != "ift-spare" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _name(spare_pid) == "ift-spare"
    with pool.acquire(A, gguf_dir, "gguf") as (runner, cold, _):
        assert cold and runner.pid == spare_pid and _name(spare_pid) == "ift-runner"
    # Same text as a runner spawned for the request: the spare is an ordinary runner.
    other = make_pool()
    assert complete(pool, A, gguf_dir, "gguf", "Once") == complete(
        other, A, gguf_dir, "gguf", "Once"
    )
    other.close()
    deadline = time.monotonic() + 30
    while pool.spare_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.spare_count() == 1 and pool.stats().runners == 1  # spares are not runners
    pool.close()
    assert not runner_processes()


def test_a_spare_serves_only_gguf_so_torch_never_meets_llama_cpp(
    make_pool: MakePool, transformers_bundle: Path
) -> None:
    """A spare has imported llama.cpp; a transformers model gets a runner of its own."""
    pool = make_pool(spares=1)
    assert pool.refill_spares() == 1
    (spare_pid,) = [p.pid for p in runner_processes()]
    with pool.acquire(A, transformers_bundle, "transformers") as (runner, cold, _):
        assert cold and runner.pid != spare_pid
        maps = Path(f"/proc/{runner.pid}/maps").read_text()
        assert "libtorch" in maps and "libllama" not in maps
    assert pool.spare_count() == 1 and spare_pid in [p.pid for p in runner_processes()]


def test_a_dead_spare_is_skipped(make_pool: MakePool, gguf_dir: Path) -> None:
    pool = make_pool(spares=1)
    pool.refill_spares()
    (spare_pid,) = [p.pid for p in runner_processes()]
    os.kill(spare_pid, signal.SIGKILL)
    while not gone(spare_pid):
        time.sleep(0.05)
    with pool.acquire(A, gguf_dir, "gguf") as (runner, cold, _):
        assert cold and runner.pid != spare_pid and runner.state is RunnerState.READY
