"""Continuous batching for GGUF: several requests decode together in one llama.cpp context.

One runner then serves `parallel` requests at once: every step decodes one token of each
running sequence (plus prompt tokens of newly admitted ones) in a single `llama_decode`, so
on a GPU four requests cost about one forward pass instead of four queued ones. Each
sequence has its own KV stream (`seq_id` = its slot), its own sampler chain (from
`Llama._init_sampler`, as `Llama.generate` builds it, so a greedy or seeded request decodes
as it would alone) and its own `TokenStream` (limits, stop strings, counts, exactly as
every other engine).

Each slot has a KV stream of one whole context (`kv_unified=False`): KV memory is
`parallel` contexts. One shared (unified) cache would be smaller, but it moved the logits
of every sequence but the first by about 1.5 % of their range on a Q8_0 model (measured
here: identical greedy prompts decoded together then gave different texts); separate
streams give each sequence exactly the logits it gets alone.

A slot keeps the tokens its stream holds after a request ends; the next request that
starts with the same tokens (a shared system prompt, a repeated prompt) reuses them.

Batched decoding is not batch-invariant everywhere. On an H100 (CUDA), a request decoded
beside others that join and leave gave a different greedy text from the same request alone
on a random-weight Q8_0 model (210 of 307 requests at concurrency 4): kernels picked by the
shape of each step round differently, and near-tied logits tip. Identical requests admitted
together, and one request alone in the batcher, matched. So on CUDA a request with a seed
decodes alone (`solo_seeded`: the runner's loop admits nothing beside it), as it evaluates
its whole prompt: a seed promises the same text every time. On CPU one engine thread gave
exact texts in every mix (tested); several threads did not always, which is one reason CPU
hosts do not batch by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.engines.base import EngineError, GenerateRequest, resolve_seed
from workers.engines.llama import LlamaEngine, _ByteDecoder, _log_tail, sampler_options
from workers.engines.loop import TokenStream, check_context


@dataclass(eq=False)
class Sequence:
    """One request in the batch. `owner` is the caller's handle for it."""

    owner: Any
    slot: int
    stream: TokenStream
    sampler: Any
    cancelled: Callable[[], bool]
    pending: list[int]  # tokens to decode next: the prompt's uncached tail, then the last sample
    pos: int  # the KV position of pending[0]
    prefilled: bool = False  # its whole prompt has been decoded
    pieces: list[str] = field(default_factory=list)  # text produced by the last step


class DecodeFailed(EngineError):
    """`llama_decode` failed: every sequence of the batch ended with it (`sequences`)."""

    def __init__(self, detail: str, sequences: list[Sequence]) -> None:
        super().__init__(detail)
        self.sequences = sequences


class BatchFull(Exception):
    """Every slot is decoding: admit the request after a sequence ends."""


class LlamaBatcher:
    """Decodes up to `parallel` sequences per step. Single-threaded: one caller drives it."""

    def __init__(self, engine: LlamaEngine, ctx: Any, parallel: int, n_batch: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.engine = engine
        self.parallel = parallel
        self._ctx = ctx  # a LlamaContext with n_seq_max = parallel, one KV stream per slot
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._cached: list[list[int]] = [[] for _ in range(parallel)]  # KV contents per slot
        self._free = list(range(parallel))
        self.active: list[Sequence] = []
        # A seeded request must decode as it would alone: on CUDA that means alone (see above).
        self.solo_seeded = engine.device == "cuda"

    def close(self) -> None:
        for seq in self.active:
            seq.sampler.close()
        self.active = []
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()

    @property
    def full(self) -> bool:
        return not self._free

    def admit(
        self, request: GenerateRequest, cancelled: Callable[[], bool], owner: Any
    ) -> Sequence:
        """Start a request (raises ContextLengthExceeded, EngineError, BatchFull)."""
        if not self._free:
            raise BatchFull
        engine = self.engine
        ids = engine._encode(request)
        room = check_context(len(ids), engine.context_length)
        params = request.params
        stream = TokenStream(_ByteDecoder(engine._piece), engine._is_eog, params, len(ids), room)
        slot, reuse = self._best_slot(ids, self.solo(params.seed))
        self._free.remove(slot)
        if not self._lib.llama_memory_seq_rm(self._memory, slot, reuse, -1):
            reuse = 0  # a partial removal can fail: start the slot over
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._cached[slot] = ids[:reuse]
        # The chain `Llama.generate` builds, from the seed set here (`_init_sampler` reads it).
        engine.llm.set_seed(resolve_seed(params.seed) & 0xFFFFFFFF)
        sampler = engine.llm._init_sampler(**sampler_options(params))
        seq = Sequence(owner, slot, stream, sampler, cancelled, ids[reuse:], reuse)
        self.active.append(seq)
        if stream.result is not None:  # nothing to generate (no room or max_tokens 0)
            self._end(seq)
        return seq

    def solo(self, seed: int | None) -> bool:
        """Whether a request with this seed must decode with no other sequence in the batch,
        its whole prompt evaluated (a seeded request on CUDA)."""
        return self.solo_seeded and seed is not None

    def _best_slot(self, ids: list[int], whole_prompt: bool) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with the prompt.

        At least the prompt's last token is decoded again: its logits give the first sample.
        A seeded request on CUDA takes no prefix (as `LlamaEngine.generate`).
        """
        best, best_len = self._free[0], -1
        for slot in self._free:
            common = 0
            for a, b in zip(self._cached[slot], ids, strict=False):
                if a != b:
                    break
                common += 1
            if common > best_len:
                best, best_len = slot, common
        reuse = 0 if whole_prompt else min(best_len, len(ids) - 1)
        return best, max(reuse, 0)

    def step(self) -> list[Sequence]:
        """One decode over every active sequence; returns those that produced text or ended.

        A sequence that ended (`seq.stream.result` set) has left the batch. An EngineError
        `DecodeFailed` ends every active sequence: the caller fails them all.
        """
        touched: list[Sequence] = []
        for seq in list(self.active):
            if seq.cancelled():
                seq.pieces.append(seq.stream.finish("cancelled"))
                self._end(seq)
                touched.append(seq)
        if not self.active:
            return touched
        sampled = self._fill()
        code = self._lib.llama_decode(self._ctx.ctx, self._batch)
        if code != 0:
            failed = list(self.active)
            for seq in failed:
                self._end(seq)
                self._cached[seq.slot] = []
                self._lib.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)
            raise DecodeFailed(f"llama.cpp could not decode (code {code}): {_log_tail()}", failed)
        for seq, index in sampled:
            token = int(self._lib.llama_sampler_sample(seq.sampler.sampler, self._ctx.ctx, index))
            seq.pieces.append(seq.stream.push(token))
            if seq.stream.result is None:
                seq.pending = [token]
            else:
                self._end(seq)
            touched.append(seq)
        return touched

    def _fill(self) -> list[tuple[Sequence, int]]:
        """Put every decoding sequence's token, then prompt tokens up to n_batch, in the batch.

        Returns the sequences whose logits the step samples, with their index in the batch.
        """
        batch = self._batch
        n, sampled = 0, []
        # Decoding sequences first (one token each), so a long prompt never stalls them.
        order = sorted(self.active, key=lambda s: not s.prefilled)
        for seq in order:
            room = self._n_batch - n
            if room <= 0:
                break
            take = seq.pending[:room]
            for offset, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = seq.pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = 0
                n += 1
            seq.pos += len(take)
            self._cached[seq.slot].extend(take)
            del seq.pending[: len(take)]
            if not seq.pending:  # its last token is in: sample from its logits
                batch.logits[n - 1] = 1
                seq.prefilled = True
                sampled.append((seq, n - 1))
        batch.n_tokens = n
        return sampled

    def _end(self, seq: Sequence) -> None:
        seq.sampler.close()
        self.active.remove(seq)
        self._free.append(seq.slot)


def batch_context(engine: LlamaEngine, parallel: int, n_batch: int) -> Any:
    """A context beside the engine's own: `parallel` KV streams of its context length each."""
    import llama_cpp
    from llama_cpp._internals import LlamaContext

    llm = engine.llm
    params = llama_cpp.llama_context_default_params()
    source = llm.context_params
    for name in (
        "n_threads",
        "n_threads_batch",
        "type_k",
        "type_v",
        "offload_kqv",
        "flash_attn_type",
    ):
        if hasattr(source, name):
            setattr(params, name, getattr(source, name))
    params.n_ctx = engine.context_length * parallel
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = parallel
    params.kv_unified = False  # a stream per slot: each sequence's logits as if alone
    params.no_perf = True
    try:
        return LlamaContext(model=llm._model, params=params, verbose=False)
    except ValueError as exc:
        raise EngineError(
            f"llama.cpp could not make a batch context: {_log_tail() or exc}"
        ) from exc
