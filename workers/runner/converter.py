"""`Converter`: one sandboxed converter child (`convert_child`) and the files it works on.

The worker copies each validated pickle into the child's temp dir (checking its SHA-256 against
the digest validation recorded, so a replaced object is never converted), asks the child to
convert it, and hands back the path of what the child wrote. A child that refuses, dies or
runs out of time ends the conversion with a `ConversionFailed` and is killed; its temp dir
goes with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NoReturn

from workers.runner.pipes import ChildPipes, PipeClosed
from workers.runner.process import STOP_GRACE_S
from workers.runner.protocol import Convert, Converted, Shutdown
from workers.runner.sandbox import Sandbox, SandboxConfig
from workers.weight_cache import copy_hashing

MAX_DETAIL = 1200
_STDERR_TAIL = 12


class ConversionFailed(Exception):
    """The conversion did not produce a file; `code` is the model's rejection code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def converter_argv() -> list[str]:
    return [sys.executable, "-s", "-m", "workers.runner.convert_child"]


class Converter:
    """Use as a context manager: the child and its temp dir never outlive the block."""

    def __init__(
        self,
        *,
        timeout_s: float,
        sandbox: SandboxConfig | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.sandbox = Sandbox(sandbox or SandboxConfig())
        self._argv = list(argv) if argv else converter_argv()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipes: ChildPipes | None = None

    def __enter__(self) -> Converter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stage(self, opener: Callable[[], BinaryIO], sha256: str, size: int) -> Path:
        """A private copy of a validated upload, in the child's temp dir, checked by digest."""
        dest = self.sandbox.tmpdir / f"in-{uuid.uuid4().hex}"
        digest, got = copy_hashing(opener, dest)
        if digest != sha256 or got != size:
            raise ConversionFailed(
                "CONVERSION_FAILED",
                "the stored upload changed after validation (its SHA-256 differs); upload again",
            )
        return dest

    def convert(self, source: Path) -> Path:
        """Ask the child to convert `source`; the path of the (untrusted) safetensors it wrote."""
        if self._proc is None:
            self._proc = self.sandbox.popen(self._argv)
            self._pipes = ChildPipes(self._proc)
        assert self._pipes is not None
        tag = uuid.uuid4().hex
        target = self.sandbox.tmpdir / f"out-{tag}.safetensors"
        deadline = time.monotonic() + self.timeout_s
        try:
            self._pipes.send(Convert(tag=tag, source=str(source), target=str(target)))
            while (left := deadline - time.monotonic()) > 0:
                event = self._pipes.next_event(min(left, 1.0))
                if isinstance(event, Converted) and event.tag == tag:
                    return self._result(event, target)
                if event is not None:
                    self._fail("CONVERSION_FAILED", f"the converter sent {type(event).__name__}")
        except PipeClosed:
            self._fail("CONVERSION_FAILED", self._death())
        self._fail("CONVERSION_TIMEOUT", f"the conversion took longer than {self.timeout_s:g}s")

    def _result(self, event: Converted, target: Path) -> Path:
        if event.error:
            self._fail("CONVERSION_FAILED", f"the weights could not be converted: {event.detail}")
        if not os.path.lexists(target):
            self._fail("CONVERSION_FAILED", "the converter reported success but wrote no file")
        return target  # whatever it is (a link, a pipe): the caller opens it with care

    def _fail(self, code: str, reason: str) -> NoReturn:
        """Kill the child (its state is unknown) and raise, with the end of its stderr."""
        self._kill()
        tail = self._pipes.tail(_STDERR_TAIL) if self._pipes else ""
        last = tail.strip().splitlines()[-1:] if tail.strip() else []
        message = f"{reason} ({last[0]})" if last and last[0] not in reason else reason
        raise ConversionFailed(code, message[:MAX_DETAIL])

    def _death(self) -> str:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "the converter stopped answering"
        if code < 0:
            return f"the converter was killed by {signal.Signals(-code).name}"
        return f"the converter died (exit status {code})"

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()

    def close(self) -> None:
        """Shut the child down (killing it if it lingers) and remove its temp dir."""
        if self._proc is not None and self._proc.poll() is None and self._pipes is not None:
            try:
                self._pipes.send(Shutdown())
                self._proc.wait(STOP_GRACE_S)
            except (PipeClosed, subprocess.TimeoutExpired):
                pass
        self._kill()
        if self._pipes is not None:
            self._pipes.close()
        self.sandbox.cleanup()
