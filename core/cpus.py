"""The CPUs this process may use: what sizes engine threads and a CPU host's runners.

`os.cpu_count()` counts the machine's. A container limited to 2 CPUs on a 64-core host
(`docker run --cpus 2`, a Kubernetes CPU limit) or a process pinned with `taskset` still
sees 64, and 16 engine threads per runner would time-slice 2. The count here is the
affinity mask, capped by the cgroup's CPU quota (rounded up), at least 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup and its ancestors; None
    when none is set or none can be read.

    cgroup v2: `cpu.max` ("max 100000" or "200000 100000"). v1: `cpu.cfs_quota_us` (-1:
    none) over `cpu.cfs_period_us`, under the `cpu` controller's mount.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hierarchy or not path.startswith("/"):
            continue
        if hierarchy == "0" and controllers == "":  # v2, or v1 alongside its unified tree
            quotas += _walk(cgroup_root, path, _v2_quota)
            quotas += _walk(cgroup_root / "unified", path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in {controllers, "cpu", "cpu,cpuacct"}:
                quotas += _walk(cgroup_root / mount, path, _v1_quota)
    return min(quotas) if quotas else None


def _walk(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas `read` finds from the cgroup at `path` up to the mount's root.

    Inside a container the cgroup namespace shows the container's own cgroup as "/", so its
    limit is read at the root.
    """
    if not base.is_dir():
        return []
    found = []
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    for depth in range(len(parts), -1, -1):
        quota = read(base.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(cgroup: Path) -> float | None:
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().strip().partition(" ")
        if quota == "max":
            return None
        return _positive(int(quota), int(period or 100_000))
    except (OSError, ValueError):
        return None


def _v1_quota(cgroup: Path) -> float | None:
    try:
        quota = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _positive(quota, period)


def _positive(quota: int, period: int) -> float | None:
    """Quota over period in CPUs; None for "no limit" (-1) or a nonsensical value."""
    if quota <= 0 or period <= 0:
        return None
    return quota / period
