"""Run one inference job: weight cache → warm or cold runner → tokens on the job's stream."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime
from functools import partial
from typing import Any

import redis
from sqlalchemy.exc import OperationalError

from core import batches, cluster_metrics, events, limits, sessions
from core.db import session_scope
from core.queue import BATCH_WEBHOOK_TASK, EMBED_OP, WEBHOOK_QUEUE, WEBHOOK_TASK, job_of_message
from core.redis import RELEASE_LUA, get_redis, release_lock
from core.settings import Settings
from core.storage import get_storage
from core.tables import Job, JobStatus, ModelFile, utcnow
from workers import jobs, validation
from workers.conversion import served, served_sha256
from workers.engines.base import ChatMessage, GenerateRequest, SamplingParams
from workers.jobs import JobContext, Terminal
from workers.pool import RunnerPool
from workers.runner.pipes import WakingEvent
from workers.runner.process import RunnerFatal, RunnerSetupFailed, RunnerTimeout
from workers.runner.protocol import Done, Token
from workers.weight_cache import CachedFile, WeightCache

log = logging.getLogger("inferatech.inference")
# Cancels are announced on a channel; the flags are read this often too, for the ones missed
# while the channel was down.
CANCEL_POLL_S = 1.0
RECENT_CANCELS = 4096
IDLE_LISTEN_S = 5.0  # how long the listener blocks while no job runs (it wakes for a cancel)
# Nobody streams a deferred job: its runner may hand tokens over in batches this far apart
# (a runner that dies mid-way then loses at most this much of the usage count).
COALESCE_MS = 50.0
# A streamed job's `running` status waits this long for its first token, to share its entry.
STATUS_HOLD_S = 0.05


# A streamed job's token publisher runs on a thread taken from this pool: starting a thread
# costs ~0.3 ms on a small VM, paid before the first token; a pooled one is handed work in
# microseconds. Threads are made only when none is idle, so the cap is a ceiling.
_job_threads = ThreadPoolExecutor(max_workers=256, thread_name_prefix="job-helper")


class CancelWatcher:
    """Every running job's cancel, heard by one thread per worker process.

    The thread listens on the cancel channel (`events.request_cancel` announces each cancel
    there), so a running job stops within a round trip of being cancelled, and costs nothing
    while nobody cancels. Cancels heard lately are remembered, so a job registered just after
    its cancel went by (between the start's flag check and `watch`) still sees it. The flags
    themselves are read every `poll_s` as well, all in one pipeline: a cancel announced while
    the thread was reconnecting is caught there. The thread sleeps while no job is registered
    and the channel is down.
    """

    def __init__(self, client: redis.Redis, poll_s: float = CANCEL_POLL_S) -> None:  # type: ignore[type-arg]
        self._client, self._poll_s = client, poll_s
        self._jobs: dict[str, WakingEvent] = {}
        self._heard: dict[str, None] = {}  # the latest RECENT_CANCELS cancels, oldest first
        self._lock = threading.Lock()
        self._busy = threading.Event()  # set while a job is registered
        self._thread: threading.Thread | None = None
        self._failing = False
        self._closed = False

    def watch(self, job_id: str) -> WakingEvent:
        """The event set once the job is cancelled; `forget` it when the job ends."""
        event = WakingEvent()  # the runner's waiting reader wakes for it
        with self._lock:
            self._jobs[job_id] = event
            if job_id in self._heard:
                event.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="cancel-watcher", daemon=True
                )
                self._thread.start()
        if not self._busy.is_set():
            self._busy.set()
        return event

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def close(self) -> None:
        """Stop listening (the thread ends within `IDLE_LISTEN_S`, closing its connection)."""
        with self._lock:
            self._closed = True
            self._busy.set()  # wakes a sleeping thread to see it

    def heard(self, job_id: str) -> None:
        """A cancel announced on the channel."""
        with self._lock:
            self._heard[job_id] = None
            if len(self._heard) > RECENT_CANCELS:
                del self._heard[next(iter(self._heard))]
            event = self._jobs.get(job_id)
        if event is not None:
            event.set()

    def poll(self) -> None:
        """One round trip for every registered job; sets the events of the cancelled ones."""
        with self._lock:
            watched = list(self._jobs.items())
        if not watched:
            return
        try:
            flags = events.cancels_requested(self._client, [job_id for job_id, _ in watched])
        except Exception:  # a Redis blip must not kill a generation; asked again next time
            self._failed(len(watched))
            return
        self._recovered()
        for (_, event), flag in zip(watched, flags, strict=True):
            if flag:
                event.set()

    def _failed(self, running: int) -> None:
        if not self._failing:  # once per outage, not ten lines a second
            log.warning("cancel checks failing for %d running jobs", running)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("cancel checks work again")
            self._failing = False

    def _loop(self) -> None:
        channel: Any = None  # the subscription, None while down
        next_poll: float | None = None  # None while no job is registered
        while not self._closed:
            with self._lock:
                if not self._jobs and not self._closed:
                    self._busy.clear()  # `watch` sets it after registering: nothing is lost
            if not self._busy.is_set():
                next_poll = None
                if channel is None:
                    self._busy.wait()
                    if self._closed:
                        break
            if self._busy.is_set() and next_poll is None:
                next_poll = time.monotonic() + self._poll_s  # a job shorter is never polled
            try:
                if channel is None:
                    channel = self._client.pubsub(ignore_subscribe_messages=True)
                    channel.subscribe(events.cancel_channel(self._client))
                    self._recovered()
                wait_s = IDLE_LISTEN_S
                if next_poll is not None:
                    wait_s = min(next_poll - time.monotonic(), wait_s)
                message = channel.get_message(timeout=max(wait_s, 0.0))
                while message is not None:
                    data = message["data"]
                    self.heard(data.decode() if isinstance(data, bytes) else str(data))
                    message = channel.get_message(timeout=0.0)
            except Exception:  # Redis down or restarting: tried again, the flags polled
                with contextlib.suppress(Exception):
                    channel.close()
                channel = None
                with self._lock:
                    running = len(self._jobs)
                if running:
                    self._failed(running)
                time.sleep(min(self._poll_s, 1.0))
            if next_poll is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self._poll_s
                self.poll()
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()


class Executor:
    """Per worker process: one runner pool and one weight cache, shared by task threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = get_redis(settings)
        self.storage = get_storage(settings)
        self.cache = WeightCache(
            settings.effective_weight_cache_dir, settings.weight_cache_budget_bytes
        )
        self.pool = RunnerPool(
            idle_ttl_s=settings.runner_idle_ttl_s,
            max_runners=settings.runner_max,
            memory_budget_bytes=settings.runner_memory_budget_bytes,
            device=settings.runner_device,
            threads=settings.runner_threads,
            spares=settings.runner_spares,
            gpu_memory_fraction=settings.runner_gpu_memory_fraction,
            gpu_runners_per_model=settings.runner_gpu_per_model,
            cpu_runners_per_model=settings.runner_cpu_per_model,
            batch=settings.runner_batch,
            gpu_batch=settings.runner_gpu_batch,
        )
        self.pool.start_reaper()
        self.cancels = CancelWatcher(self.redis)

    def close(self) -> None:
        """Tear down the runners and stop the cancel listener (tests; a worker just exits)."""
        self.cancels.close()
        self.pool.close()

    def cached_files(self, rows: list[ModelFile]) -> list[CachedFile]:
        return [
            CachedFile(
                f.path, f.sha256 or "", f.size_bytes, partial(self.storage.open_read, f.object_key)
            )
            for f in rows
        ]


_executor: Executor | None = None
_executor_lock = threading.Lock()


def executor_for(settings: Settings) -> Executor:
    """The process's executor, built on first use (after Celery forked or started threads)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = Executor(settings)
        return _executor


# How long a job's run lock outlives its execution timeout: more than a runner still
# computing past the timeout may take (`CANCEL_BUSY_MAX_S`).
LOCK_MARGIN_S = 30


def _ms(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds() * 1000, 3)


def request_of(params: dict[str, Any]) -> GenerateRequest:
    messages = params.get("messages")
    return GenerateRequest(
        prompt=params.get("prompt") or "",
        raw=bool(params.get("raw")),
        messages=None if messages is None else tuple(ChatMessage(**m) for m in messages),
        params=SamplingParams(
            max_tokens=params["max_tokens"],
            temperature=params["temperature"],
            top_p=params["top_p"],
            top_k=params["top_k"],
            stop=tuple(params.get("stop") or ()),
            seed=params.get("seed"),
        ),
    )


def run_job(
    job_id: str,
    ex: Executor,
    timeout_s: float | None = None,
    *,
    live: bool = True,
    carried: dict[str, Any] | None = None,
) -> str:
    """Idempotent by job id: a job already ended is skipped, a live one runs once at a time.

    `timeout_s` is the job's execution timeout as the API enqueued it (it sizes the lock
    before the job row is read); without it the longest allowed timeout is assumed. `live`
    False (nobody streams the job) publishes its tokens with the terminal event, at once.
    `carried`: the job as its task message holds it, its row not yet written (the claim
    writes it; for a job nobody streams, `jobs.finish` does, once it ended).
    """
    job = job_of_message(carried) if carried is not None else None
    # Outlives the runner's own timeout (and the most a runner still computing after it may
    # take, `CANCEL_BUSY_MAX_S`), so a redelivered copy of a dead worker's job can take over
    # soon after; while the first copy runs, the lock keeps the second out.
    lock_s = (timeout_s or ex.settings.max_execution_timeout_s) + LOCK_MARGIN_S
    lock = JobLock(ex, job_id, lock_s)  # asked for here, its reply read after any INSERT
    now = utcnow()
    # A job only its caller waits for is run before it has a row: `finish` writes it once,
    # ended. Any other carried job's row is inserted while the lock's reply is on its way.
    unsaved = job is not None and not live and not (job.expires_at and now > job.expires_at)
    fresh: jobs.Claim | Exception | None = None
    tried = job is not None and not unsaved  # `claim` need not try the INSERT again
    try:
        if tried:
            assert job is not None
            fresh = jobs.claim_fresh(ex.settings, job)
    except Exception as exc:
        fresh = exc
    finally:
        lock.settle()
    if unsaved and lock.ended:  # events on its stream: a copy ended it (or began to)
        unsaved = False  # so the database says what happened, as for any other job
    elif unsaved and lock.held and not lock.cancelled:
        assert job is not None
        try:
            fresh = jobs.claim_unsaved(ex.settings, job)
        except Exception as exc:  # the model's rows could not be read
            fresh = exc
    if lock.cancelled:
        try:
            claimed = isinstance(fresh, jobs.Claim) and fresh.ctx is not None and not fresh.expired
            if lock.held and claimed:  # its fresh claim only: it never started
                jobs.unclaim(ex.settings, job_id)
            ctx = jobs.load(ex.settings, job_id, job)
            if ctx is None or ctx.job.status not in jobs.LIVE:
                return "skipped"
            cancelled = Terminal(
                JobStatus.CANCELLED,
                error_code="JOB_CANCELLED",
                error_message="cancelled before it started",
            )
            return _end(ex, ctx, cancelled, lock=lock)
        finally:
            lock.release()
    if not lock.held:
        return "busy"
    try:
        try:
            if isinstance(fresh, Exception):
                raise fresh
            claim = fresh or jobs.claim(ex.settings, job_id, job, fresh_tried=tried)
        except Exception as exc:
            if job is None:
                raise
            # Nothing recorded it: answer the caller waiting on the stream, free what it holds.
            return _end_unrecorded(ex, job, exc, "claim")
        ctx = claim.ctx
        if ctx is None:
            return "skipped"
        if claim.expired:
            expired = Terminal(
                JobStatus.TIMED_OUT,
                error_code="TIMEOUT",
                error_message="the job's TTL expired before it ran",
            )
            return _end(ex, ctx, expired, lock=lock)
        try:
            queue_ms = _ms(ctx.job.created_at, now)
            end, publisher = _execute(ex, ctx, queue_ms=queue_ms, live=live)
        except Exception:
            # Never leave a client waiting on a job that cannot end: fail it, then re-raise.
            log.exception("job %s crashed in the worker", job_id)
            _end(
                ex,
                ctx,
                Terminal(
                    JobStatus.FAILED,
                    error_code="INTERNAL_ERROR",
                    error_message="the worker failed; quote the job id",
                ),
                lock=lock,
            )
            raise
        try:
            return _end(ex, ctx, end, publisher, lock=lock)
        except Exception as exc:
            if not ctx.unsaved:
                raise
            # Ran, but nothing recorded it: like a claim that failed, the caller is answered
            # and what it holds is freed; its tokens are not billed, and not delivered.
            return _end_unrecorded(ex, ctx.job, exc, "record")
    finally:
        lock.release()


class JobLock:
    """The job's run lock, its cancel flag and whether its stream has events, asked for in
    one round trip as the task starts.

    Held (SET NX with an expiry) while the job runs; released only by its holder. The
    request goes out at once and its reply is read by `settle`, so the round trip overlaps
    the claim's INSERT (`jobs.claim_fresh`, safe before the lock is known). `ended`: the
    job's stream exists, so a job that publishes nothing until its end has ended before.
    """

    def __init__(self, ex: Executor, job_id: str, timeout_s: float) -> None:
        self._client, self._name = ex.redis, events.run_lock_key(job_id)
        self._token, self._cancel = uuid.uuid4().hex, events.cancel_key(job_id)
        self._stream = events.stream_key(job_id)
        self._px = int(timeout_s * 1000)
        self.cancelled = self.held = self.ended = False
        self._conn: redis.connection.AbstractConnection | None = None
        pool = self._client.connection_pool
        try:
            conn = pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return  # Redis is down or restarting: `settle` asks with the client's retries
        try:
            # GET reads who holds it: asked again after a broken connection, the answer holds.
            commands = [
                ("EXISTS", self._cancel),
                ("SET", self._name, self._token, "NX", "PX", self._px),
                ("GET", self._name),
                ("EXISTS", self._stream),
            ]
            conn.send_packed_command(conn.pack_commands(commands))
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            conn.disconnect()  # `settle` asks again, with the client's retries
            pool.release(conn)
            return
        except BaseException:
            pool.release(conn)
            raise
        self._conn = conn

    def settle(self) -> None:
        """Read the replies into `cancelled` and `held`."""
        replies: list[Any] | None = None
        if (conn := self._conn) is not None:
            self._conn = None
            try:
                replies = [conn.read_response() for _ in range(4)]
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                conn.disconnect()  # a restarted Redis: asked again below
            except BaseException:
                conn.disconnect()  # replies left unread: never reuse the connection
                raise
            finally:
                self._client.connection_pool.release(conn)
        if replies is None:
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(self._cancel)
            pipe.set(self._name, self._token, nx=True, px=self._px)
            pipe.get(self._name)
            pipe.exists(self._stream)
            replies = pipe.execute()
        cancelled, _, holder, ended = replies
        self.cancelled, self.ended = bool(cancelled), bool(ended)
        self.held = holder in (self._token, self._token.encode())

    def release(self) -> None:
        if self.held:
            release_lock(self._client, self._name, self._token)
            self.held = False

    def queue_release(self, pipe: redis.client.Pipeline) -> None:  # type: ignore[type-arg]
        """Release on the end-of-job pipeline (one round trip less); call `released` once
        it ran, or `release` retries."""
        if self.held:
            pipe.eval(RELEASE_LUA, 1, self._name, self._token)

    def released(self) -> None:
        self.held = False


def _execute(
    ex: Executor, ctx: JobContext, *, queue_ms: float, live: bool = True
) -> tuple[Terminal, TokenPublisher]:
    """The run's terminal state, and its publisher still flushing (`_end` joins it)."""
    job = ctx.job
    timings: dict[str, Any] = {"queue_ms": queue_ms}
    started = time.perf_counter()
    texts: list[str] = []  # pieces streamed so far: usage of a job whose runner died mid-way
    publisher = TokenPublisher(ex, job.id, live=live)
    try:
        return _run(ex, ctx, publisher, timings, started, texts), publisher
    except BaseException:
        publisher.close()
        raise


def _run(
    ex: Executor,
    ctx: JobContext,
    publisher: TokenPublisher,
    timings: dict[str, Any],
    started: float,
    texts: list[str],
) -> Terminal:
    queue_ms = timings["queue_ms"]
    try:
        model = ctx.model
        if validation.needs_conversion(ctx.files):  # ready before conversion existed
            ctx.files = validation.convert_legacy(model.id, ex.settings) or ctx.files
            jobs.forget_model(model.id)  # the next job reads the converted rows
        # The cache holds the served bundle (converted safetensors, never a pickle) under its
        # own digest; runners stay keyed by the model's digest, which API routing knows.
        files = served(ctx.files)
        with (
            ex.cache.use(served_sha256(files), ex.cached_files(files)) as bundle,
            ex.pool.acquire(model.sha256 or "", bundle, model.format or "") as (
                runner,
                cold,
                cold_ms,
            ),
        ):
            timings["cold_start_ms"] = round(cold_ms, 3) if cold else 0.0
            status = {"type": "status", "status": "running", "queue_ms": queue_ms}
            publisher.put({**status, "cold_start": cold})
            if ctx.job.params.get("op") == EMBED_OP:
                return _embed(ex, ctx, runner, publisher, timings, started)
            done = _generate(ex, ctx, runner, publisher, timings, started, texts)
    except RunnerSetupFailed as exc:
        return Terminal(
            JobStatus.FAILED, error_code="LOAD_FAILED", error_message=str(exc), timings=timings
        )
    except RunnerTimeout as exc:
        return Terminal(
            JobStatus.TIMED_OUT,
            error_code="TIMEOUT",
            error_message=str(exc),
            completion_tokens=len(texts),
            timings=timings,
        )
    except RunnerFatal as exc:
        return Terminal(
            JobStatus.FAILED,
            error_code="INFERENCE_FAILED",
            error_message=f"the runner died: {exc}",
            completion_tokens=len(texts),
            timings=timings,
        )
    timings["run_ms"] = round((time.perf_counter() - started) * 1000 - timings["cold_start_ms"], 3)
    return _terminal_of(done, timings, "".join(texts))


def _embed(
    ex: Executor,
    ctx: JobContext,
    runner: Any,
    publisher: TokenPublisher,
    timings: dict[str, Any],
    started: float,
) -> Terminal:
    """An embedding job: the vectors travel with the terminal event, not as tokens."""
    job = ctx.job
    remaining = job.execution_timeout_s - (time.perf_counter() - started)
    try:
        vectors, done = runner.embed(
            job.params["input"],
            job.id,
            timeout=max(remaining, 1.0),
            cancel_event=ex.cancels.watch(job.id),
        )
    finally:
        ex.cancels.forget(job.id)
        publisher.end()
    timings["run_ms"] = round((time.perf_counter() - started) * 1000 - timings["cold_start_ms"], 3)
    end = _terminal_of(done, timings, "")
    if end.status is JobStatus.SUCCEEDED:
        if not all(math.isfinite(x) for v in vectors for x in v):
            end.status, end.error_code = JobStatus.FAILED, "INFERENCE_FAILED"
            end.error_message, end.result = "the model produced non-finite embeddings", None
            end.prompt_tokens = 0
        else:
            end.vectors = vectors
    return end


def _generate(
    ex: Executor,
    ctx: JobContext,
    runner: Any,
    publisher: TokenPublisher,
    timings: dict[str, Any],
    started: float,
    texts: list[str],
) -> Done:
    job = ctx.job
    cancel = ex.cancels.watch(job.id)

    def on_token(tok: Token) -> None:
        if not texts:  # from the job's creation, as its client sees it
            since_start_ms = (time.perf_counter() - started) * 1000
            timings["first_token_ms"] = round(timings["queue_ms"] + since_start_ms, 3)
        texts.append(tok.text)
        publisher.put({"type": "token", "text": tok.text, "index": tok.index})

    remaining = job.execution_timeout_s - (time.perf_counter() - started)
    try:
        done: Done = runner.generate(
            request_of(job.params),
            job.id,
            on_token,
            timeout=max(remaining, 1.0),
            cancel_event=cancel,
            coalesce_ms=0.0 if publisher.live else COALESCE_MS,
        )
        return done
    finally:
        ex.cancels.forget(job.id)
        publisher.end()  # flushes while the terminal state commits; `_end` joins it


class TokenPublisher:
    """Publishes a running job's events (status, tokens) to its stream.

    Live (someone may be streaming): the `running` status is held for the first token, and
    the two go out in one round trip from the thread that put the token (so the API answers
    headers and first token in one wake-up); a slow prefill's status goes alone after
    `STATUS_HOLD_S`. Later tokens go out from the publisher's own thread, one pipeline per
    backlog: a lone token at once, tokens that arrive faster than Redis round trips batched.
    Deferred (a non-streaming `/v1/infer`, whose caller reads only the end): events are held
    and go out with the terminal event in one round trip, so no per-token traffic at all.
    """

    def __init__(self, ex: Executor, job_id: str, *, live: bool = True) -> None:
        self._ex, self._job_id, self.live = ex, job_id, live
        self._held: list[dict[str, Any]] = []
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._flushing: Future[None] | None = None
        # The held status and when the publisher's thread sends it alone; whoever takes it
        # (under the lock) sends it before anything else.
        self._status: dict[str, Any] | None = None
        self._status_due, self._status_taken = 0.0, False
        self._status_lock = threading.Lock()
        if live:
            self._flushing = _job_threads.submit(self._run)

    def put(self, event: dict[str, Any]) -> None:
        if not self.live:
            self._held.append(event)
        elif event.get("type") == "status":
            with self._status_lock:  # no wake-up for the thread: it looks again in time
                self._status, self._status_due = event, time.monotonic() + STATUS_HOLD_S
        elif (status := self._take_status()) is not None:
            # The first token, sent here rather than handed to the publisher's thread: that
            # hand-off waited for the GIL behind this thread, which takes the next tokens
            # (~1 ms of the time to first token on a 2-vCPU host).
            self._publish([status, event])
        else:
            self._queue.put(event)

    def end(self) -> None:
        """No more events; a live publisher flushes what is queued and exits."""
        if self._flushing is not None:
            self._queue.put(None)

    def close(self) -> list[dict[str, Any]]:
        """End, wait until every live event is on the stream; returns the held ones."""
        self.end()
        if self._flushing is not None:
            wait([self._flushing])  # its own failures are logged there, never raised here
        held, self._held = self._held, []
        return held

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=self._hold_left())]
            except queue.Empty:  # a slow prefill: the status goes alone, for the headers
                if (status := self._take_status(due_only=True)) is not None:
                    self._publish([status])
                continue
            self._drain(batch)
            ready = [e for e in batch if e is not None]
            if (status := self._take_status()) is not None:  # before anything after it
                ready.insert(0, status)
            if ready:
                self._publish(ready)
            if batch[-1] is None:
                return

    def _hold_left(self) -> float | None:
        """How long the thread may wait for an event: until a held status is due, or (none
        put yet) a hold's length, then it looks again; once taken, without end."""
        with self._status_lock:
            if self._status_taken:
                return None
            if self._status is None:
                return STATUS_HOLD_S
            return max(0.0, self._status_due - time.monotonic())

    def _take_status(self, *, due_only: bool = False) -> dict[str, Any] | None:
        """The held status, now taken; `due_only`: only once its hold has run out."""
        with self._status_lock:
            status = self._status
            if status is None or (due_only and time.monotonic() < self._status_due):
                return None
            self._status, self._status_taken = None, True
            return status

    def _publish(self, ready: list[dict[str, Any]]) -> None:
        try:
            events.publish_many(self._ex.redis, self._job_id, ready)
        except Exception:  # a Redis blip loses stream events, never the job
            log.warning("could not publish %d token events of %s", len(ready), self._job_id)

    def _drain(self, batch: list[dict[str, Any] | None]) -> None:
        """Append what is queued already, up to the end marker."""
        while not self._queue.empty() and batch[-1] is not None:
            batch.append(self._queue.get_nowait())


def _terminal_of(done: Done, timings: dict[str, Any], text: str) -> Terminal:
    timings["engine_ms"] = round(done.engine_ms, 3)
    end = Terminal(
        JobStatus.SUCCEEDED,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        timings=timings,
    )
    if not done.error and done.finish_reason != "cancelled":
        end.result = {"finish_reason": done.finish_reason, "completion": text}
    elif done.code == "TIMEOUT":
        end.status, end.error_code = JobStatus.TIMED_OUT, "TIMEOUT"
        end.error_message = done.detail or "execution timeout reached"
    elif done.finish_reason == "cancelled" or done.code == "JOB_CANCELLED":
        end.status, end.error_code = JobStatus.CANCELLED, "JOB_CANCELLED"
        end.error_message = "cancelled while running"
    else:
        end.status = JobStatus.FAILED
        end.error_code, end.error_message = done.code or "INFERENCE_FAILED", done.detail
    return end


def _seconds(timings: dict[str, Any], name: str) -> float | None:
    value = timings.get(name)
    return value / 1000 if isinstance(value, int | float) else None


def _metrics_of(ctx: JobContext, end: Terminal) -> cluster_metrics.JobMetrics:
    t = end.timings
    cold = _seconds(t, "cold_start_ms")
    return cluster_metrics.JobMetrics(
        model_id=ctx.job.model_id,
        status=end.status.value,
        prompt_tokens=end.prompt_tokens,
        completion_tokens=end.completion_tokens,
        queue_s=_seconds(t, "queue_ms"),
        cold_start_s=cold if cold else None,  # 0.0: a warm runner, not a cold start
        first_token_s=_seconds(t, "first_token_ms"),
        duration_s=(utcnow() - ctx.job.created_at).total_seconds(),
    )


def _log_fields(ctx: JobContext, end: Terminal) -> dict[str, Any]:
    """Ids, counts and timings of an ended job; its text only for a key minted to log it."""
    fields: dict[str, Any] = {
        "job_id": ctx.job.id,
        "model_id": ctx.job.model_id,
        "status": end.status.value,
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "error_code": end.error_code,
    }
    for name in ("queue_ms", "cold_start_ms", "first_token_ms", "run_ms"):
        fields[name] = end.timings.get(name)
    if ctx.log_payloads:  # `log_payloads` on the key: an owner debugging their own traffic
        params = ctx.job.params
        fields["prompt"] = params.get("messages") or params.get("prompt") or params.get("input")
        fields["completion"] = (end.result or {}).get("completion")
    return fields


def _end(
    ex: Executor,
    ctx: JobContext,
    end: Terminal,
    publisher: TokenPublisher | None = None,
    *,
    lock: JobLock | None = None,
) -> str:
    held: list[dict[str, Any]] = []
    try:
        finished = jobs.finish(ex.settings, ctx, end)
    finally:
        if publisher is not None:
            held = publisher.close()  # every token is on the stream before the terminal event
    pipe = _ending_pipeline(ex)
    if not finished:  # another copy recorded the end: free the slot (no second debit)
        if ctx.job.api_key_id:
            limits.queue_settle(pipe, key_id=ctx.job.api_key_id, job_id=ctx.job.id, tokens=0,
                                now=utcnow())  # fmt: skip
        events.queue_events(pipe, ctx.job.id, events.batched(held))
        _execute_ending(pipe, lock)
        return "skipped"
    _queue_ending(pipe, ctx.job, end, held)
    pipe.execute()  # the answer
    # What nobody waits for goes after it: the job's metrics script (~0.3 ms of Redis time
    # here) and the run lock's release.
    after = ex.redis.pipeline(transaction=False)
    cluster_metrics.record_job(after, _metrics_of(ctx, end))
    _execute_ending(after, lock)
    log.info("job ended", extra=_log_fields(ctx, end))
    if ctx.job.webhook_url:
        from workers.celery_app import app

        app.send_task(WEBHOOK_TASK, args=[ctx.job.id], queue=WEBHOOK_QUEUE)
    if ctx.job.batch_id is not None:
        _close_batch(ex, ctx.job.batch_id)
    return end.status.value


def _ending_pipeline(ex: Executor) -> redis.client.Pipeline:  # type: ignore[type-arg]
    """MULTI/EXEC: Redis wakes a reader blocked on the job's stream once, after the whole
    ending (held tokens, terminal event), so the API reads it in one XREAD. Without it the
    reader woke on the first entry and paid a second round trip for the rest."""
    return ex.redis.pipeline(transaction=True)


def _execute_ending(pipe: redis.client.Pipeline, lock: JobLock | None) -> None:  # type: ignore[type-arg]
    """Run the end-of-job pipeline; the run lock goes last (a later copy finds the end first)."""
    if lock is not None:
        lock.queue_release(pipe)
    pipe.execute()
    if lock is not None:
        lock.released()


def _queue_ending(
    pipe: redis.client.Pipeline,  # type: ignore[type-arg]
    job: Job,
    end: Terminal,
    held: list[dict[str, Any]] | None = None,
) -> None:
    """A recorded end, on the end-of-job pipeline: the key's debit and slot, the session's
    turn and lock, then the held tokens and the terminal event.

    Debited here, not by the API: only the worker sees every job end exactly once (`finish`),
    a client that hung up or never waited (`/v1/jobs`) included. Before the terminal event, so
    a caller's next request already sees the debit.
    """
    if job.api_key_id:
        tokens = end.prompt_tokens + end.completion_tokens
        limits.queue_settle(pipe, key_id=job.api_key_id, job_id=job.id, tokens=tokens,
                            now=utcnow())  # fmt: skip
    if session := job.params.get("session"):  # chain mode: the turn, before the answer
        succeeded = end.status is JobStatus.SUCCEEDED and end.result is not None
        sessions.queue_turn(
            pipe,
            session,
            job.id,
            completion=str(end.result["completion"]) if succeeded and end.result else None,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
        )
    events.queue_events(pipe, job.id, [*events.batched(held or []), end.event()])


def _end_unrecorded(ex: Executor, job: Job, exc: Exception, doing: str) -> str:
    """A carried job whose row could not be written (`exc`, while `doing` it): its caller is
    answered `failed`, and the database's outage named as such."""
    log.exception("could not %s job %s", doing, job.id)
    end = Terminal(JobStatus.FAILED)
    if isinstance(exc, OperationalError):
        end.error_code, end.error_message = "SERVICE_UNAVAILABLE", "the database is down; retry"
    else:
        end.error_code, end.error_message = "INTERNAL_ERROR", "the worker failed; quote the job id"
    pipe = _ending_pipeline(ex)
    _queue_ending(pipe, job, end)
    pipe.execute()
    return JobStatus.FAILED.value


def _close_batch(ex: Executor, batch_id: str) -> None:
    """The batch's last job to end closes it (after its own commit) and queues its webhook."""
    with session_scope(ex.settings) as s:
        closed = batches.close_if_done(s, batch_id)
    if closed is not None and closed.webhook_url:
        from workers.celery_app import app

        app.send_task(BATCH_WEBHOOK_TASK, args=[batch_id], queue=WEBHOOK_QUEUE)
