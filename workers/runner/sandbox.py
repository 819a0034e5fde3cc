"""How a runner child is started: scrubbed environment, own temp dir, limits, no network.

The confinement is applied in `preexec_fn`, between fork and exec, so nothing of the untrusted
model ever runs unconfined. A new network namespace needs CAP_SYS_ADMIN (or unprivileged user
namespaces); where the host allows neither, the runner starts without it and a warning is
logged once: `Sandbox.network_isolated` says which case applies.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from workers.runner.confine import Confinement, protect_worker

log = logging.getLogger("inferatech.sandbox")

PR_SET_PDEATHSIG = 1
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Passed through as they are: needed to run Python, find GPUs, or render text. None is secret.
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES")
_DENY_PREFIXES = ("INFERATECH_", "AWS_", "STRIPE_")
_DENY_WORDS = ("SECRET", "TOKEN", "KEY", "PASSWORD", "CREDENTIAL")
_libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
# Runners are started from short-lived request threads, so every fork happens on this one
# long-lived thread instead; otherwise a runner would die with the request that started it.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-spawner")


@dataclass(frozen=True)
class SandboxConfig:
    threads: int = 1
    memory_bytes: int | None = None  # RLIMIT_AS; unset by default (torch reserves address space)
    max_open_files: int = 1024
    max_file_bytes: int = 4 << 30  # a runner writes nothing big; this stops a disk-filler
    isolate_network: bool = True
    tmp_root: Path | None = None
    confine: bool = True  # Landlock and seccomp where the kernel has them (see confine.py)
    # A CPU runner sees no GPU: a CUDA build of llama.cpp would otherwise make a context
    # (~0.5 GiB of GPU memory, measured on an H100) for a model it never offloads.
    hide_gpus: bool = False


class SandboxRefused(OSError):
    """The worker's environment would weaken every runner; none is started."""


# torch.load ignores weights_only=True when this is set: a pickle could run code again.
UNSAFE_WORKER_ENV = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",)


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(_DENY_PREFIXES) or any(w in upper for w in _DENY_WORDS)


@functools.cache
def network_namespace_flags() -> int:
    """The unshare flags that give a child its own network here (0 if the host allows none)."""
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        try:
            subprocess.run(
                [sys.executable, "-c", "pass"],
                preexec_fn=_unshare_hook(flags),
                check=True,
                timeout=30,
            )
        except (subprocess.SubprocessError, OSError):
            continue
        return flags
    log.warning(
        "this host allows no new network namespace (needs CAP_SYS_ADMIN or user namespaces):"
        " runners start WITH host network access"
    )
    return 0


def _unshare_hook(flags: int) -> Callable[[], None]:
    def hook() -> None:
        if _libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")

    return hook


def _limits(config: SandboxConfig) -> list[tuple[int, int]]:
    limits = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, config.max_open_files),
        (resource.RLIMIT_FSIZE, config.max_file_bytes),
    ]
    if config.memory_bytes:
        limits.append((resource.RLIMIT_AS, config.memory_bytes))
    return limits


def _preexec(
    parent_pid: int,
    limits: list[tuple[int, int]],
    net_flags: int,
    confinement: Confinement | None,
) -> Callable[[], None]:
    """Runs in the forked child before exec: keep it to syscalls, no locks, no logging."""

    def hook() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        os.setsid()  # own process group: a terminal's ^C or a group kill does not reach it
        for which, value in limits:
            _, hard = resource.getrlimit(which)
            cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (cap, cap))
        # Fail closed: isolation was promised by the probe, so a failure here aborts the spawn.
        if net_flags and _libc.unshare(net_flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        if confinement is not None:  # last: it also forbids what the steps above needed
            confinement.apply()

    return hook


class Sandbox:
    """One runner's confinement: a private temp dir, a scrubbed env, limits, no network."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        unsafe = [name for name in UNSAFE_WORKER_ENV if os.environ.get(name)]
        if unsafe:
            raise SandboxRefused(
                f"{unsafe[0]} is set in the worker's environment: it turns off torch's "
                "weights-only unpickler, so no runner is started; unset it"
            )
        self._net_flags = network_namespace_flags() if self.config.isolate_network else 0
        root = self.config.tmp_root or Path(tempfile.gettempdir()) / "inferatech-runners"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        sweep_orphans(root)
        # Named after this process: a worker killed with SIGKILL cannot clean up after its
        # runners, so the next worker on the host removes dirs whose owner is gone.
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        self.confinement = Confinement(self.tmpdir) if self.config.confine else None
        if self.confinement is not None:
            protect_worker()

    @property
    def network_isolated(self) -> bool:
        return self._net_flags != 0

    def env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
        env.setdefault("PATH", "/usr/bin:/bin")
        env.setdefault("LANG", "C.UTF-8")
        threads = str(self.config.threads)
        env.update(
            HOME=str(self.tmpdir),
            TMPDIR=str(self.tmpdir),
            PYTHONPATH=str(PROJECT_ROOT),
            PYTHONDONTWRITEBYTECODE="1",
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            OPENBLAS_NUM_THREADS=threads,
            TOKENIZERS_PARALLELISM="false",
            GGML_NO_BACKTRACE="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        if self.config.hide_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        # Belt and braces: nothing that looks like a credential, whatever the allowlist says.
        return {k: v for k, v in env.items() if not is_secret_name(k)}

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start `argv` confined; stdin, stdout and stderr are pipes."""
        hook = _preexec(os.getpid(), _limits(self.config), self._net_flags, self.confinement)

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(  # noqa: S603 - argv is built by the caller, not the model
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.tmpdir,
                env=self.env(),
                close_fds=True,
                preexec_fn=hook,
            )

        return _spawner.submit(spawn).result()

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@functools.cache
def sweep_orphans(root: Path) -> int:
    """Remove runner temp dirs left by dead workers (once per process and root)."""
    removed = 0
    for path in root.iterdir():
        owner = path.name.split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not _alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runner_argv() -> list[str]:
    # -s: no user site-packages; the project comes from PYTHONPATH set in env().
    return [sys.executable, "-s", "-m", "workers.runner.child"]
