"""The pool's GPU memory budget, read through nvidia-smi.

CI has no GPU, so `nvidia-smi` here is a script on PATH: the one part that cannot run here.
It answers like the real one, with every live runner process holding 300 MiB of a 1,000 MiB
GPU, so evictions free memory as they would. Real runners, real models; `tests/gpu` checks
the same on a CUDA host.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from core.queue import HEARTBEAT_PREFIX
from tests.utils.stack import StackInfo
from tests.workers.conftest import runner_processes
from workers import pool as pool_module
from workers.gpu import MIB, GpuMemory, parse_memory, read_gpu_memory
from workers.heartbeat import Heartbeat
from workers.pool import PoolExhausted, RunnerPool
from workers.runner.process import Runner

MakePool = Callable[..., RunnerPool]
A, B, C, D = "a" * 64, "b" * 64, "c" * 64, "d" * 64

FAKE_SMI = """#!/bin/sh
echo "$@" >> "{log}"
[ "$1" = "-L" ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)" && exit 0
[ -f "{fail}" ] && exit 1
if [ -f "{slow}" ]; then  # held until the test lets it go (30 s at most)
  i=0; while [ ! -f "{release}" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
fi
runners=0
for d in /proc/[0-9]*; do  # this test's own runner children only
  [ "$(cut -d' ' -f4 "$d/stat" 2>/dev/null)" = "{pid}" ] || continue
  grep -q workers.runner.child "$d/cmdline" 2>/dev/null && runners=$((runners + 1))
done
echo "1000, $((runners * 300))"
"""


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-GPU nvidia-smi on PATH; returns the log of the arguments it was called with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "smi.log"
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        FAKE_SMI.format(
            log=log,
            fail=tmp_path / "fail",
            slow=tmp_path / "slow",
            release=tmp_path / "release",
            pid=os.getpid(),
        )
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    log.touch()
    return log


def gpu_pool(make_pool: MakePool, **kw: object) -> RunnerPool:
    # Budget 900 MiB; a cold start needs its weights plus 400 MiB: two runners fit, not three.
    # A lease holds a whole runner (no batching) unless a test asks for `gpu_batch`.
    options: dict[str, object] = {"gpu_batch": 1, **kw}
    return make_pool(gpu_memory_fraction=0.9, gpu_overhead_bytes=400 * MIB, **options)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("81559, 1024\n", GpuMemory(81559 * MIB, 1024 * MIB)),
        ("81559, 1024\n81559, 0\n\n", GpuMemory(2 * 81559 * MIB, 1024 * MIB)),
        ("", None),
        ("[N/A], [N/A]\n", None),
        ("81559\n", None),
        ("81559, 1, 2\n", None),
        ("81559, -5\n", None),
        ("100, 200\n", None),  # more used than there is
        ("0, 0\n", None),
        ("81559, 1024\ngarbage\n", None),  # one bad GPU line: no budget rather than a wrong one
        (
            "\uff11\uff12, 3\n",
            None,
        ),  # fullwidth digits: int() takes them, nvidia-smi never prints them
    ],
)
def test_parse_memory(text: str, expected: GpuMemory | None) -> None:
    assert parse_memory(text) == expected


def test_read_gpu_memory_asks_only_for_the_visible_gpus(
    fake_gpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_gpu_memory() == GpuMemory(1000 * MIB, 0)
    assert "-i" not in fake_gpu.read_text()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert read_gpu_memory() is not None
    assert fake_gpu.read_text().splitlines()[-1].endswith("-i 1,3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: nothing to ask
    calls = len(fake_gpu.read_text().splitlines())
    assert read_gpu_memory() is None
    assert len(fake_gpu.read_text().splitlines()) == calls


def test_read_gpu_memory_without_a_working_nvidia_smi_is_none(
    fake_gpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_gpu.parent / "fail").touch()
    assert read_gpu_memory() is None  # exits 1
    monkeypatch.setenv("PATH", "/nonexistent")
    assert read_gpu_memory() is None  # not installed


def test_cold_start_evicts_the_lru_idle_runner_when_the_gpu_is_full(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    pool = gpu_pool(make_pool)
    for key in (A, B):  # 0 → 300 → 600 MiB used: each fits
        with pool.acquire(key, gguf_dir, "gguf") as (_, cold, _):
            assert cold
    assert pool.stats().runners == 2 and pool.stats().evictions == 0
    pids = {p.pid for p in runner_processes()}
    with pool.acquire(C, gguf_dir, "gguf") as (runner, cold, _):  # 600 + 400 > 900: A goes
        assert cold and runner.pid not in pids
    stats = pool.stats()
    assert stats.evictions == 1 and stats.runners == 2
    assert sorted(stats.warm_models) == sorted([B, C])
    assert len(runner_processes()) == 2  # A's process is gone, not only forgotten
    assert fake_gpu.read_text().count("--query-gpu") >= 2  # it was asked at each cold start


def test_a_slow_nvidia_smi_never_holds_up_a_warm_request(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU is read outside the pool's lock: a cold start waiting on nvidia-smi (held
    until the test releases it) does not stall another model's warm request."""
    pool = gpu_pool(make_pool)
    with pool.acquire(A, gguf_dir, "gguf"):
        pass
    answered: list[GpuMemory | None] = []  # reads of the GPU that returned

    def read_and_note() -> GpuMemory | None:
        memory = read_gpu_memory()
        answered.append(memory)
        return memory

    monkeypatch.setattr(pool_module, "read_gpu_memory", read_and_note)
    (fake_gpu.parent / "slow").touch()
    queries = fake_gpu.read_text().count("--query-gpu")

    def cold_start_b() -> None:
        with pool.acquire(B, gguf_dir, "gguf"):
            pass

    cold = threading.Thread(target=cold_start_b)
    cold.start()
    deadline = time.monotonic() + 10
    while fake_gpu.read_text().count("--query-gpu") == queries:  # B's is in nvidia-smi
        assert time.monotonic() < deadline, "B's cold start never read the GPU"
        time.sleep(0.01)
    warm: list[tuple[bool, int]] = []  # (cold, GPU reads answered) as A was served

    def warm_a() -> None:
        with pool.acquire(A, gguf_dir, "gguf", timeout=30) as lease:
            warm.append((lease.cold, len(answered)))

    served = threading.Thread(target=warm_a)
    served.start()
    served.join(20)
    (fake_gpu.parent / "release").touch()
    served.join(30)
    cold.join(30)
    assert warm == [(False, 0)], "the warm request waited for B's nvidia-smi"
    assert len(answered) == 1 and pool.stats().runners == 2


def test_busy_runners_are_never_evicted_for_gpu_memory(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    pool = gpu_pool(make_pool)
    with pool.acquire(A, gguf_dir, "gguf"), pool.acquire(B, gguf_dir, "gguf"):
        began = time.monotonic()
        with pytest.raises(PoolExhausted), pool.acquire(C, gguf_dir, "gguf", timeout=1.0):
            pass
        assert time.monotonic() - began >= 0.9
        assert pool.stats().evictions == 0 and pool.stats().runners == 2
        got: list[bool] = []

        def wait_for_c() -> None:
            with pool.acquire(C, gguf_dir, "gguf", timeout=30) as lease:
                got.append(lease.cold)

        waiter = threading.Thread(target=wait_for_c)
        waiter.start()
        time.sleep(0.5)  # C waits: both runners are still busy
        assert not got
    waiter.join(30)  # both released: C evicts the least recently used one and starts
    assert got == [True] and pool.stats().evictions == 1


def _acquire_in_thread(
    pool: RunnerPool, key: str, bundle: Path, got: list[tuple[bool, int]], timeout: float = 30
) -> threading.Thread:
    def run() -> None:
        with pool.acquire(key, bundle, "gguf", timeout=timeout) as (runner, cold, _):
            got.append((cold, runner.pid or 0))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_gpu_host_runs_one_runner_per_model_and_queues_the_rest(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    """Runners of one model time-slice one GPU (measured on an H100: four served a quarter
    of what one did): a second request waits for the model's runner, another model starts."""
    pool = gpu_pool(make_pool)
    got: list[tuple[bool, int]] = []
    with pool.acquire(A, gguf_dir, "gguf") as (first, cold, _):
        assert cold
        waiter = _acquire_in_thread(pool, A, gguf_dir, got)
        time.sleep(0.5)
        assert got == [] and pool.stats().runners == 1  # waiting, not starting a second
        with pool.acquire(B, gguf_dir, "gguf") as (_, b_cold, _):
            assert b_cold  # another model is not held back
        with (
            pytest.raises(PoolExhausted, match="stayed busy"),
            pool.acquire(A, gguf_dir, "gguf", timeout=0.3),
        ):
            pass
    waiter.join(30)
    assert got == [(False, first.pid)]  # the same runner, warm
    assert pool.stats().runners == 2 and pool.stats().cold_starts == 2


def test_the_per_model_cap_holds_without_a_gpu_memory_budget(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    """`gpu_memory_fraction=0` turns the memory budget off, not the one-runner rule: the
    pool asks nvidia-smi once, at its first cold start, whether its runners share a GPU."""
    pool = make_pool(gpu_memory_fraction=0.0, gpu_batch=1)
    got: list[tuple[bool, int]] = []
    with pool.acquire(A, gguf_dir, "gguf") as (first, _, _):
        waiter = _acquire_in_thread(pool, A, gguf_dir, got)
        time.sleep(0.5)
        assert got == [] and pool.stats().runners == 1
    waiter.join(30)
    assert got == [(False, first.pid)]
    with pool.acquire(B, gguf_dir, "gguf"):
        pass
    assert fake_gpu.read_text().count("--query-gpu") == 1  # asked once, not per cold start


def test_a_gpu_hosts_runner_takes_its_models_requests_into_one_batch(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    """The model's one runner decodes its requests together: a second request joins it at
    once, warm; one more than the batch holds waits for room in it."""
    pool = gpu_pool(make_pool, gpu_batch=2)
    got: list[tuple[bool, int]] = []
    with pool.acquire(A, gguf_dir, "gguf") as (first, cold, _):
        assert cold and first.capacity == 2
        with pool.acquire(A, gguf_dir, "gguf", timeout=5) as (second, second_cold, _):
            assert second is first and not second_cold
            waiter = _acquire_in_thread(pool, A, gguf_dir, got)
            time.sleep(0.5)
            assert got == [] and pool.stats().runners == 1 and pool.stats().busy == 1
    waiter.join(30)
    assert got == [(False, first.pid)]
    assert pool.stats().cold_starts == 1 and pool.stats().busy == 0


def test_batching_is_off_by_default_on_gpu_and_cpu_hosts() -> None:
    from core.settings import Settings
    from workers.pool import PoolConfig

    assert (PoolConfig().gpu_batch, PoolConfig().batch) == (1, 1)
    settings = Settings()
    assert (settings.runner_gpu_batch, settings.runner_batch) == (1, 1)


def test_gpu_runners_per_model_lets_a_model_have_more(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    pool = gpu_pool(make_pool, gpu_runners_per_model=2)
    got: list[tuple[bool, int]] = []
    with pool.acquire(A, gguf_dir, "gguf") as (first, _, _):
        _acquire_in_thread(pool, A, gguf_dir, got).join(30)
    assert len(got) == 1 and got[0][0] and got[0][1] != first.pid  # a second runner, cold
    assert pool.stats().runners == 2


def test_a_host_without_a_gpu_starts_a_second_runner_for_a_busy_model(
    make_pool: MakePool, gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPUs, runners of one model run side by side on their own cores, as many as the
    cores hold (two here, whatever this host's core count)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi
    pool = gpu_pool(make_pool, cpu_runners_per_model=2)
    got: list[tuple[bool, int]] = []
    with pool.acquire(A, gguf_dir, "gguf") as (first, _, _):
        _acquire_in_thread(pool, A, gguf_dir, got).join(30)
    assert len(got) == 1 and got[0][0] and got[0][1] != first.pid


def test_a_cpu_host_caps_a_models_runners_at_what_its_cores_hold(
    make_pool: MakePool, gguf_dir: Path
) -> None:
    """A third runner of one model on two cores' worth would only time-slice them: the
    request waits for one of the model's runners; another model still starts its own."""
    pool = make_pool(device="cpu", cpu_runners_per_model=2, max_runners=4)
    got: list[tuple[bool, int]] = []
    with (
        pool.acquire(A, gguf_dir, "gguf") as (a1, _, _),
        pool.acquire(A, gguf_dir, "gguf") as (a2, _, _),
    ):
        assert a1.pid != a2.pid
        waiter = _acquire_in_thread(pool, A, gguf_dir, got)
        time.sleep(0.5)
        assert got == [] and pool.stats().runners == 2  # waiting, not starting a third
        with pool.acquire(B, gguf_dir, "gguf") as (_, b_cold, _):
            assert b_cold
    waiter.join(30)
    assert len(got) == 1 and got[0][0] is False and got[0][1] in (a1.pid, a2.pid)
    assert pool.stats().cold_starts == 3


def test_a_cpu_pools_cap_is_its_cores_over_the_runners_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("workers.pool.usable_cpus", lambda: 16)
    assert RunnerPool(threads=4).cpu_runners_per_model == 4
    assert RunnerPool(threads=32).cpu_runners_per_model == 1  # at least one
    assert RunnerPool(threads=4, cpu_runners_per_model=8).cpu_runners_per_model == 8


def test_a_host_whose_nvidia_smi_fails_is_asked_once_not_at_every_wait(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    """No GPU answered at the first acquire: the runners are on CPUs, and neither cold
    starts nor requests waiting for a busy model ask nvidia-smi again."""
    (fake_gpu.parent / "fail").touch()
    pool = gpu_pool(make_pool, cpu_runners_per_model=1)
    got: list[tuple[bool, int]] = []
    with pool.acquire(A, gguf_dir, "gguf"):
        waiters = [_acquire_in_thread(pool, A, gguf_dir, got) for _ in range(3)]
        time.sleep(0.3)
        with pool.acquire(B, gguf_dir, "gguf"), pool.acquire(C, gguf_dir, "gguf"):
            pass
    for waiter in waiters:
        waiter.join(30)
    assert [cold for cold, _ in got] == [False] * 3
    pool.fill_min_warm()
    assert fake_gpu.read_text().count("--query-gpu") == 1


def test_cpu_pool_ignores_the_gpu_and_its_runners_see_none(
    make_pool: MakePool, fake_gpu: Path, gguf_dir: Path
) -> None:
    pool = gpu_pool(make_pool, device="cpu")
    for key in (A, B, C):
        with pool.acquire(key, gguf_dir, "gguf") as (runner, cold, _):
            assert cold
            environ = Path(f"/proc/{runner.pid}/environ").read_bytes().split(b"\0")
            assert b"CUDA_VISIBLE_DEVICES=" in environ  # set, and empty
    assert pool.stats().runners == 3 and pool.stats().evictions == 0
    assert fake_gpu.read_text() == ""  # a CPU pool never asks


def test_auto_runner_keeps_the_workers_gpu_choice(
    gguf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    runner = Runner(gguf_dir, "gguf")
    try:
        runner.start()
        environ = Path(f"/proc/{runner.pid}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=2" in environ
    finally:
        runner.stop()


def test_heartbeat_carries_the_gpus_and_their_memory(
    fake_gpu: Path, stack: StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(stack.settings.effective_redis_url)
    pool = RunnerPool()

    def beat_of(name: str) -> dict[str, Any]:
        beat = Heartbeat(name, pool, client)
        beat.start()
        try:
            deadline = time.monotonic() + 10
            while (raw := client.get(HEARTBEAT_PREFIX + name)) is None:
                assert time.monotonic() < deadline, "no heartbeat"
                time.sleep(0.05)
            published: dict[str, Any] = json.loads(raw)
            return published
        finally:
            beat.stop()

    try:
        gpu_host = beat_of("gpu-beat@test")
        assert gpu_host["hardware"]["gpus"] == ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)"]
        assert gpu_host["gpu_memory"] == {"total_bytes": 1000 * MIB, "used_bytes": 0}
        monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a host without nvidia-smi
        cpu_host = beat_of("cpu-beat@test")
        assert cpu_host["hardware"]["gpus"] == [] and cpu_host["gpu_memory"] is None
    finally:
        pool.close()
