"""GPU memory as nvidia-smi reports it, for the runner pool's budget on CUDA hosts.

Read through nvidia-smi so the worker never imports torch or initialises CUDA itself. Only the
GPUs a runner may use count: `CUDA_VISIBLE_DEVICES` picks them (empty: none).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

MIB = 1 << 20
_MIB_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII only: int() would also take other digits


@dataclass(frozen=True)
class GpuMemory:
    total_bytes: int
    used_bytes: int  # by every process on those GPUs, ours and anyone else's


def read_gpu_memory(timeout: float = 5.0) -> GpuMemory | None:
    """The visible GPUs together; None without a GPU, nvidia-smi, or an answer that parses."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    argv = [smi, "--query-gpu=memory.total,memory.used", "--format=csv,noheader,nounits"]
    if visible:
        argv += ["-i", visible.strip()]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_memory(out.stdout)


def parse_memory(text: str) -> GpuMemory | None:
    """`memory.total, memory.used` lines in MiB, one per GPU; None unless all of them parse."""
    total = used = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 2 or not all(_MIB_NUMBER.fullmatch(c) for c in cells):
            return None
        gpu_total, gpu_used = int(cells[0]), int(cells[1])
        if gpu_total == 0 or gpu_used > gpu_total:
            return None
        total, used = total + gpu_total, used + gpu_used
    return GpuMemory(total * MIB, used * MIB) if total else None
