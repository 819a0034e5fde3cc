"""The runner child's loop when its engine batches: many requests in flight, one decode loop.

The stdin reader queues requests as the sequential `Server` does; this loop admits them into
the batcher between decode steps (a request never waits for another to finish while a slot
is free), writes each sequence's text as its step produces it, and one `Done` per request
when it ends. An embedding request runs between two steps.

Requests are admitted in arrival order. One the batcher says must decode alone (`solo`: a
seeded request on CUDA) waits until every sequence ahead of it has ended, and nothing is
admitted beside it until it ends.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.engines.base import Engine
from workers.engines.llama_batch import DecodeFailed, LlamaBatcher, Sequence
from workers.runner.child import EventWriter, Server, TokenSink, _failed, generate_request
from workers.runner.protocol import Done, Embed, Generate, Lines, Request


@dataclass(eq=False)
class _InFlight:
    request: Generate
    sink: TokenSink
    started: float
    solo: bool = False


class BatchServer(Server):
    """`Server` whose generations share the batcher's steps."""

    def __init__(
        self, batcher: LlamaBatcher, engine: Engine, out: EventWriter, stdin: Lines
    ) -> None:
        super().__init__(engine, out, stdin)
        self.batcher = batcher
        self.parallel = batcher.parallel
        self.backlog: collections.deque[Generate] = collections.deque()

    def cancel_check(self, tag: str) -> Callable[[], bool]:
        """The reader thread notes cancels: this thread must not read stdin itself."""
        return functools.partial(self._is_cancelled, tag)

    def serve(self) -> None:
        threading.Thread(target=self.read_loop, name="runner-stdin", daemon=True).start()
        try:
            while self._take_requests():
                self._admit_backlog()
                self._step()
            while self.batcher.active:  # stopping: every sequence ends as cancelled
                self._step()
        finally:
            self.batcher.close()

    def _take_requests(self) -> bool:
        """Queue what arrived; block only when nothing is decoding. False at Shutdown/EOF."""
        block = not self.batcher.active and not self.backlog
        while True:
            try:
                request = self.requests.get(block=block)
            except queue.Empty:
                return True
            if request is None:
                return False
            self._accept(request)
            block = False

    def _accept(self, request: Request) -> None:
        if isinstance(request, Embed):
            self.out.send(self.embed(request))
            self.cancelled.discard(request.tag)
        else:
            self.backlog.append(request)

    def _admit_backlog(self) -> None:
        while self.backlog and not self.batcher.full:
            g = self.backlog[0]
            solo = self.batcher.solo(g.seed)
            if self.batcher.active and (solo or any(s.owner.solo for s in self.batcher.active)):
                return  # a solo request waits for the batch to drain; nothing overtakes it
            self.backlog.popleft()
            started = time.perf_counter()
            sink = TokenSink(self.out, g.tag, g.coalesce_ms)
            try:
                request = generate_request(g)
                cancelled = functools.partial(self._is_cancelled, g.tag)
                seq = self.batcher.admit(request, cancelled, _InFlight(g, sink, started, solo))
            except Exception as exc:
                self._finish(g.tag, _failed(g.tag, exc, started))
                continue
            if seq.stream.result is not None:
                self._report(seq.owner, seq)

    def _step(self) -> None:
        if not self.batcher.active:
            return
        try:
            touched = self.batcher.step()
        except DecodeFailed as exc:
            for seq in exc.sequences:
                owner: _InFlight = seq.owner
                owner.sink.flush()
                self._finish(owner.request.tag, _failed(owner.request.tag, exc, owner.started))
            return
        for seq in touched:
            self._report(seq.owner, seq)

    def _report(self, owner: _InFlight, seq: Sequence) -> None:
        for piece in seq.pieces:
            if piece:
                owner.sink.add(piece)
        seq.pieces.clear()
        result = seq.stream.result
        if result is None:
            return
        owner.sink.flush()
        done = Done(
            tag=owner.request.tag,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            engine_ms=(time.perf_counter() - owner.started) * 1000,
        )
        self._finish(owner.request.tag, done)

    def _finish(self, tag: str, done: Done) -> None:
        self.out.send(done)
        self.cancelled.discard(tag)
