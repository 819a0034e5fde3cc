"""A runner child whose model "got code execution": it probes the sandbox from inside.

`python -m tests.adversarial.hostile_child PROBE [ARG]` is a real runner (`workers.runner.
child`) whose loader runs PROBE instead of loading weights. A probe that returns reports its
findings as the JSON detail of SetupFailed; a probe the sandbox kills reports nothing.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.runner import child

PROBE = sys.argv[1] if len(sys.argv) > 1 else "none"
ARG = sys.argv[2] if len(sys.argv) > 2 else ""


def _attempt(fn: Callable[[], object]) -> dict[str, Any]:
    try:
        return {"ok": True, "value": repr(fn())[:200]}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": getattr(exc, "errno", None)}


def _network() -> dict[str, Any]:
    port = int(ARG)
    return {
        "connect_host": _attempt(lambda: socket.create_connection(("127.0.0.1", port), 2)),
        "dns": _attempt(lambda: socket.getaddrinfo("example.com", 443)),
        "udp_dns": _attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
            b"\0" * 12, ("8.8.8.8", 53))),
    }  # fmt: skip


def _secrets() -> dict[str, Any]:
    parent = os.getppid()
    return {
        "env": dict(os.environ),
        "parent_environ": _attempt(lambda: Path(f"/proc/{parent}/environ").read_bytes()),
        "parent_mem": _attempt(lambda: Path(f"/proc/{parent}/mem").open("rb").read(1)),
        "signal_parent": _attempt(lambda: os.kill(parent, 0)),
    }


def _name_a_thread() -> str:
    """What the CUDA driver does at init: name a helper thread through /proc/self/task."""
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait)
    thread.start()
    try:
        comm = Path(f"/proc/self/task/{thread.native_id}/comm")
        comm.write_text("probe-helper")
        return comm.read_text().strip()
    finally:
        parked.set()
        thread.join()


def _write() -> dict[str, Any]:
    def write(path: Path) -> str:
        path.write_text("x")
        return str(path)

    return {
        "own_tmp": _attempt(lambda: write(Path(os.environ["TMPDIR"]) / "mine.txt")),
        "outside": _attempt(lambda: write(Path(ARG))),
        "bundle": _attempt(lambda: write(Path(child_bundle) / "planted.json")),
        "dev_null": _attempt(lambda: write(Path("/dev/null"))),
        "thread_name": _attempt(_name_a_thread),
        "parent_comm": _attempt(lambda: write(Path(f"/proc/{os.getppid()}/comm"))),
        "own_proc": _attempt(lambda: write(Path("/proc/self/oom_score_adj"))),
    }


def _fork_bomb() -> dict[str, Any]:
    pids, error = [], None
    for _ in range(1000):
        try:
            pid = os.fork()
        except OSError as exc:
            error = exc.errno
            break
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return {"forked": len(pids), "errno": error}


def _big_write() -> dict[str, Any]:
    with (Path(os.environ["TMPDIR"]) / "huge.bin").open("wb") as f:
        chunk = b"\0" * (1 << 20)
        for _ in range(100 << 10):  # 100 GiB
            f.write(chunk)
            f.flush()
    return {"wrote": "100 GiB"}


def _memory() -> dict[str, Any]:
    return {"alloc": _attempt(lambda: len(bytearray(int(ARG))))}


def _limits() -> dict[str, Any]:
    names = ("RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_AS", "RLIMIT_NOFILE")
    status = Path("/proc/self/status").read_text()
    caps = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if "Cap" in line}
    return {"limits": {n: resource.getrlimit(getattr(resource, n))[0] for n in names}, "caps": caps}


PROBES: dict[str, Callable[[], dict[str, Any]]] = {
    "network": _network,
    "secrets": _secrets,
    "write": _write,
    "fork_bomb": _fork_bomb,
    "big_write": _big_write,
    "memory": _memory,
    "limits": _limits,
}
child_bundle = ""


def _load(setup: Any) -> Any:
    global child_bundle
    child_bundle = setup.bundle_dir
    raise RuntimeError("PROBE " + json.dumps(PROBES[PROBE]()))


child.load = _load

if __name__ == "__main__":
    code = child.main()
    sys.stderr.flush()
    os._exit(code)
