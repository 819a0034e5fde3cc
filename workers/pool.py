"""Per-host pool of warm runners, keyed by the model's SHA-256.

A warm READY runner is reused; otherwise a cold start. The pool is capped by a runner count
and a memory budget: the least recently used *idle* runner is evicted to make room (a busy
one never is), and when nothing can be evicted the caller waits. Runners idle longer than
the TTL are torn down by a reaper thread, except the `min_warm` ones.
On a GPU host a model gets one runner (`gpu_runners_per_model`): its other requests wait
for it, or join its batch where batching is on (`gpu_batch` sequences decoded together),
since a second runner would only time-slice the same GPU. On a CPU host a model gets as many
runners as its usable CPUs hold at `threads` each (`cpu_runners_per_model`), for the same
reason.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from core.cpus import usable_cpus
from workers.gpu import GpuMemory, read_gpu_memory
from workers.runner.process import Runner, RunnerSetupFailed, RunnerState
from workers.runner.sandbox import SandboxConfig

log = logging.getLogger("inferatech.pool")


# A spare has imported llama.cpp while it waited, so it only ever serves GGUF: torch's CUDA
# libraries and a CUDA build of llama.cpp crash in one process (seen on an H100 host).
SPARE_FORMATS = frozenset({"gguf"})
GPU_RECHECK_S = 0.25


class PoolExhausted(Exception):
    """No runner could be freed for this request within the acquire timeout."""


@dataclass
class PoolConfig:
    idle_ttl_s: float = 300.0
    max_runners: int = 4
    memory_budget_bytes: int | None = None
    min_warm: Mapping[str, int] = field(default_factory=dict)
    start_timeout_s: float = 120.0
    acquire_timeout_s: float = 60.0
    reap_interval_s: float = 5.0
    device: str = "auto"
    threads: int = 1  # per runner: engine threads and OMP/MKL thread counts
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    runner_argv: Sequence[str] | None = None  # tests swap in a fault-injecting child
    # Blank runner processes kept spawned (sandboxed, engines imported, no model): a cold
    # start then only loads the weights. They hold no model and no user data.
    spares: int = 0
    # On CUDA hosts, the share of the visible GPUs' memory runners may fill (0: no GPU budget).
    # A cold start needs its weights' size plus `gpu_overhead_bytes` (CUDA context, buffers)
    # free under that share, counting whatever else uses the GPUs; else LRU idle runners go.
    gpu_memory_fraction: float = 0.0
    gpu_overhead_bytes: int = 512 << 20
    # On a GPU host, runners of one model at once: more would time-slice the same GPU (each
    # its own CUDA context), so a request waits for the model's runner instead. Measured on
    # an H100 with a tiny GGUF at concurrency 4: 1,100 tokens/s from four runners, 4,860
    # from one.
    gpu_runners_per_model: int = 1
    # On a CPU host, runners of one model at once; None: as many as the usable CPUs
    # (`core.cpus`) hold at `threads` engine threads each (at least one). More only
    # time-slice the same cores. Measured on a 2-vCPU host (tiny GGUF, one thread per
    # runner, 64 tokens, two A/B pairs): two runners served as many tokens/s as four at
    # concurrency 4 and 16, within the host's noise (4,140-5,030 against 4,310-5,260), with
    # one cold start per burst instead of three and 1-2 ms less runner CPU per request at
    # concurrency 4 (12.6-13.1 against 14.2-14.5 ms).
    cpu_runners_per_model: int | None = None
    # Requests one runner decodes together where its engine batches (GGUF): `batch` on CPU
    # hosts, `gpu_batch` on GPU hosts. Other formats take one request at a time. Off (1) on
    # both by default: on an H100 the engine decoded four Q8_0 sequences 2.5x faster than one
    # after another, but through the platform a batch-4 runner served 1,959 tokens/s at
    # concurrency 4 and 1,174 at 16 (one unbatched runner: 2,046 at 4, another day).
    batch: int = 1
    gpu_batch: int = 1


class Lease(NamedTuple):
    runner: Runner
    cold: bool
    cold_start_ms: float


@dataclass(frozen=True)
class PoolStats:
    warm_models: list[str]
    idle_models: list[str]  # models with a READY runner that has room right now
    runners: int
    busy: int  # runners with no room for another request (starting, or full)
    inflight: int  # requests holding a runner (a batching runner holds several)
    cold_starts: int
    hits: int
    evictions: int
    reaped: int


@dataclass(eq=False)
class _Slot:
    key: str
    runner: Runner | None  # None while its runner is starting
    leases: int  # requests holding the runner (a batching runner takes several)
    estimate: int = 0  # bytes its model needs, reserved while it starts

    @property
    def busy(self) -> bool:
        """No room for another request (a starting runner has none yet)."""
        return self.runner is None or self.leases >= self.runner.capacity

    def has_room(self) -> bool:
        """Ready and able to take one more request now."""
        return not self.busy and self.runner is not None and self.runner.state is RunnerState.READY

    def idle_ready(self) -> bool:
        """Ready and serving nobody: it may be evicted or reaped."""
        return self.leases == 0 and self.has_room()


class RunnerPool:
    """Thread-safe: several request threads may acquire at once."""

    def __init__(self, config: PoolConfig | None = None, **overrides: Any) -> None:
        """`RunnerPool(PoolConfig(...))` or keyword overrides: `RunnerPool(max_runners=2)`."""
        self.config = dataclasses.replace(config or PoolConfig(), **overrides)
        self._min_warm = dict(self.config.min_warm)
        self._bundles: dict[str, tuple[Path, str]] = {}
        self._cold_s: dict[str, float] = {}  # last cold start per model
        self._sizes: dict[str, int] = {}  # per model: weights and KV cache, the memory estimate
        self._slots: list[_Slot] = []
        self._cond = threading.Condition()
        self._counts = {"cold_starts": 0, "hits": 0, "evictions": 0, "reaped": 0}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._spares: list[Runner] = []
        self._spare_lock = threading.Lock()
        self._refilling = threading.Event()
        # Whether this host's runners use a GPU (nvidia-smi answers); None: not asked yet.
        self._on_gpu: bool | None = False if self.config.device == "cpu" else None
        # Read once (files under /proc and /sys), not at every wait in `_capped`.
        cores = usable_cpus() // max(1, self.config.threads)
        self.cpu_runners_per_model = self.config.cpu_runners_per_model or max(1, cores)

    @contextmanager
    def acquire(
        self, key: str, bundle_dir: Path, fmt: str, *, timeout: float | None = None
    ) -> Iterator[Lease]:
        """A runner for model `key`, exclusively, for the duration of the block."""
        slot, cold, cold_ms = self._checkout(key, Path(bundle_dir), fmt, timeout)
        assert slot.runner is not None
        try:
            yield Lease(slot.runner, cold, cold_ms)
        finally:
            self._checkin(slot)

    def _checkout(
        self, key: str, bundle_dir: Path, fmt: str, timeout: float | None
    ) -> tuple[_Slot, bool, float]:
        began = time.monotonic()
        deadline = began + (timeout or self.config.acquire_timeout_s)
        gpu: GpuMemory | None = None  # read outside the lock (nvidia-smi) for the next decision
        if self._on_gpu is None:  # once per pool, at its first acquire (a cold start)
            gpu = read_gpu_memory()
            self._on_gpu = gpu is not None
        budgeted = self._gpu_budgeted()
        fresh = budgeted and gpu is not None
        # Bundles are content-addressed, so their size never changes: estimate once.
        estimate = self._sizes.get(key)
        if estimate is None:
            estimate = self._sizes[key] = self._estimate(bundle_dir, fmt)
        while True:
            victim: _Slot | None = None
            with self._cond:
                self._bundles[key] = (bundle_dir, fmt)
                self._drop_dead()
                slot = self._idle_for(key)
                if slot is not None:
                    slot.leases += 1
                    self._counts["hits"] += 1
                    return slot, False, 0.0
                if self._capped(key):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PoolExhausted(f"the runner of {key[:12]} stayed busy")
                    self._cond.wait(remaining)  # a checkin notifies
                    continue
                if fresh or not budgeted:
                    fresh = False
                    if self._has_room(estimate, gpu):
                        slot = _Slot(key, None, leases=1, estimate=estimate)
                        self._slots.append(slot)
                        break
                    # Waiting for a busy runner of this model beats evicting another model's
                    # idle one while the wait is shorter than its cold start: no thrashing.
                    patience = began + self._cold_s.get(key, 0.0)
                    if self._live(key) and time.monotonic() < min(patience, deadline):
                        self._cond.wait(min(patience, deadline) - time.monotonic())
                        continue
                    victim = self._evict_lru()
                    if victim is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise PoolExhausted(
                                f"no runner freed within the timeout for {key[:12]}"
                            )
                        # GPU memory that others free comes with no notify: look again soon.
                        self._cond.wait(min(remaining, GPU_RECHECK_S) if budgeted else remaining)
            if victim is not None:
                _stop(victim)
            elif budgeted and not fresh:
                gpu, fresh = read_gpu_memory(), True
        started = time.perf_counter()
        self._start_into(slot, bundle_dir, fmt)
        cold_s = time.perf_counter() - started
        with self._cond:
            self._cold_s[key] = cold_s
        return slot, True, cold_s * 1000

    def _parallel(self) -> int:
        return self.config.gpu_batch if self._on_gpu else self.config.batch

    def _estimate(self, bundle_dir: Path, fmt: str) -> int:
        """Memory a runner of this bundle takes: its weights, plus a GGUF's KV cache (its
        own context and, batching, one more per sequence), which llama.cpp allocates whole."""
        files = [bundle_dir] if bundle_dir.is_file() else list(bundle_dir.rglob("*"))
        sizes = {f: f.stat().st_size for f in files if f.is_file()}
        weights = sum(sizes.values())
        if fmt != "gguf" or not sizes:
            return weights
        from workers.engines.llama import kv_cache_bytes
        from workers.engines.loader import DEFAULT_CONTEXT_CAP

        parallel = self._parallel()
        contexts = 1 + (parallel if parallel > 1 else 0)
        largest = max(sizes, key=sizes.__getitem__)
        return weights + kv_cache_bytes(largest, contexts, DEFAULT_CONTEXT_CAP)

    def _new_runner(self, bundle_dir: Path, fmt: str) -> Runner:
        return Runner(
            bundle_dir,
            fmt,
            sandbox=dataclasses.replace(self.config.sandbox, threads=self.config.threads),
            device=self.config.device,
            argv=self.config.runner_argv,
        )

    def _take_spare(self) -> Runner | None:
        """A live spare, if one is ready (a refill is started in the background)."""
        spare = None
        with self._spare_lock:
            while self._spares and spare is None:
                candidate = self._spares.pop()
                if candidate.is_alive():
                    spare = candidate
                else:
                    candidate.stop()
        self.refill_spares(wait=False)
        return spare

    def refill_spares(self, *, wait: bool = True) -> int:
        """Spawn spares up to `config.spares`; in a background thread unless `wait`."""
        if not self.config.spares or self._stop.is_set():
            return 0
        if not wait:
            with self._spare_lock:  # one background refill at a time
                if self._refilling.is_set():
                    return 0
                self._refilling.set()
            threading.Thread(target=self._refill, name="pool-spares", daemon=True).start()
            return 0
        self._refilling.set()
        return self._refill()

    def _refill(self) -> int:
        spawned = 0
        try:
            while not self._stop.is_set():
                with self._spare_lock:
                    if len(self._spares) >= self.config.spares:
                        return spawned
                spare = self._new_runner(Path(), "")
                spare.spawn()
                with self._spare_lock:
                    if self._stop.is_set():
                        spare.stop()
                        return spawned
                    self._spares.append(spare)
                spawned += 1
            return spawned
        except RunnerSetupFailed:
            log.exception("could not spawn a spare runner")
            return spawned
        finally:
            self._refilling.clear()

    def spare_count(self) -> int:
        with self._spare_lock:
            return len(self._spares)

    def _start_into(self, slot: _Slot, bundle_dir: Path, fmt: str) -> None:
        """Cold start outside the lock; a failed start gives its reserved place back."""
        runner = self._take_spare() if fmt in SPARE_FORMATS else None
        if runner is not None:
            runner.assign(bundle_dir, fmt)
        else:
            runner = self._new_runner(bundle_dir, fmt)
        runner.parallel = self._parallel()
        try:
            runner.start(timeout=self.config.start_timeout_s)
        except BaseException:
            with self._cond:
                self._slots.remove(slot)
                self._cond.notify_all()
            raise
        with self._cond:
            slot.runner = runner
            self._counts["cold_starts"] += 1
            self._cond.notify_all()  # a batching runner has room for the model's waiters

    def _checkin(self, slot: _Slot) -> None:
        runner = slot.runner
        with self._cond:
            slot.leases -= 1
            if runner is not None:
                runner.last_used = time.monotonic()  # a lease is a use, generate or not
            # BUSY is healthy too: a batching runner may be full with other leases' requests.
            healthy = runner is not None and runner.state in (RunnerState.READY, RunnerState.BUSY)
            if not healthy and slot in self._slots:
                self._slots.remove(slot)  # DEFUNCT: never handed out again
            self._cond.notify_all()
        if not healthy:
            _stop(slot)

    # --- decisions, all under self._cond -----------------------------------------------

    def _idle_for(self, key: str) -> _Slot | None:
        free = [s for s in self._slots if s.key == key and s.has_room()]
        # Most recently used first: keeps the others cold enough for the reaper to take.
        return max(free, key=_last_used, default=None)

    def _has_room(self, estimate: int, gpu: GpuMemory | None) -> bool:
        """Room for one more runner; `gpu`: the GPUs as last read (None: none to budget)."""
        if not self._slots:
            return True  # one runner must always be possible, whatever the estimate
        if len(self._slots) >= self.config.max_runners:
            return False
        budget = self.config.memory_budget_bytes
        if budget is not None and self._rss() + estimate > budget:
            return False
        return gpu is None or self._gpu_room(estimate, gpu)

    def _rss(self) -> int:
        return sum(s.runner.rss_bytes() for s in self._slots if s.runner is not None)

    def _capped(self, key: str) -> bool:
        """The model has as many runners (started or starting) as the GPU, or the usable
        CPUs, should hold: another request of it waits for one of them."""
        if self._on_gpu:
            return self._live(key) >= self.config.gpu_runners_per_model
        return self._live(key) >= self.cpu_runners_per_model

    def _gpu_budgeted(self) -> bool:
        """GPU memory is budgeted: asked for, and the runners use a GPU (or it is not known
        yet). A host without one is never asked again after the first acquire."""
        return (
            self.config.gpu_memory_fraction > 0
            and self.config.device != "cpu"
            and self._on_gpu is not False
        )

    def _gpu_room(self, estimate: int, memory: GpuMemory) -> bool:
        overhead = self.config.gpu_overhead_bytes
        # Runners still loading have not allocated yet: hold their share for them.
        starting = sum(s.estimate + overhead for s in self._slots if s.runner is None)
        need = memory.used_bytes + starting + estimate + overhead
        return need <= self.config.gpu_memory_fraction * memory.total_bytes

    def _evict_lru(self) -> _Slot | None:
        idle = [s for s in self._slots if s.idle_ready()]
        if not idle:
            return None
        # Runners a model's min_warm asks for go last.
        spare = [s for s in idle if self._live(s.key) > self._min_warm.get(s.key, 0)]
        victim = min(spare or idle, key=_last_used)
        self._slots.remove(victim)
        self._counts["evictions"] += 1
        return victim

    def _live(self, key: str) -> int:
        return sum(1 for s in self._slots if s.key == key)

    def _drop_dead(self) -> None:
        """An idle runner whose child died (OOM killer, crash) is dropped, not reused."""
        for s in list(self._slots):
            if s.leases or s.runner is None:
                continue
            if s.runner.state is not RunnerState.READY or not s.runner.is_alive():
                self._slots.remove(s)
                threading.Thread(target=_stop, args=(s,), daemon=True).start()

    # --- idle teardown and min_warm ------------------------------------------------------

    def set_min_warm(self, key: str, n: int) -> None:
        with self._cond:
            self._min_warm[key] = n

    def reap_idle(self) -> int:
        """Tear down runners idle longer than the TTL beyond each model's min_warm."""
        now = time.monotonic()
        victims: list[_Slot] = []
        with self._cond:
            self._drop_dead()
            for s in sorted(self._slots, key=_last_used):
                if not s.idle_ready() or now - _last_used(s) < self.config.idle_ttl_s:
                    continue
                if self._live(s.key) > self._min_warm.get(s.key, 0):
                    self._slots.remove(s)
                    victims.append(s)
            self._counts["reaped"] += len(victims)
            self._cond.notify_all()
        for s in victims:
            _stop(s)
        return len(victims)

    def fill_min_warm(self) -> int:
        """Start runners for models below their min_warm (bundle known from an acquire)."""
        started = 0
        for key, n in list(self._min_warm.items()):
            gpu = read_gpu_memory() if self._gpu_budgeted() else None
            estimate = self._sizes.get(key, 0)
            with self._cond:
                if self._live(key) >= n or key not in self._bundles:
                    continue
                if not self._has_room(estimate, gpu):
                    continue
                slot = _Slot(key, None, leases=1, estimate=estimate)
                self._slots.append(slot)
            self._start_into(slot, *self._bundles[key])
            self._checkin(slot)
            started += 1
        return started

    def start_reaper(self) -> None:
        self.refill_spares(wait=False)
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="pool-reaper", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            try:
                self.reap_idle()
                self.fill_min_warm()
            except Exception:  # the reaper must outlive one bad model
                log.exception("runner pool maintenance failed")

    def stats(self) -> PoolStats:
        with self._cond:
            ready = [s for s in self._slots if s.runner is not None]
            return PoolStats(
                warm_models=sorted({s.key for s in ready if s.runner and s.runner.is_alive()}),
                idle_models=sorted({s.key for s in self._slots if s.has_room()}),
                runners=len(self._slots),
                busy=sum(1 for s in self._slots if s.busy),
                inflight=sum(s.leases for s in self._slots),
                **self._counts,
            )

    def close(self) -> None:
        """Stop the reaper and every runner, busy ones included (the host is going away)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=10)
        with self._cond:
            slots, self._slots = self._slots, []
            self._cond.notify_all()
        for s in slots:
            _stop(s)
        with self._spare_lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            spare.stop()


def _last_used(slot: _Slot) -> float:
    return slot.runner.last_used if slot.runner is not None else time.monotonic()


def _stop(slot: _Slot) -> None:
    if slot.runner is not None:
        slot.runner.stop()
