"""The host-local weight cache: verified blobs, hard-linked bundles, locks, LRU budget."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from workers.weight_cache import CachedFile, CacheIntegrityError, WeightCache


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Source:
    """In-memory bundle files that count how often they are opened."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.lock = threading.Lock()

    def file(self, path: str, data: bytes, *, claimed: bytes | None = None) -> CachedFile:
        def opener() -> BinaryIO:
            with self.lock:
                self.opened.append(path)
            time.sleep(0.02)  # widen the race window
            return io.BytesIO(data)

        ref = data if claimed is None else claimed
        return CachedFile(path=path, sha256=sha(ref), size=len(ref), open=opener)


def bundle(src: Source, tag: bytes, size: int = 1000) -> tuple[str, list[CachedFile]]:
    files = [
        src.file("config.json", b'{"tag": "%s"}' % tag),
        src.file("weights/model.safetensors", tag * (size // len(tag))),
    ]
    model = sha(b"".join(f.sha256.encode() for f in files))
    return model, files


def leftovers(cache: WeightCache) -> list[Path]:
    return [p for d in (cache.blobs, cache.models) for p in d.rglob("*")]


def test_materialize_builds_bundle_layout_from_blobs(tmp_path: Path) -> None:
    src = Source()
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    model, files = bundle(src, b"A")
    out = cache.materialize(model, files)
    assert out == cache.models / model
    assert (out / "weights/model.safetensors").read_bytes() == b"A" * 1000
    blob = cache.blobs / files[1].sha256
    assert os.path.samefile(blob, out / "weights/model.safetensors")
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0
    assert blob.stat().st_mode & 0o777 == 0o444
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.materialize(model, files) == out
    assert (cache.hits, cache.misses) == (1, 1) and len(src.opened) == 2


def test_hash_mismatch_is_rejected_and_nothing_left(tmp_path: Path) -> None:
    src = Source()
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    good = src.file("config.json", b"{}")
    bad = src.file("model.gguf", b"tampered bytes", claimed=b"original bytes")
    with pytest.raises(CacheIntegrityError, match=r"model\.gguf"):
        cache.materialize("f" * 64, [good, bad])
    assert not (cache.models / ("f" * 64)).exists()
    assert all(p.name == good.sha256 for p in leftovers(cache))  # only the verified blob
    cache.evict()
    assert leftovers(cache) == []


def test_size_mismatch_is_rejected(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    data = b"x" * 10
    f = CachedFile("a.bin", sha(data), 11, lambda: io.BytesIO(data))
    with pytest.raises(CacheIntegrityError):
        cache.materialize("e" * 64, [f])
    assert leftovers(cache) == []


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_unsafe_paths_are_refused(tmp_path: Path, path: str) -> None:
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    f = CachedFile(path, sha(b"x"), 1, lambda: io.BytesIO(b"x"))
    with pytest.raises(ValueError):
        cache.materialize("d" * 64, [f])
    assert leftovers(cache) == []


def test_concurrent_materialize_builds_once(tmp_path: Path) -> None:
    src = Source()
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    model, files = bundle(src, b"C")
    with ThreadPoolExecutor(4) as ex:
        paths = list(ex.map(lambda _: cache.materialize(model, files), range(4)))
    assert len(set(paths)) == 1
    assert sorted(src.opened) == ["config.json", "weights/model.safetensors"]
    assert (cache.hits, cache.misses) == (3, 1)


def _materialize_in_process(root: str, log: str) -> str:
    src = Source()
    _, files = bundle(src, b"P")
    model = "9" * 64
    out = WeightCache(Path(root), budget_bytes=1 << 20).materialize(model, files)
    with open(log, "a") as f:
        f.write("".join(f"{p}\n" for p in src.opened))
    return str(out)


def test_concurrent_materialize_across_processes_builds_once(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "opened.log"
    with ctx.Pool(4) as pool:
        outs = pool.starmap(_materialize_in_process, [(str(tmp_path / "c"), str(log))] * 4)
    assert len(set(outs)) == 1
    assert sorted(log.read_text().split()) == ["config.json", "weights/model.safetensors"]


def test_lru_models_evicted_over_budget(tmp_path: Path) -> None:
    src = Source()
    cache = WeightCache(tmp_path / "cache", budget_bytes=2500)  # room for two bundles
    models = {tag: bundle(src, tag) for tag in (b"A", b"B", b"C")}
    a = cache.materialize(*models[b"A"])
    b = cache.materialize(*models[b"B"])
    os.utime(b, ns=(1, 1))  # B last used long ago, whatever the clock's resolution
    cache.materialize(*models[b"A"])  # a hit refreshes A
    c = cache.materialize(*models[b"C"])
    assert a.exists() and c.exists() and not b.exists()
    assert cache.usage_bytes() <= 2500
    assert not (cache.blobs / models[b"B"][1][1].sha256).exists()


def test_model_in_use_is_not_evicted(tmp_path: Path) -> None:
    src = Source()
    cache = WeightCache(tmp_path / "cache", budget_bytes=1500)  # room for one bundle
    model_a, files_a = bundle(src, b"A")
    with cache.use(model_a, files_a) as a:
        os.utime(a, ns=(1, 1))  # the oldest: the first to go were it not leased
        b = cache.materialize(*bundle(src, b"B"))
        assert a.exists() and (a / "weights/model.safetensors").read_bytes() == b"A" * 1000
        assert b.exists() and cache.usage_bytes() > 1500  # over budget while A is in use
    cache.evict()  # the lease is gone: A, least recently used, goes now
    assert not a.exists() and b.exists() and cache.usage_bytes() <= 1500


def test_identical_files_share_one_blob(tmp_path: Path) -> None:
    src = Source()
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    shared = src.file("tokenizer.json", b'{"vocab": 1}')
    one = cache.materialize("1" * 64, [shared, src.file("a.bin", b"a")])
    two = cache.materialize("2" * 64, [shared, src.file("b.bin", b"b")])
    assert os.path.samefile(one / "tokenizer.json", two / "tokenizer.json")
    assert (cache.blobs / shared.sha256).stat().st_nlink == 3


def test_stale_debris_cleared_on_start(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    stale = cache.blobs / ".tmp-dead"
    stale.write_bytes(b"half a download")
    os.utime(stale, (1, 1))
    fresh = cache.models / ".tmp-in-progress"
    fresh.mkdir()
    WeightCache(tmp_path / "cache", budget_bytes=1 << 20)
    assert not stale.exists() and fresh.exists()
