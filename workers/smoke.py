"""Validation smoke test: load a bundle in a runner sandbox and generate a few tokens.

Structure checks cannot prove that the engine accepts a model (a tensor llama.cpp expects
may be missing, a config may disagree with its weights). Loading it once, through the same
weight cache the inference workers use, can; it also warms that cache for the first job.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import Settings
from workers.engines.base import GenerateRequest, SamplingParams
from workers.runner.process import Runner, RunnerFatal, RunnerSetupFailed
from workers.runner.sandbox import SandboxConfig
from workers.weight_cache import CachedFile, WeightCache

PROMPT = "Hello"
MAX_TOKENS = 4
LOAD_TIMEOUT_S = 120.0
GENERATE_TIMEOUT_S = 30.0
MAX_MESSAGE_CHARS = 1800
_TAIL_MARK = "--- runner stderr (tail) ---"
# Chat-template refusals keep their own code: the fix is in the template, not the weights.
TEMPLATE_CODES = frozenset({"CHAT_TEMPLATE_UNSAFE", "CHAT_TEMPLATE_INVALID", "CHAT_TEMPLATE_ERROR"})
_ABS_DIRS = re.compile(r"(?<![\w.])(?:/[^\s/\"':,;()\[\]]+)+/")


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    message: str = ""  # why it failed, for the rejection
    code: str = "LOAD_FAILED"  # the rejection code when it failed
    details: dict[str, Any] = field(default_factory=dict)  # what the runner learned


@functools.cache
def _weight_cache(root: Path, budget: int) -> WeightCache:
    return WeightCache(root, budget)


def smoke_test(
    settings: Settings,
    model_sha256: str,
    fmt: str,
    files: list[CachedFile],
    *,
    argv: Sequence[str] | None = None,
) -> SmokeResult:
    """Fetch the bundle into the weight cache, load it, generate; the runner never stays warm."""
    cache = _weight_cache(settings.effective_weight_cache_dir, settings.weight_cache_budget_bytes)
    with cache.use(model_sha256, files) as bundle:
        runner = Runner(
            bundle,
            fmt,
            sandbox=SandboxConfig(threads=settings.runner_threads),
            device=settings.runner_device,
            argv=argv,
        )
        try:
            return _load_and_generate(runner)
        finally:
            runner.stop()  # kills the child and removes its temp dir, in any state


def _load_and_generate(runner: Runner) -> SmokeResult:
    try:
        ready = runner.start(timeout=LOAD_TIMEOUT_S)
    except RunnerSetupFailed as exc:
        return SmokeResult(False, _explain("the model failed to load", exc.detail, runner))
    # Not raw: the model's own chat template is rendered (in the runner's sandboxed Jinja), so
    # a template that reaches for Python internals is refused now, not at the first request.
    request = GenerateRequest(
        PROMPT, raw=False, params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    )
    try:
        done = runner.generate(request, "smoke", lambda _: None, timeout=GENERATE_TIMEOUT_S)
    except RunnerFatal as exc:
        return SmokeResult(False, _explain("generation failed", str(exc), runner))
    if done.error:
        detail = f"{done.code or 'INFERENCE_FAILED'}: {done.detail}"
        code = done.code if done.code in TEMPLATE_CODES else "LOAD_FAILED"
        return SmokeResult(False, _explain("generation failed", detail, runner), code)
    return SmokeResult(
        True,
        details={
            "context_length": ready.context_length,
            "has_chat_template": ready.has_chat_template,
            "device": ready.device,
            "load_ms": round(ready.load_ms, 3),
        },
    )


def _explain(what: str, detail: str, runner: Runner) -> str:
    """`what: reason` then the tail of the runner's log, host paths cut to bundle names."""
    reason, _, tail = detail.partition(_TAIL_MARK)
    reason, tail = _scrub(reason.strip(), runner), _scrub(tail.strip(), runner)
    message = f"{what} in a test run: {reason[:600]}"
    room = MAX_MESSAGE_CHARS - len(message) - len(_TAIL_MARK) - 2
    if tail and room > 80:
        message += f"\n{_TAIL_MARK}\n{tail[-room:]}"
    return message


def _scrub(text: str, runner: Runner) -> str:
    text = text.replace(f"{runner.bundle_dir.as_posix()}/", "")
    if runner.tmpdir is not None:
        text = text.replace(runner.tmpdir.as_posix(), "<tmp>")
    return _ABS_DIRS.sub("", text)
