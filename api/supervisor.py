"""Child processes of `inferatech up`: start in their own process groups, watch, stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_S = 10.0
POLL_S = 0.2
PR_SET_PDEATHSIG = 1


class ChildDied(Exception):
    def __init__(self, name: str, code: int | None, log_path: Path, log_tail: str) -> None:
        super().__init__(f"{name} exited unexpectedly (code {code})")
        self.name = name
        self.log_path = log_path
        self.code = code
        self.log_tail = log_tail


def _die_with_parent() -> None:
    """Runs in the child before exec: if `up` is SIGKILLed, the kernel stops the child too."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Child:
    """One supervised process; its pid is also its process group id."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], log_path: Path) -> Child:
        with log_path.open("ab") as log:
            # A new session: the terminal's Ctrl-C reaches only `up`, which then stops the
            # children in order, and killpg() reaches their grandchildren (pool processes).
            proc = subprocess.Popen(  # noqa: S603 - fixed argv built by us
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: `up` runs no threads
            )
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()

    def group_alive(self) -> bool:
        self.process.poll()  # reap the leader so a zombie does not look alive
        return _group_alive(self.pid)

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def log_tail(self, limit: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode(errors="replace")


@dataclass
class Supervisor:
    """Watches children; stops them all (servers first, their backing services last)."""

    pid_file: Path
    first: list[Child] = field(default_factory=list)
    last: list[Child] = field(default_factory=list)
    stop_requested: str | None = None
    force: bool = False

    def add(self, child: Child, *, last: bool = False) -> None:
        (self.last if last else self.first).append(child)
        pids = {"up": os.getpid(), **{c.name: c.pid for c in self.children()}}
        self.pid_file.write_text(json.dumps(pids))

    def children(self) -> list[Child]:
        return [*self.first, *self.last]

    def request_stop(self, reason: str) -> None:
        # A second Ctrl-C skips the grace period.
        self.force = self.stop_requested is not None
        self.stop_requested = reason

    def check_alive(self) -> None:
        for child in self.children():
            if not child.alive():
                raise ChildDied(child.name, child.returncode(), child.log_path, child.log_tail())

    def run(self) -> int:
        """Block until a stop is requested (exit 0) or a child dies (exit 1)."""
        while self.stop_requested is None:
            try:
                self.check_alive()
            except ChildDied as died:
                self.report(died)
                return 1
            time.sleep(POLL_S)
        print(f"received {self.stop_requested}; stopping…", flush=True)
        return 0

    def report(self, died: ChildDied) -> None:
        print(f"error: {died}; stopping the others", file=sys.stderr)
        print(
            f"--- last lines of {died.log_path} ---\n{died.log_tail}", file=sys.stderr, flush=True
        )

    def shutdown(self) -> None:
        """SIGTERM, up to STOP_GRACE_S, then SIGKILL; nothing is left running afterwards."""
        for batch in (self.first, self.last):
            self._stop_batch(batch)
        self.pid_file.unlink(missing_ok=True)

    def _stop_batch(self, batch: list[Child]) -> None:
        for child in batch:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(c.group_alive() for c in batch):
            if self.force or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for child in batch:
            if child.group_alive():
                print(f"{child.name} did not stop in time; killing it", file=sys.stderr)
            # Always sweep: a grandchild can outlive its group leader.
            child.signal_group(signal.SIGKILL)
        for child in batch:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
