"""`usable_cpus`: the affinity mask (the real kernel's, in a pinned child process) capped by
a cgroup CPU quota (cgroup trees written under `tmp_path`, as the kernel lays them out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cpus import cgroup_cpu_quota, usable_cpus
from tests.utils.stack import ROOT

PINNED = """
import json, os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from core.cpus import usable_cpus
from core.settings import Settings
from workers.pool import RunnerPool
print(json.dumps({"usable": usable_cpus(), "cpu_count": os.cpu_count(),
                  "threads": Settings().runner_threads,
                  "cap": RunnerPool(threads=1).cpu_runners_per_model}))
"""


def test_a_process_pinned_to_one_cpu_sizes_its_threads_and_runners_for_one() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERATECH_")}
    out = subprocess.run([sys.executable, "-c", PINNED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"usable": 1, "cpu_count": os.cpu_count(), "threads": 1, "cap": 1}
    assert usable_cpus() == len(os.sched_getaffinity(0))  # this process is not pinned


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _quota(tmp_path: Path, proc: str, files: dict[str, str]) -> float | None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc").write_text(proc)
    return cgroup_cpu_quota(_tree(tmp_path / "cg", files), tmp_path / "proc")


def test_cgroup_v2_quota_is_the_smallest_on_the_path_to_the_root(tmp_path: Path) -> None:
    proc = "0::/kubepods/pod1/ctr\n"
    assert _quota(tmp_path, proc, {"kubepods/pod1/ctr/cpu.max": "max 100000\n",
                                   "kubepods/pod1/cpu.max": "150000 100000\n",
                                   "kubepods/cpu.max": "400000 100000\n"}) == 1.5  # fmt: skip


def test_cgroup_v2_in_a_namespace_reads_the_limit_at_the_root(tmp_path: Path) -> None:
    """A container's own cgroup shows as "/" (cgroup namespace), its limit at the root."""
    assert _quota(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"}) == 2.0
    assert _quota(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"}) is None


def test_cgroup_v1_cfs_quota_under_the_cpu_mount(tmp_path: Path) -> None:
    proc = "9:name=systemd:/\n4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n"
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert _quota(tmp_path, proc, files) == 0.5  # the container's mount root holds its limit
    unlimited = {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert _quota(tmp_path / "u", proc, unlimited) is None


@pytest.mark.parametrize(
    ("proc", "files"),
    [
        ("0::/\n", {"cpu.max": "garbage\n"}),
        ("0::/\n", {"cpu.max": "0 100000\n"}),
        ("0::/\n", {"cpu.max": "100000 0\n"}),
        ("0::/\n", {"cpu.max": "-5 100000\n"}),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "x\n", "cpu/cpu.cfs_period_us": "100000\n"}),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "50000\n"}),  # no period
        ("0::/../../etc\n", {"cpu.max": "max 100000\n"}),  # no escape above the mount
        ("not a cgroup line\n", {"cpu.max": "100000 100000\n"}),
        ("", {"cpu.max": "100000 100000\n"}),
    ],
)
def test_unreadable_or_odd_cgroup_files_mean_no_quota(
    tmp_path: Path, proc: str, files: dict[str, str]
) -> None:
    assert _quota(tmp_path, proc, files) is None


def test_no_proc_file_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None


def test_a_quota_caps_the_affinity_rounded_up_and_never_below_one(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    (tmp_path / "proc").write_text("0::/\n")
    for quota, expected in (("50000", 1), ("100000", 1), ("150000", min(cpus, 2)),
                            ("6400000", cpus)):  # fmt: skip
        (tmp_path / "cpu.max").write_text(f"{quota} 100000\n")
        assert usable_cpus(tmp_path, tmp_path / "proc") == expected, quota
