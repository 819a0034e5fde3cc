"""The GPU paths, through the real runner sandbox: run on a CUDA host with `make test-gpu`.

Not in the default run (CI has no GPU). On a host without CUDA these fail loudly, at the
first assertion that torch sees a device: they never skip.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.engines.base import GenerateRequest, SamplingParams
from workers.gpu import read_gpu_memory
from workers.pool import RunnerPool
from workers.runner.process import Runner, RunnerSetupFailed

pytestmark = pytest.mark.gpu

MakeRunner = Callable[..., Runner]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module", autouse=True)
def cuda() -> None:
    import torch

    assert torch.cuda.is_available(), "these tests need a CUDA device that torch can see"
    torch.cuda.init()  # this process's own context, so later readings exclude it


def _free_mib() -> float:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free / 2**20


def _text(runner: Runner, request: GenerateRequest) -> str:
    pieces: list[str] = []
    done = runner.generate(request, "t", lambda t: pieces.append(t.text))
    assert not done.error, done.detail
    return "".join(pieces)


def greedy(n: int = 16) -> GenerateRequest:
    return GenerateRequest(PROMPT, raw=True, params=SamplingParams(max_tokens=n, temperature=0.0))


def seeded(seed: int, n: int = 16) -> GenerateRequest:
    params = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, top_k=40, seed=seed)
    return GenerateRequest(PROMPT, raw=True, params=params)


def _wait_free_at_least(mib: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (free := _free_mib()) < mib and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


@pytest.mark.parametrize(
    ("fmt", "fixture"),
    [
        ("gguf", "gguf_dir"),
        ("transformers", "transformers_bundle"),
        ("pytorch", "pytorch_served_bundle"),
    ],
)
def test_runner_loads_on_cuda_matches_cpu_greedy_and_frees_gpu_memory_on_stop(
    make_runner: MakeRunner, request: pytest.FixtureRequest, fmt: str, fixture: str
) -> None:
    bundle = request.getfixturevalue(fixture)
    before = _free_mib()
    gpu = make_runner(bundle, fmt)
    assert gpu.start().device == "cuda"  # "auto" on a CUDA host, inside the sandbox
    assert gpu.network_isolated  # the GPU needs no network: the namespace stays
    held = before - _free_mib()
    assert held > 50, f"the runner holds only {held:.0f} MiB of GPU memory"
    cpu = make_runner(bundle, fmt, device="cpu")
    assert cpu.start().device == "cpu"
    # Tiny fp32 models: the same greedy tokens on either device.
    assert _text(gpu, greedy()) == _text(cpu, greedy())
    # Seeded sampling is reproducible on the GPU.
    assert _text(gpu, seeded(7)) == _text(gpu, seeded(7))
    gpu.stop()
    cpu.stop()  # a CUDA build of llama.cpp makes a context even for a CPU-only load
    # Teardown gives the device back: nothing stays held by a dead runner.
    assert _wait_free_at_least(before - 16) >= before - 16


def test_transformers_embeddings_on_cuda_match_cpu(
    make_runner: MakeRunner, transformers_bundle: Path
) -> None:
    gpu = make_runner(transformers_bundle, "transformers")
    assert gpu.start().device == "cuda"
    cpu = make_runner(transformers_bundle, "transformers", device="cpu")
    cpu.start()
    texts = ["one", "two words", "a longer sentence of several tokens"]
    on_gpu, done = gpu.embed(texts, "e")
    assert not done.error, done.detail
    on_cpu, _ = cpu.embed(texts, "e")
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-4)
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3


def test_onnx_device_follows_onnxruntime_providers(
    make_runner: MakeRunner, onnx_bundle: Path
) -> None:
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    runner = make_runner(onnx_bundle, "onnx")
    assert runner.start().device == ("cuda" if has_cuda else "cpu")
    assert _text(runner, greedy(8))
    if not has_cuda:  # a CPU-only onnxruntime on a GPU host: asking for CUDA is a clear error
        strict = make_runner(onnx_bundle, "onnx", device="cuda")
        with pytest.raises(RunnerSetupFailed, match="onnxruntime has no CUDA provider"):
            strict.start()


def test_gguf_full_offload_runs_every_layer_on_the_gpu(
    make_runner: MakeRunner, gguf_model_q8: Path
) -> None:
    import llama_cpp

    assert llama_cpp.llama_supports_gpu_offload(), "llama-cpp-python was built without CUDA"
    runner = make_runner(gguf_model_q8.parent, "gguf")
    assert runner.start().device == "cuda"
    assert _text(runner, seeded(3)) == _text(runner, seeded(3))
    assert _text(runner, greedy(12)) == _text(runner, greedy(12))


def test_pool_gpu_budget_evicts_an_idle_runner_before_the_gpu_is_full(
    make_pool: Callable[..., RunnerPool], transformers_bundle: Path, pytorch_served_bundle: Path
) -> None:
    a, b = "a" * 64, "b" * 64
    pool = make_pool(gpu_memory_fraction=0.0, gpu_overhead_bytes=512 << 20)
    with pool.acquire(a, transformers_bundle, "transformers") as lease:
        assert lease.runner.ready is not None and lease.runner.ready.device == "cuda"
    memory = read_gpu_memory()  # nvidia-smi, as the pool reads it
    assert memory is not None
    # From now on the GPU may hold only 256 MiB more than it does with A loaded: B (its
    # weights and 512 MiB) does not fit beside A, and A's context frees more than that.
    pool.config.gpu_memory_fraction = (memory.used_bytes + (256 << 20)) / memory.total_bytes
    with pool.acquire(b, pytorch_served_bundle, "pytorch") as lease:
        assert lease.cold and lease.runner.ready is not None and lease.runner.ready.device == "cuda"
        assert _text(lease.runner, greedy(4))
    stats = pool.stats()
    assert stats.evictions == 1 and stats.warm_models == [b]


def test_a_batching_gguf_runner_on_cuda_answers_as_each_request_alone(
    make_runner: MakeRunner, gguf_model_q8: Path
) -> None:
    """Four requests decoded together on the GPU give the texts each gives alone (batch
    size picks CUDA kernels: this is where a logit could move)."""
    from concurrent.futures import ThreadPoolExecutor

    runner = make_runner(gguf_model_q8.parent, "gguf", parallel=4)
    assert runner.start().device == "cuda" and runner.capacity == 4
    prompts = ["The quick brown fox", "Hello there", "Once upon a time", "What is the"]
    reqs = [
        GenerateRequest(p, raw=True, params=SamplingParams(max_tokens=32, temperature=0.0))
        for p in prompts
    ] + [seeded(11, 32)]
    alone = [_text_tagged(runner, r, f"alone-{i}") for i, r in enumerate(reqs)]
    with ThreadPoolExecutor(4) as ex:  # at most its capacity in flight
        together = list(
            ex.map(lambda i: _text_tagged(runner, reqs[i], f"batch-{i}"), range(len(reqs)))
        )
    assert together == alone


def _text_tagged(runner: Runner, request: GenerateRequest, tag: str) -> str:
    pieces: list[str] = []
    done = runner.generate(request, tag, lambda t: pieces.append(t.text))
    assert not done.error, done.detail
    return "".join(pieces)
