"""GGUF engine: llama-cpp-python, with our own tokenisation, template, stops and counts."""

from __future__ import annotations

import codecs
import ctypes
import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.engines.base import (
    Cancelled,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    GenerateRequest,
    GenerationResult,
    SamplingParams,
    never,
    resolve_seed,
)
from workers.engines.chat import ChatTemplate, prompt_text
from workers.engines.loop import check_context, prefill, prefill_chunk, stream_tokens

if TYPE_CHECKING:
    from workers.engines.llama_batch import LlamaBatcher

_LOG_LINES: deque[str] = deque(maxlen=40)
_LOG_LOCK = threading.Lock()
_log_callback: Any = None  # kept referenced: llama.cpp holds a raw pointer to it
# enum ggml_log_level in the bundled llama.cpp: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_KEPT_LEVELS = frozenset({3, 4, 5})


def _install_log_capture() -> None:
    """Keep llama.cpp's warnings and errors (verbose=False hides why a load failed)."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    def capture(level: int, text: bytes, _user: Any) -> None:
        if level in _KEPT_LEVELS and text:
            with _LOG_LOCK:
                _LOG_LINES.append(text.decode("utf-8", "replace").rstrip("\n"))

    _log_callback = llama_cpp.llama_log_callback(capture)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


# ggml's AMX weight buffers (picked for Q8_0/Q4_x matrices on CPUs with AMX, such as Sapphire
# Rapids) crash the bundled llama.cpp with SIGSEGV at the first decode: measured here with a
# Q8_0 model that generates fine on hosts without AMX. On such hosts weights stay in plain CPU
# buffers (no extra buffer types: no AMX and no runtime repacking).
CPUINFO = Path("/proc/cpuinfo")


def host_has_amx(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU advertises AMX (the `amx_int8` flag ggml's AMX kernels use)."""
    try:
        with cpuinfo.open() as f:
            return any(line.startswith("flags") and " amx_int8" in line for line in f)
    except OSError:
        return False


_amx_guard_installed = False


def avoid_extra_buffers() -> None:
    """Make every later `Llama(...)` in this process load without ggml's extra buffer types.

    `Llama` builds its model parameters from `llama_model_default_params()` and has no
    argument for `use_extra_bufts`, so the defaults it reads are wrapped (once per process).
    """
    global _amx_guard_installed
    if _amx_guard_installed:
        return
    import llama_cpp.llama_cpp as low_level  # the module `llama_cpp.llama` reads it from

    defaults = low_level.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    setattr(low_level, "llama_model_default_params", without_extra_buffers)  # noqa: B010
    _amx_guard_installed = True


def _log_tail() -> str:
    with _LOG_LOCK:
        lines = [line.strip() for line in _LOG_LINES if line.strip()]
        _LOG_LINES.clear()
    return "; ".join(lines[-4:])


class _ByteDecoder:
    """Token pieces are raw bytes in llama.cpp: decode UTF-8 incrementally across them."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class LlamaEngine:
    """A GGUF model in llama.cpp; sampling is llama.cpp's own sampler chain.

    Embeddings need a context created with `embedding=True` (llama-cpp-python refuses
    `embed` otherwise, and pooling is fixed when a context is made), so the first embedding
    request loads the file a second time in that mode, with mean pooling, and keeps it while
    the runner lives. llama.cpp maps the weights, so on CPU both instances share the same
    pages: the second load costs its own context, not a second copy of the weights.
    """

    def __init__(
        self, llm: Any, device: str, n_ctx: int, load_embedder: Callable[[], Any] | None = None
    ) -> None:
        import llama_cpp

        self.llm = llm
        self._load_embedder = load_embedder
        self._embedder: Any = None
        self.device = device
        # llama.cpp may round its context up; never promise more than was asked for.
        self.context_length = min(int(llm.n_ctx()), n_ctx)
        self._lib = llama_cpp
        self._vocab = llm._model.vocab
        self._pieces: dict[int, bytes] = {}
        self.chat = _chat_template(llm, self._token_text)
        self.has_chat_template = self.chat is not None

    def batcher(self, parallel: int) -> LlamaBatcher:
        """Continuous batching over `parallel` sequences, in a context of its own.

        One batched decode takes at most the device's prefill chunk of tokens. A prompt is
        fed in such steps, and every decoding sequence waits for each step, so on a CPU a
        long prompt holds the others up for 128 tokens' time, not 512's.
        """
        from workers.engines.llama_batch import LlamaBatcher, batch_context

        n_batch = prefill_chunk(self.device)
        return LlamaBatcher(self, batch_context(self, parallel, n_batch), parallel, n_batch)

    def close(self) -> None:
        """Free the model now (llama.cpp's own finaliser can fail at interpreter exit)."""
        if self._embedder is not None:
            self._embedder.close()
        self.llm.close()

    def embed(self, texts: Sequence[str], cancelled: Callable[[], bool] = never) -> Embeddings:
        embedder = self._embedding_model()
        counts = [len(embedder.tokenize(t.encode(), add_bos=True, special=False)) for t in texts]
        for count in counts:
            if count > self.context_length:
                raise ContextLengthExceeded(count, self.context_length)
        vectors: list[list[float]] = []
        limits = embedder.n_batch, embedder.context_params.n_seq_max
        for low, high in embedding_batches(counts, *limits):
            if cancelled():
                raise Cancelled()
            try:
                batch = embedder.embed(list(texts[low:high]), normalize=True, truncate=False)
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"llama.cpp could not embed: {_log_tail() or exc}") from exc
            vectors.extend([float(x) for x in v] for v in batch)
        return Embeddings(vectors, sum(counts))

    def _embedding_model(self) -> Any:
        if self._embedder is None:
            if self._load_embedder is None:
                raise EngineError("this engine was loaded without an embedding mode")
            self._embedder = self._load_embedder()
        return self._embedder

    def count_prompt_tokens(self, request: GenerateRequest) -> int:
        count = len(self._encode(request))
        check_context(count, self.context_length)
        return count

    def generate(
        self, request: GenerateRequest, cancelled: Callable[[], bool]
    ) -> Generator[str, None, GenerationResult]:
        ids = self._encode(request)
        room = check_context(len(ids), self.context_length)
        params = request.params
        self.llm.set_seed(resolve_seed(params.seed) & 0xFFFFFFFF)
        if params.seed is not None and self.device == "cuda":
            # Reusing a cached prefix evaluates only the prompt's tail, on other CUDA kernels
            # than a whole prompt: logits move in the last bits and a seeded sample drifts.
            # A seed promises the same output, so its prompt is evaluated whole.
            self.llm.reset()
        if not self._prefill(ids, cancelled):
            return GenerationResult("cancelled", len(ids), 0)
        tokens = self.llm.generate(ids, **sampler_options(params))
        try:
            return (
                yield from stream_tokens(
                    tokens.__next__,
                    decoder=_ByteDecoder(self._piece),
                    is_eos=self._is_eog,
                    params=params,
                    cancelled=cancelled,
                    prompt_tokens=len(ids),
                    room=room,
                )
            )
        finally:
            tokens.close()

    def _prefill(self, ids: list[int], cancelled: Callable[[], bool]) -> bool:
        """Evaluate a prompt longer than one batch in batches, looking for a cancel
        between them (`Llama.generate` evaluates it in one call); False once cancelled.

        The batches start where `generate` would (after the cached prefix it reuses) and
        have its `n_batch` size, and the last one is left to `generate`, which then finds
        the rest cached: the decode calls are the ones `generate` alone makes, so are the
        logits. Recurrent models cannot drop a cache's tail, so they are left to `generate`.
        """
        llm = self.llm
        if len(ids) <= llm.n_batch:
            return True  # one batch whatever is cached: nothing to split
        if getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False):
            return True
        start = 0
        if llm.n_tokens > 0:
            start = min(_common_prefix(llm._input_ids, ids), len(ids) - 1)  # as generate does
        if len(ids) - start <= llm.n_batch:
            return True
        if start == 0 or not llm._ctx.kv_cache_seq_rm(-1, start, -1):
            llm.reset()
            start = 0
        llm.n_tokens = start
        return prefill(
            lambda low, high: llm.eval(ids[low:high]), start, len(ids), llm.n_batch, cancelled
        )

    def _encode(self, request: GenerateRequest) -> list[int]:
        text = prompt_text(self.chat, request)
        if text is None:
            return list(self.llm.tokenize(request.prompt.encode(), add_bos=True, special=False))
        # The template writes bos itself; parse special tokens it wrote as text.
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._token_bytes(token, special=False)
        return piece

    def _token_bytes(self, token: int, special: bool) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._token_bytes(token, special=True).decode("utf-8", "replace")


def embedding_batches(counts: list[int], n_batch: int, n_seq_max: int) -> list[tuple[int, int]]:
    """The texts (by their token counts) `Llama.embed` decodes together, as index ranges: it
    closes a batch when the next text would overflow `n_batch` tokens or `n_seq_max`
    sequences. Embedding range by range decodes the same batches, so the vectors are the
    ones a single call gives, with a cancel check possible between them."""
    batches: list[tuple[int, int]] = []
    low, tokens = 0, 0
    for i, count in enumerate(counts):
        if i > low and (tokens + count > n_batch or i - low >= n_seq_max):
            batches.append((low, i))
            low, tokens = i, 0
        tokens += count
    if counts:
        batches.append((low, len(counts)))
    return batches


def _common_prefix(cached: Any, ids: list[int]) -> int:
    """Leading tokens `cached` (llama-cpp-python's array of evaluated ids) shares with `ids`."""
    import numpy as np

    n = min(len(cached), len(ids))
    head = np.asarray(cached[:n])
    same = head == np.asarray(ids[:n], dtype=head.dtype)
    return n if bool(same.all()) else int(same.argmin())


def sampler_options(params: SamplingParams) -> dict[str, Any]:
    """llama.cpp's sampler chain for a request, as `Llama.generate` and `_init_sampler` take
    it: the sequential and the batched paths sample alike."""
    return {
        "temp": max(params.temperature, 0.0),
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
    }


def _chat_template(llm: Any, token_text: Callable[[int], str]) -> ChatTemplate | None:
    source = llm.metadata.get("tokenizer.chat_template")
    if not source:
        return None
    special = {
        "bos_token": token_text(llm.token_bos()),
        "eos_token": token_text(llm.token_eos()),
    }
    return ChatTemplate(source, special)


def _gpu_offload(device: str) -> tuple[int, str]:
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "cuda" and not gpu:
        raise EngineError("device 'cuda' was asked for but llama.cpp was built without GPU support")
    return (-1, "cuda") if device != "cpu" and gpu else (0, "cpu")


def load_gguf(path: Path, device: str, threads: int, context_cap: int) -> LlamaEngine:
    """Load a GGUF; a catchable load failure carries llama.cpp's own reason."""
    import llama_cpp

    _install_log_capture()
    if host_has_amx():
        avoid_extra_buffers()
    layers, used = _gpu_offload(device)
    _log_tail()  # forget lines from earlier loads
    trained = _train_context(path)
    n_ctx = min(trained, context_cap) if trained > 0 else context_cap
    options: dict[str, Any] = {
        "model_path": str(path),
        "n_ctx": n_ctx,
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": layers,
        "n_batch": prefill_chunk(used),  # also the most a cancel waits for during a prefill
        "verbose": False,
    }

    def load(**extra: Any) -> Any:
        try:
            return llama_cpp.Llama(**(options | extra))
        except (ValueError, RuntimeError, OSError) as exc:
            # Name the file, not where the host keeps it.
            detail = (_log_tail() or str(exc)).replace(str(path), path.name)
            raise EngineError(f"llama.cpp could not load the model: {detail}") from exc

    def load_embedder() -> Any:
        # One whole input per batch: embeddings are pooled over a single decode.
        mean = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        return load(embedding=True, pooling_type=mean, n_batch=n_ctx, n_ubatch=n_ctx)

    return LlamaEngine(load(), used, n_ctx, load_embedder)


def _train_context(path: Path) -> int:
    """The context length the GGUF declares (`<arch>.context_length`), 0 if unknown."""
    from gguf import GGUFReader

    try:
        reader: Any = GGUFReader(str(path), "r")
        arch = str(reader.get_field("general.architecture").contents())
        return int(reader.get_field(f"{arch}.context_length").contents())
    except Exception:  # unreadable here: let llama.cpp say what is wrong with the file
        return 0


F16_BYTES = 2  # llama.cpp's default KV cache type


def kv_cache_bytes(path: Path, contexts: int, context_cap: int) -> int:
    """KV cache memory `contexts` whole contexts of this GGUF take (f16 K and V), as the
    engine sizes a context (`min(trained, context_cap)`); 0 if the file does not say.

    The header is read with validation's bounded parser: this runs in the worker, outside
    the sandbox, on an uploaded file.
    """
    from validators.gguf import read_integers

    try:
        with path.open("rb") as raw:
            arch, meta = read_integers(raw, path.stat().st_size)
        layers, heads = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count"]
        kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
        key = meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // heads)
        value = meta.get(f"{arch}.attention.value_length", key)
        trained = meta.get(f"{arch}.context_length", 0)
    except Exception:  # per-layer head counts (arrays), other architectures: no estimate
        return 0
    n_ctx = min(trained, context_cap) if trained > 0 else context_cap
    return int(contexts * n_ctx * layers * kv_heads * (key + value) * F16_BYTES)
