"""Kernel confinement applied to a runner between fork and exec: Landlock and seccomp.

Landlock (Linux 5.13+, unprivileged) limits writes to the runner's temp dir (and writes to
devices such as /dev/null or a GPU), forbids TCP bind/connect (ABI 4+), signals and abstract
unix sockets that leave the sandbox (ABI 6+), and stops the runner from ptrace-reading any
process outside it, so `/proc/<worker>/environ` is closed even to root. A seccomp filter
refuses new processes (fork, vfork, clone without CLONE_THREAD): a runner needs threads only,
so a fork bomb gets EPERM. Where the kernel lacks either, `probe()` says so and the runner
starts with what the host has (rlimits, network namespace).

Everything that allocates is built in the parent (`Confinement`); `apply()` in the child only
opens two paths and makes system calls.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on every arch
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 4, 24, 47, 4
_CAPSET = {"x86_64": 126, "aarch64": 91}
# seccomp(2), and its flag that leaves speculation mitigations as they are: without it, kernels
# before 5.16 (or booted with spec_store_bypass_disable=seccomp) force SSBD and STIBP on every
# filtered process, a few percent of a runner's compute (runc passes it for the same reason).
_SECCOMP = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 1 << 2
_EINVAL, _ENOSYS = 22, 38
_CAP_VERSION_3 = 0x20080522
_RULE_PATH_BENEATH = 1
# Landlock filesystem rights that write, by the ABI that introduced them.
_WRITE_FILE, _TRUNCATE, _REFER = 1 << 1, 1 << 14, 1 << 13
_FS_WRITE_ABI1 = _WRITE_FILE | sum(1 << b for b in range(4, 13))  # remove, make dir/reg/sock…
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_OWN_THREADS = b"/proc/self/task"
_SCOPES = (1 << 0) | (1 << 1)  # abstract unix sockets, signals
_CLONE_THREAD = 0x00010000
# (audit arch, fork, vfork, clone, clone3); -1: the arch has no such call
_ARCHES = {
    "x86_64": (0xC000003E, 57, 58, 56, 435),
    "aarch64": (0xC00000B7, -1, -1, 220, 435),
}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


@functools.cache
def protect_worker() -> None:
    """Make this (worker) process non-dumpable: a runner without CAP_SYS_PTRACE, even one
    running as the same user or as root, can then no longer read its /proc/<pid>/environ,
    maps or memory. Also keeps the worker's secrets out of core dumps."""
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


@functools.cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    abi = _libc.syscall(_SYS_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    return max(int(abi), 0)


def seccomp_supported() -> bool:
    return platform.machine() in _ARCHES


def _no_fork_filter() -> ctypes.Array[_SockFilter]:
    arch, fork, vfork, clone, clone3 = _ARCHES[platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    program = [
        (ld, 0, 0, 4),  # 0: arch
        (jeq, 1, 0, arch),  # 1: native arch → 3
        (ret, 0, 0, enosys),  # 2: compat syscalls (int 0x80) are refused
        (ld, 0, 0, 0),  # 3: syscall number
        (jge, 8, 0, 0x40000000),  # 4: x32 numbers → ENOSYS
        (jeq, 6, 0, fork & 0xFFFFFFFF),  # 5: fork → EPERM
        (jeq, 5, 0, vfork & 0xFFFFFFFF),  # 6: vfork → EPERM
        (jeq, 5, 0, clone3),  # 7: clone3 (flags out of reach) → ENOSYS, libc falls back
        (jeq, 0, 2, clone),  # 8: clone → 9, anything else → allow
        (ld, 0, 0, 16),  # 9: low half of clone's flags
        (jset, 0, 1, _CLONE_THREAD),  # 10: a thread → allow, a process → EPERM
        (ret, 0, 0, allow),  # 11
        (ret, 0, 0, eperm),  # 12
        (ret, 0, 0, enosys),  # 13
    ]
    return (_SockFilter * len(program))(*(_SockFilter(*i) for i in program))


@dataclass
class Confinement:
    """The rules for one runner, prepared in the parent process."""

    writable: Path
    abi: int = field(default_factory=landlock_abi)
    seccomp: bool = field(default_factory=seccomp_supported)

    def __post_init__(self) -> None:
        fs = _FS_WRITE_ABI1 | (_REFER if self.abi >= 2 else 0) | (_TRUNCATE if self.abi >= 3 else 0)
        size = 8 if self.abi < 4 else 16 if self.abi < 6 else 24
        self._attr = _RulesetAttr(
            fs, _NET_TCP if self.abi >= 4 else 0, _SCOPES if self.abi >= 6 else 0
        )
        self._attr_size = size
        dev = _WRITE_FILE | (_TRUNCATE if self.abi >= 3 else 0)
        self._rules = [(os.fsencode(self.writable), _PathBeneath(fs, -1))]
        self._rules.append((b"/dev", _PathBeneath(dev, -1)))  # /dev/null, GPU device nodes
        # The runner's own threads only (opened in the child): the CUDA driver names its
        # helper threads through /proc/self/task/<tid>/comm, and fails to start without it.
        self._rules.append((_OWN_THREADS, _PathBeneath(dev, -1)))
        self._filter = _no_fork_filter() if self.seccomp else None
        if self._filter is not None:
            self._prog = _SockFprog(len(self._filter), self._filter)
        self._seccomp_nr = _SECCOMP.get(platform.machine())

    def apply(self) -> str | None:
        """In the forked child: restrict this process for good; raises OSError on failure.

        Returns how the seccomp filter went in (`seccomp` with SPEC_ALLOW, or `prctl` on a
        kernel without that flag), None without a filter.
        """
        _drop_capabilities()
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if self.abi:
            self._landlock()
        if self._filter is None:
            return None
        prog = ctypes.byref(self._prog)
        if self._seccomp_nr is not None:
            flags = _SECCOMP_FILTER_FLAG_SPEC_ALLOW
            if _libc.syscall(self._seccomp_nr, _SECCOMP_SET_MODE_FILTER, flags, prog) == 0:
                return "seccomp"
            if ctypes.get_errno() not in (_EINVAL, _ENOSYS):  # EINVAL: a kernel before 4.17
                raise OSError(ctypes.get_errno(), "seccomp filter refused")
        if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, prog, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp filter refused")
        return "prctl"

    def _landlock(self) -> None:
        ruleset = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(self._attr), self._attr_size, 0)
        if ruleset < 0:
            raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
        try:
            for path, rule in self._rules:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except FileNotFoundError:
                    if path == _OWN_THREADS:  # no /proc mounted: nothing to allow there
                        continue
                    raise
                try:
                    rule.parent_fd = fd
                    if _libc.syscall(
                        _SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0
                    ):
                        raise OSError(ctypes.get_errno(), "landlock_add_rule failed")
                finally:
                    os.close(fd)
            if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
        finally:
            os.close(ruleset)


def _drop_capabilities() -> None:
    """No capability survives exec, even for root: empty bounding, ambient and own sets."""
    if os.geteuid() != 0:
        return  # an unprivileged runner has none to drop (and may not touch the bounding set)
    for cap in range(64):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap: ignored
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    capset = _CAPSET.get(platform.machine())
    if capset is not None:
        header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all empty
        if _libc.syscall(capset, header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
