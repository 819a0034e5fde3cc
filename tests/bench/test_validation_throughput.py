"""Validation throughput and memory vs `sha256sum` on the same file, measured in the same run.

Run with `make bench` (size: INFERATECH_BENCH_BYTES, default 2 GiB).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

SIZE = int(os.environ.get("INFERATECH_BENCH_BYTES", str(2 * 1024**3)))

_CHILD = r"""
import json, sys, time
from pathlib import Path
from validators.pipeline import BundleFile, validate_bundle
big = Path(sys.argv[1])
files = [BundleFile(path=p.name, size=p.stat().st_size, open=lambda p=p: p.open("rb"))
         for p in sorted(big.parent.iterdir())]
t0 = time.perf_counter()
report = validate_bundle(files)
elapsed = time.perf_counter() - t0
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
rss_kib = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
digest = next((f.sha256 for f in report.files if f.path == big.name), None)
print(json.dumps({"ok": report.ok, "sha256": digest, "seconds": elapsed, "rss_mib": rss_kib / 1024,
                  "rejection": report.rejection.code if report.rejection else None}))
"""


def _write_safetensors(path: Path, size: int) -> None:
    n = (size - 4096) // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        chunk = os.urandom(1 << 20)
        left = n * 4
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


def _write_gguf(path: Path, size: int) -> None:
    import numpy as np
    from gguf import GGUFWriter

    n = (size - (1 << 20)) // 4
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(32000)])  # a realistic vocabulary size
    writer.add_tensor_info("w", (n,), np.dtype(np.float32), n * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with path.open("ab") as f:
        pad = -f.tell() % 32
        f.write(b"\0" * pad)
        chunk = os.urandom(1 << 20)
        left = n * 4
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


def _sha256sum(path: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stdout.split()[0]


def _validate(path: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.bench
def test_bench_validation_vs_sha256sum(tmp_path: Path) -> None:
    rows = []
    from tests.utils.model_files import make_transformers_bundle

    for name, writer in (("model.safetensors", _write_safetensors), ("model.gguf", _write_gguf)):
        folder = tmp_path / name.split(".")[1]
        if name.endswith(".safetensors"):  # a real bundle around the big weights file
            make_transformers_bundle(folder)
        folder.mkdir(exist_ok=True)
        path = folder / name
        writer(path, SIZE)
        _sha256sum(path)  # warm the page cache so both read from memory alike
        base_s, digest = _sha256sum(path)
        result = _validate(path)
        assert result["ok"], result["rejection"]
        assert result["sha256"] == digest
        secs = float(result["seconds"])  # type: ignore[arg-type]
        size_mib = path.stat().st_size / 1024**2
        rows.append(
            (name, size_mib, size_mib / base_s, size_mib / secs, base_s / secs, result["rss_mib"])
        )
        path.unlink()
    print()
    print(
        f"{'file':<20}{'MiB':>8}{'sha256sum MiB/s':>18}{'validate MiB/s':>17}{'ratio':>8}{'peak RSS MiB':>15}"
    )
    for name, mib, base, ours, ratio, rss in rows:
        print(f"{name:<20}{mib:>8.0f}{base:>18.0f}{ours:>17.0f}{ratio:>8.2f}{rss:>15.0f}")
    # The acceptance bar, checked only in this on-demand benchmark.
    for name, _, _, _, ratio, rss in rows:
        assert ratio >= 0.8, f"{name}: {ratio:.2f}x of sha256sum"
        assert float(rss) < 200, f"{name}: peak RSS {rss} MiB"  # type: ignore[arg-type]
