"""The execution layer's cost against the engine alone, measured in the same run (issue 3).

A real uvicorn API, a validate worker and an infer worker (threads pool) serve models uploaded
over HTTP; each benchmark prints one table. Latencies and throughput are timed with a lean
stdlib client (`LeanClient`): httpx's own CPU per request is the user's, not the layer's.
Run with `make bench`. The latency targets are
printed as PASS/FAIL, not asserted (a shared 2-core host is too noisy); correctness is asserted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bench.engine_alone import EngineRun, numbered
from tests.bench.inference_stack import (
    DATABASE,
    BenchStack,
    Deployed,
    LeanClient,
    Reply,
    api_floor,
    bench_stack,
    fresh_process_ms,
    infer_body,
    pct,
    post_infer,
    stream_infer,
    verdict,
)
from tests.utils.factories import bundle_dir
from tests.utils.stack import ROOT

PROMPT = "Tell me a story about the sea."
WARM_TOKENS, WARM_REQUESTS, STREAM_REQUESTS, WARMUP, FLOOR_REQUESTS = 32, 100, 50, 10, 30
COLD_SAMPLES = 3
TPUT_TOKENS, TPUT_LEVELS, LEVEL_S, C1_SEGMENTS = 64, (1, 4, 16), 10.0, 4
SMALL = "gguf-28m"  # the benchmark shape, Q8_0: a token costs the engine milliseconds

GGUF_FIRST_TOKEN = """
import sys
import llama_cpp
from workers.engines.llama import avoid_extra_buffers, host_has_amx
if host_has_amx():  # as the engine loads it
    avoid_extra_buffers()
path, prompt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
next(iter(llm.generate(llm.tokenize(prompt.encode(), add_bos=True), temp=0.0)))
print("first-token", flush=True)
"""

HF_FIRST_TOKEN = """
import sys
import torch
path, prompt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    int(model(tok(prompt, return_tensors="pt").input_ids).logits[0, -1].argmax())
print("first-token", flush=True)
"""


@pytest.fixture(scope="module")
def infer_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchStack]:
    from tests.utils.model_files import BENCH_SHAPE, make_gguf, make_transformers_bundle

    data = tmp_path_factory.mktemp("bench-infer")
    with bench_stack(data) as stack:
        gguf = make_gguf(data / "models" / "tiny.gguf")
        stack.deploy("gguf", gguf, {"tiny.gguf": gguf})
        small = make_gguf(data / "models" / "small.gguf", quant="q8_0", shape=BENCH_SHAPE)
        stack.deploy(SMALL, small, {"small.gguf": small})
        hf = data / "models" / "hf"
        make_transformers_bundle(hf)
        stack.deploy("transformers", hf, bundle_dir(hf))
        yield stack


def engine_alone(
    stack: BenchStack,
    name: str,
    max_tokens: int,
    runs: int,
    min_seconds: float = 0.0,
    batch: int = 1,
    gap_ms: float = 0.0,
    prompt: str = PROMPT,
    distinct: bool = False,
) -> list[EngineRun]:
    """The same file in a plain process (`engine_alone`), with the runner's device and threads."""
    spec = {
        "path": str(stack.models[name].path),
        "fmt": "gguf",
        "device": stack.settings.runner_device,
        "threads": stack.settings.runner_threads,
        "prompt": prompt,
        "distinct": distinct,
        "max_tokens": max_tokens,
        "runs": runs,
        "min_seconds": min_seconds,
        "batch": batch,
        "gap_ms": gap_ms,
    }
    argv = [sys.executable, "-m", "tests.bench.engine_alone", json.dumps(spec)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return [EngineRun(**run) for run in json.loads(out.stdout.strip().splitlines()[-1])]


def _line(cells: list[str], widths: list[int]) -> str:
    return "".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def show(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{title}  [host: {os.cpu_count()} CPUs, load average {load}; {DATABASE}]")
    widths = [max(len(h) + 2, 12) for h in header]
    widths[0] = max(len(str(r[0])) for r in [header, *rows]) + 2
    print(_line(list(header), widths))
    for row in rows:
        print(_line([f"{c:.2f}" if isinstance(c, float) else str(c) for c in row], widths))


# --- 1. warm overhead ---------------------------------------------------------------------


@pytest.mark.bench
def test_bench_warm_overhead(infer_stack: BenchStack) -> None:
    model = infer_stack.models["gguf"]
    body = infer_body(model, PROMPT, WARM_TOKENS)
    base = engine_alone(infer_stack, "gguf", WARM_TOKENS, WARM_REQUESTS)
    lean = LeanClient(infer_stack.api.url)
    for _ in range(WARMUP):
        lean.post_infer(model, body)
    replies = [lean.post_infer(model, body) for _ in range(WARM_REQUESTS)]
    streams = [lean.stream_infer(model, body) for _ in range(STREAM_REQUESTS)]
    for reply in replies + streams:  # greedy: the platform answers exactly what the engine does
        assert (reply.completion, reply.completion_tokens) == (base[0].text, base[0].tokens)
    assert not any(r.cold for r in replies + streams), "a warm request hit a cold start"
    timings = infer_stack.timings([r.job_id for r in replies])
    engine_ms = statistics.median(b.total_ms for b in base)
    overhead = [r.total_ms - engine_ms for r in replies]
    ttft_engine = statistics.median(b.ttft_ms for b in base)
    ttft_over = [s.ttft_ms - ttft_engine for s in streams if s.ttft_ms is not None]
    rows = [
        ("overhead p50 (client - engine)", pct(overhead, 50), 5.0, verdict(pct(overhead, 50), 5)),
        ("overhead p99", pct(overhead, 99), 20.0, verdict(pct(overhead, 99), 20)),
        ("TTFT overhead p50 (stream)", pct(ttft_over, 50), 5.0, verdict(pct(ttft_over, 50), 5)),
        ("TTFT overhead p99 (stream)", pct(ttft_over, 99), "-", "-"),
    ]
    title = f"Warm overhead: GGUF, {WARM_TOKENS} tokens, greedy, concurrency 1, "
    title += f"{WARM_REQUESTS} JSON + {STREAM_REQUESTS} SSE requests (ms)"
    show(title, ("metric", "ms", "target", "result"), rows)
    floor = api_floor(infer_stack.http, model, body, FLOOR_REQUESTS)
    # The baseline runs back to back; a runner at concurrency 1 idles between requests for
    # about the layer's own time, and the engine is slower after a pause. Shown beside the
    # verdict (which stays against the back-to-back baseline), not instead of it.
    gap = pct([r.total_ms - timings[r.job_id]["engine_ms"] for r in replies], 50)
    paused = engine_alone(infer_stack, "gguf", WARM_TOKENS, WARM_REQUESTS // 2, gap_ms=gap)
    _show_breakdown(replies, timings, base, [s.ttft_ms or 0.0 for s in streams], floor, paused)


def _show_breakdown(
    replies: list[Any],
    timings: dict[str, dict[str, float]],
    base: list[EngineRun],
    client_ttft: list[float],
    floor: dict[str, list[float]],
    paused: list[EngineRun],
) -> None:
    def part(name: str, values: list[float]) -> tuple[str, float, float, float]:
        return (name, pct(values, 50), pct(values, 99), statistics.fmean(values))

    t = [timings[r.job_id] for r in replies]
    total = [r.total_ms for r in replies]
    runner_engine = [x["engine_ms"] for x in t]
    engine_p50 = statistics.median(b.total_ms for b in base)
    paused_p50 = statistics.median(b.total_ms for b in paused)
    queue, run = [x["queue_ms"] for x in t], [x["run_ms"] for x in t]
    rest = [c - q - r for c, q, r in zip(total, queue, run)]
    rows = [
        part("client end-to-end", total),
        part("engine alone, plain process (baseline)", [b.total_ms for b in base]),
        part("engine alone, idle as between requests", [b.total_ms for b in paused]),
        part("  client - that engine alone", [c - paused_p50 for c in total]),
        part("engine_ms in the runner", runner_engine),
        part("  runner engine - engine alone", [e - engine_p50 for e in runner_engine]),
        # The layer against the engine's time in the same request: free of the baseline's
        # own spread (a CUDA engine's run-to-run spread was ~1 ms on an H100).
        part(
            "client - runner engine_ms (same request)",
            [c - e for c, e in zip(total, runner_engine)],
        ),
        part("queue_ms (job row -> worker)", queue),
        part("run_ms - engine_ms (pool+pipe+XADD)", [r - e for r, e in zip(run, runner_engine)]),
        part("rest (API, lock, finish txn, ending, XREAD)", rest),
        part("  GET /healthz, lean client (HTTP floor)", floor["healthz_lean"]),
        part("  GET /healthz, httpx", floor["healthz"]),
        part("  POST /v1/jobs (auth+INSERT+publish)", floor["create"]),
        part("  Redis PING round trip (one hop)", floor["redis"]),
        part("client TTFT (stream)", client_ttft),
        part("engine TTFT alone", [b.ttft_ms for b in base]),
    ]
    show("Where the warm time goes (ms)", ("part", "p50", "p99", "mean"), rows)


# --- 2. cold start -----------------------------------------------------------------------


def _cold_samples(stack: BenchStack, model: Deployed) -> list[tuple[float, float, float]]:
    """(client TTFT, client total, cold_start_ms) of first requests after a teardown."""
    body = infer_body(model, PROMPT, WARM_TOKENS)
    post_infer(stack.http, model, body)  # the weights are in the host cache from here on
    samples = []
    for _ in range(COLD_SAMPLES):
        stack.wait_no_runners()
        reply = stream_infer(stack.http, model, body)
        assert reply.cold, "expected a cold start after the teardown"
        cold_ms = stack.timings([reply.job_id])[reply.job_id]["cold_start_ms"]
        samples.append((reply.ttft_ms or 0.0, reply.total_ms, cold_ms))
    return samples


def _cold_row(stack: BenchStack, fmt: str, code: str) -> tuple[Any, ...]:
    model = stack.models[fmt]
    threads = str(stack.settings.runner_threads)
    path = model.path
    base = statistics.median(
        fresh_process_ms(code, str(path), PROMPT, threads) for _ in range(COLD_SAMPLES)
    )
    samples = _cold_samples(stack, model)
    ttft = statistics.median(s[0] for s in samples)
    total = statistics.median(s[1] for s in samples)
    cold = statistics.median(s[2] for s in samples)
    ratio = ttft / base
    return (fmt, base, cold, ttft, total, ratio, verdict(ratio, 1.2))


@pytest.mark.bench
def test_bench_cold_start(infer_stack: BenchStack) -> None:
    rows = [
        _cold_row(infer_stack, "gguf", GGUF_FIRST_TOKEN),
        _cold_row(infer_stack, "transformers", HF_FIRST_TOKEN),
    ]
    header = (
        "format",
        "fresh proc",
        "cold_start",
        "client TTFT",
        "client total",
        "ratio",
        "<=1.2x",
    )
    title = f"Cold start after idle teardown, weights in host cache (median of {COLD_SAMPLES}, ms)"
    show(title, header, rows)
    print("fresh proc: `python -c` importing the library, loading the file and producing the")
    print("first token, from spawn. ratio = client TTFT of the cold request / fresh proc.")


# --- 3. throughput -------------------------------------------------------------------------


@dataclass
class Level:
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    p50_ms: float
    cold_starts: int
    max_runners: int
    differ: int  # completions other than the engine alone's (batched decoding only)
    cpu_ms: dict[str, float]  # CPU per request, by process (API, infer worker, runners)
    replies: list[Reply]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def _drive(
    url: str, model: Deployed, body: dict[str, Any], concurrency: int, seconds: float
) -> list[Reply]:
    """`concurrency` callers, each a thread with its own keep-alive `LeanClient`, posting one
    request after another until the level's time is up. Not httpx: at c=1 its ~1.3 ms of CPU
    a request ran on the same two cores as the layer and was counted as the layer's cost."""
    deadline = time.perf_counter() + seconds

    def client() -> list[Reply]:
        lean, done = LeanClient(url), []
        while time.perf_counter() < deadline:
            done.append(lean.post_infer(model, body))
        return done

    with ThreadPoolExecutor(max_workers=concurrency) as callers:
        futures = [callers.submit(client) for _ in range(concurrency)]
        return [reply for future in futures for reply in future.result()]


def _watch(sample: Callable[[], int], stop: threading.Event, seen: list[int]) -> None:
    while not stop.wait(0.5):
        seen.append(sample())


def _level(
    stack: BenchStack,
    name: str,
    body: dict[str, Any],
    expected: str,
    concurrency: int,
    batch: int,
    between: Callable[[], None] | None = None,
) -> Level:
    """`LEVEL_S` of traffic; with `between`, in `C1_SEGMENTS` parts with `between` run (not
    timed, not counted) before each part after the first."""
    model = stack.models[name]
    stop, seen = threading.Event(), [stack.runner_count()]
    watcher = threading.Thread(target=_watch, args=(stack.runner_count, stop, seen), daemon=True)
    watcher.start()
    parts = C1_SEGMENTS if between is not None else 1
    out: list[Reply] = []
    seconds, cpu_s = 0.0, dict.fromkeys(stack.cpu_seconds(), 0.0)
    for part in range(parts):
        if part and between is not None:
            between()
        cpu0, t0 = stack.cpu_seconds(), time.perf_counter()
        out += _drive(stack.api.url, model, body, concurrency, LEVEL_S / parts)
        seconds += time.perf_counter() - t0
        cpu_s = {k: cpu_s[k] + max(0.0, v - cpu0[k]) for k, v in stack.cpu_seconds().items()}
    cpu = {k: v * 1000 / len(out) for k, v in cpu_s.items()}
    stop.set()
    watcher.join()
    differ = sum(r.completion != expected for r in out)
    # One request at a time, greedy decoding is exact. Decoded together, llama.cpp picks
    # kernels by batch shape (on CUDA, and on CPUs with several threads), so a random-weight
    # model's near-tied logits can tip: counted and shown, not asserted.
    assert batch > 1 or not differ, "crossed or wrong outputs"
    tokens = sum(r.completion_tokens for r in out)
    p50 = pct([r.total_ms for r in out], 50)
    colds = sum(r.cold for r in out)
    return Level(concurrency, len(out), tokens, seconds, p50, colds, max(seen), differ, cpu, out)


def _show_fixed_cost(stack: BenchStack, c1: Level, runs: list[EngineRun]) -> None:
    """Where c=1's time per request goes beyond the engine alone's: the engine running slower
    inside the runner (its own `engine_ms`) or the layer around it (client - `engine_ms`)."""
    timings = stack.timings([r.job_id for r in c1.replies])
    same = [(r.total_ms, timings[r.job_id]["engine_ms"]) for r in c1.replies if r.job_id in timings]
    alone = [r.total_ms for r in runs]
    gap = [c - e for c, e in same]
    rows = [
        ("client end-to-end", pct([c for c, _ in same], 50), statistics.fmean(c for c, _ in same)),
        ("engine alone, one call", pct(alone, 50), statistics.fmean(alone)),
        ("engine_ms in the runner", pct([e for _, e in same], 50), statistics.fmean(e for _, e in same)),
        ("  runner engine - engine alone", pct([e for _, e in same], 50) - pct(alone, 50),
         statistics.fmean(e for _, e in same) - statistics.fmean(alone)),
        ("client - runner engine_ms (the layer)", pct(gap, 50), statistics.fmean(gap)),
    ]  # fmt: skip
    show("c=1 per request: engine against layer (ms)", ("part", "p50", "mean"), rows)


def _runner_batch(stack: BenchStack) -> int:
    """Requests one GGUF runner of the stack decodes together (its GPU setting on a GPU)."""
    from workers.gpu import read_gpu_memory

    on_gpu = stack.settings.runner_device != "cpu" and read_gpu_memory() is not None
    return stack.settings.runner_gpu_batch if on_gpu else stack.settings.runner_batch


def _tps(runs: list[EngineRun]) -> float:
    return sum(r.tokens for r in runs) / (sum(r.total_ms for r in runs) / 1000)


@pytest.mark.parametrize("name", ["gguf", SMALL])
@pytest.mark.bench
def test_bench_throughput(infer_stack: BenchStack, name: str) -> None:
    model = infer_stack.models[name]
    body = infer_body(model, PROMPT, TPUT_TOKENS)
    batch = _runner_batch(infer_stack)
    if batch > 1:  # on CUDA a seeded request decodes alone: batching would not be measured
        del body["seed"]
    # A quiet host first: runners left by an earlier level (their teardown takes CPU while
    # this one's baseline and c=1 run) made the c=1 cost swing from 9 % to 23 %.
    infer_stack.wait_no_runners()
    runs = engine_alone(infer_stack, name, TPUT_TOKENS, 1, LEVEL_S / C1_SEGMENTS)
    # With batching on, the engine's own batched decoding of as many sequences is the
    # baseline too: what the layer costs, apart from what batching gains.
    batched = {
        c: _tps(engine_alone(infer_stack, name, TPUT_TOKENS, 0, LEVEL_S / 2, min(c, batch)))
        for c in TPUT_LEVELS
        if batch > 1 and c > 1
    }
    post_infer(infer_stack.http, model, body)  # warm

    def engine_segment() -> None:
        runs.extend(engine_alone(infer_stack, name, TPUT_TOKENS, 1, LEVEL_S / C1_SEGMENTS))
        post_infer(infer_stack.http, model, body)  # its runner idled past the bench's TTL

    # c=1 in segments, each after one of the engine alone: this host's speed drifts by 5-12 %
    # within tens of seconds (one baseline measured before c=1 and one after it differed by
    # 12 %), and c=1 is the level held closest to the target, so the two take turns.
    levels = [_level(infer_stack, name, body, runs[0].text, 1, batch, between=engine_segment)]
    engine_tps = _tps(runs)
    levels += [_level(infer_stack, name, body, runs[0].text, c, batch) for c in TPUT_LEVELS[1:]]
    blank = ("-", "-", "-", "-", "-", "1", "-", "-")
    rows: list[tuple[Any, ...]] = [
        (f"engine alone, sequential ({len(runs)} calls)", engine_tps, *blank)
    ]
    for c, tps in batched.items():
        rows.append((f"engine alone, {min(c, batch)} decoded together", tps, *blank))
    for lv in levels:
        cost = (1 - lv.tps / engine_tps) * 100
        base = batched.get(lv.concurrency)
        vs_batched = "-" if base is None else f"{(1 - lv.tps / base) * 100:.2f}"
        rows.append((f"platform c={lv.concurrency} ({lv.requests} req)", lv.tps, cost,
                     verdict(cost, 10), vs_batched, lv.p50_ms, lv.cold_starts,
                     str(lv.max_runners), f"{lv.seconds:.1f}s", str(lv.differ)))  # fmt: skip
    header = ("setup", "tok/s", "cost %", "<=10 %", "vs batched %", "p50 ms", "cold", "runners", "wall", "!= alone")  # fmt: skip
    title = f"Throughput: {name}, {TPUT_TOKENS} tokens/request, ~{LEVEL_S:.0f} s per level, "
    title += f"runner batch {batch}"
    show(title, header, rows)
    cpu_rows = [
        (f"platform c={lv.concurrency}", *(lv.cpu_ms[k] for k in ("api", "worker", "runners")),
         *(lv.cpu_ms[k] * lv.requests / lv.seconds / 1000 for k in ("api", "worker", "runners")))
        for lv in levels
    ]  # fmt: skip
    cpu_header = ("level", "api ms/req", "worker ms/req", "runners ms/req", "api cores", "worker cores", "runner cores")  # fmt: skip
    show("CPU per request by process (ms) and cores busy during the level", cpu_header, cpu_rows)
    per_request = levels[0].seconds / levels[0].requests * 1000 - 1000 * TPUT_TOKENS / engine_tps
    _show_fixed_cost(infer_stack, levels[0], runs)
    print(
        "Baseline: the same engine in a plain process, calls one after another (one runner serves"
    )
    print(f"one request at a time), timed in {C1_SEGMENTS} turns with c=1's; runners = most runner")
    print("processes seen during the level.")
    print("vs batched: cost against the engine alone decoding min(c, batch) sequences at once.")
    print(f"Fixed cost per request at c=1: {per_request:.1f} ms; for a generation the engine takes")
    print(f"1 s over, that is a {per_request / (1000 + per_request) * 100:.1f} % throughput cost.")


# --- 4. cancel ---------------------------------------------------------------------------

CANCEL_TRIALS, CANCEL_AFTER, CANCEL_MAX_TOKENS = 20, 8, 160


def _cancel_streamed(stack: BenchStack, model: Deployed) -> tuple[float, int, str]:
    """A job followed over SSE, cancelled after `CANCEL_AFTER` tokens: (ms from sending the
    cancel to the stream's end, tokens that arrived after it was sent, final status)."""
    headers = {"Authorization": f"Bearer {model.key}"}
    body = infer_body(model, PROMPT, CANCEL_MAX_TOKENS)
    resp = stack.http.post("/v1/jobs", json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    seen, after, sent = 0, 0, 0.0
    answers: list[int] = []
    cancel = threading.Thread(  # sent from beside the stream, which goes on being read
        target=lambda: answers.append(
            stack.http.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code
        )
    )
    with stack.http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "token" in event:
                seen += 1
                after += sent > 0
                if seen == CANCEL_AFTER:
                    sent = time.perf_counter()
                    cancel.start()
            elif event.get("done"):
                break
    ended_ms = (time.perf_counter() - sent) * 1000
    cancel.join(30)
    assert answers == [200], answers
    status = stack.http.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"]
    return ended_ms, after, status


@pytest.mark.bench
def test_bench_cancel(infer_stack: BenchStack) -> None:
    """How soon a running job stops once cancelled, against the engine's time per token.

    The worker hears a cancel on a Redis channel and tells the runner, which stops after the
    token in progress; the job's end then goes through the usual ending (its usage recorded).
    """
    model = infer_stack.models[SMALL]
    base = engine_alone(infer_stack, SMALL, TPUT_TOKENS, 5)
    per_token = statistics.median(b.total_ms / b.tokens for b in base)
    _cancel_streamed(infer_stack, model)  # warm
    trials = [_cancel_streamed(infer_stack, model) for _ in range(CANCEL_TRIALS)]
    assert all(status == "cancelled" for _, _, status in trials), trials
    ended = [t[0] for t in trials]
    after = [float(t[1]) for t in trials]
    floor = api_floor(infer_stack.http, model, infer_body(model, PROMPT, 1), 10)
    rows = [
        ("cancel sent -> stream's end (ms)", pct(ended, 50), pct(ended, 95), max(ended)),
        ("tokens received after the cancel was sent", pct(after, 50), pct(after, 95), max(after)),
        ("engine alone, ms per token (baseline)", per_token, "-", "-"),
        ("Redis PING round trip (ms)", pct(floor["redis"], 50), pct(floor["redis"], 95), "-"),
        ("POST /v1/jobs, httpx (ms)", pct(floor["create"], 50), pct(floor["create"], 95), "-"),
    ]
    title = f"Cancel: {SMALL}, SSE follower, cancel after {CANCEL_AFTER} tokens, "
    title += f"{CANCEL_TRIALS} jobs"
    show(title, ("metric", "p50", "p95", "max"), rows)
    print("The cancel travels: POST (API) -> Redis flag + channel -> worker -> runner, which")
    print("stops after the token in progress; the end is the job's ending pipeline and XREAD.")


# --- 5. cancel during a long prompt's prefill ----------------------------------------------

PREFILL_TRIALS, PREFILL_TOKENS, PREFILL_CANCEL_S = 6, 1700, 0.3


def _long_prompt(tokens: int) -> str:
    """Prose of about `tokens` tokens in the bench models' vocabulary."""
    from tests.utils.model_files import load_tokenizer

    tokenizer = load_tokenizer()
    sentence = "The old sailor told the children a long story about the sea and the stars. "
    per = len(tokenizer(sentence, add_special_tokens=False).input_ids)
    return sentence * (tokens // per)


def _cancel_prefill(
    stack: BenchStack, model: Deployed, prompt: str
) -> tuple[float, dict[str, Any]]:
    """A job cancelled `PREFILL_CANCEL_S` after it started running (its prompt still being
    evaluated): (ms from sending the cancel to the stream's end, the job as GET reads it)."""
    import redis

    from core.events import stream_key

    headers = {"Authorization": f"Bearer {model.key}"}
    resp = stack.http.post("/v1/jobs", json=infer_body(model, prompt, 16), headers=headers)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    sent: list[float] = []
    answers: list[int] = []

    def cancel_once_running() -> None:
        client = redis.Redis.from_url(stack.settings.redis_url)
        last = "0"
        while not sent:
            for _, entries in client.xread({stream_key(job_id): last}, block=30_000) or ():
                for entry_id, fields in entries:
                    last = entry_id
                    if json.loads(fields[b"e"]).get("status") == "running":
                        time.sleep(PREFILL_CANCEL_S)
                        sent.append(time.perf_counter())
                        cancel = stack.http.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
                        answers.append(cancel.status_code)
        client.close()

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    with stack.http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("done"):
                break
    ended = time.perf_counter()
    canceller.join(30)
    assert answers == [200], answers
    job = stack.http.get(f"/v1/jobs/{job_id}", headers=headers).json()
    return (ended - sent[0]) * 1000, job


@pytest.mark.bench
def test_bench_cancel_prefill(infer_stack: BenchStack, tmp_path: Path) -> None:
    """How soon a job stops when cancelled while its long prompt is evaluated, against the
    engine alone's whole prefill of that prompt and one chunk of it.

    The runner evaluates a prompt in chunks (128 tokens on a CPU) and looks for a cancel
    between them; as one call, the prefill ran to its end whatever was cancelled.
    """
    from tests.utils.model_files import BENCH_SHAPE, make_gguf
    from workers.engines.loop import CPU_PREFILL_CHUNK

    shape = (*BENCH_SHAPE, ("max_position_embeddings", 2048))
    path = make_gguf(tmp_path / "long.gguf", quant="q8_0", shape=shape)
    model = infer_stack.deploy("gguf-28m-2k", path, {"long.gguf": path})
    prompt = _long_prompt(PREFILL_TOKENS)
    base = engine_alone(infer_stack, "gguf-28m-2k", 1, 4, prompt=prompt, distinct=True)
    prefill_ms = statistics.median(b.ttft_ms for b in base)
    headers = {"Authorization": f"Bearer {model.key}"}
    body = infer_body(model, numbered(prompt, -1), 1)
    warm = infer_stack.http.post("/v1/infer", json=body, headers=headers).json()  # cold start
    body = infer_body(model, numbered(prompt, -2), 1)
    t0 = time.perf_counter()
    assert infer_stack.http.post("/v1/infer", json=body, headers=headers).status_code == 200
    uncancelled_ms = (time.perf_counter() - t0) * 1000
    trials = [
        _cancel_prefill(infer_stack, model, numbered(prompt, i)) for i in range(PREFILL_TRIALS)
    ]
    assert all(job["status"] == "cancelled" for _, job in trials), [j for _, j in trials]
    prompt_tokens = warm["prompt_tokens"]
    chunk_ms = prefill_ms * CPU_PREFILL_CHUNK / prompt_tokens
    ended = [t[0] for t in trials]
    left_ms = prefill_ms - 1000 * PREFILL_CANCEL_S
    rows = [
        ("cancel sent -> stream's end (ms)", pct(ended, 50), pct(ended, 95), max(ended)),
        ("engine alone: the whole prefill (ms, baseline)", prefill_ms, "-", "-"),
        ("engine alone: one chunk of the prefill (ms)", chunk_ms, "-", "-"),
        ("one call: the prefill left at the cancel (ms)", left_ms, "-", "-"),
        ("platform: the same job uncancelled, 1 token (ms)", uncancelled_ms, "-", "-"),
    ]
    title = f"Cancel during a prefill: a 28 M Q8_0 GGUF, {prompt_tokens}-token prompt, "
    title += f"cancelled {PREFILL_CANCEL_S * 1000:.0f} ms after it started running, "
    title += f"{PREFILL_TRIALS} jobs"
    show(title, ("metric", "p50", "p95", "max"), rows)
