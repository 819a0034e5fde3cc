"""What a rate-limited request costs: the admission script against one plain Redis round trip.

Every `/v1/infer` and `/v1/jobs` pays one admission (EVALSHA); the worker's settle rides in the
pipeline that already publishes the job's end, so it adds no round trip. Targets are printed,
not asserted (a shared 2-core host is too noisy); correctness is asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from core import limits
from core.ids import new_id
from tests.utils.stack import system_redis_url

pytestmark = pytest.mark.bench
ROUNDS = 3000


@pytest.fixture
def rds() -> Iterator[redis.Redis]:  # type: ignore[type-arg]
    client = redis.Redis.from_url(system_redis_url())
    yield client
    client.close()


def _ms(fn: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(ROUNDS):
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * 1000)
    return sorted(out)


def test_bench_admission_costs_one_round_trip(rds: redis.Redis) -> None:  # type: ignore[type-arg]
    key_id = new_id("k", 10)
    keys = [limits.rpm_key(key_id), limits.tpm_key(key_id), limits.concurrency_key(key_id),
            limits.budget_key(key_id, "2026-01")]  # fmt: skip
    rds.set(keys[3], 0)
    admit = limits.admit_script(rds)
    verdicts: list[bytes] = []

    def one(i: int) -> None:  # every limit on, none reached: the full path of the script
        verdicts.append(
            admit(keys=keys, args=[10**9, 10**12, 10**6, 10**15, f"job_{i}", 60_000])[0]
        )

    for i in range(200):  # warm the connection and the script cache
        rds.ping()
        one(-i - 1)
    ping = _ms(lambda _: rds.ping())
    admission = _ms(one)
    rds.delete(*keys)

    assert set(verdicts) == {b"ok"}
    p50_ping, p50_admit = statistics.median(ping), statistics.median(admission)
    p99_admit = admission[int(ROUNDS * 0.99)]
    extra = p50_admit - p50_ping
    print(f"\nAdmission of one request, {ROUNDS} rounds, local Redis (ms)")
    print(f"  {'PING (one round trip, the floor)':<44} p50 {p50_ping:.3f}")
    print(
        f"  {'admission script (rpm, tpm, slots, budget)':<44} p50 {p50_admit:.3f}  p99 {p99_admit:.3f}"
    )
    verdict = "PASS" if extra <= 0.2 else "FAIL"
    print(f"  {'script time beyond the round trip (<= 0.2)':<44} {extra:.3f} {verdict}")
