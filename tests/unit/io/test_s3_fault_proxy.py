"""The test fault proxy itself: seeded, bounded, and it stops by itself (no server behind it needed)."""
from __future__ import annotations

import time

from tests.fixtures.s3_fault_proxy import KINDS, S3FaultProxy


def plan(proxy: S3FaultProxy, n: int = 2000) -> list:
    return [proxy.decide("GET" if i % 3 else "PUT", f"/bucket/key-{i % 7}", {}) for i in range(n)]


def test_faults_are_seeded_bounded_and_at_the_rate():
    proxy = S3FaultProxy("http://127.0.0.1:9", rate=0.1, seed=3)
    first = plan(proxy)
    assert plan(proxy.configure(rate=0.1, seed=3)) == first  # same seed, same faults
    assert plan(proxy.configure(rate=0.1, seed=4)) != first
    faults = [k for k in first if k]
    assert 0.07 < len(faults) / len(first) < 0.13 and set(faults) == set(KINDS)
    assert not [k for i, k in enumerate(first) if k == "reset_mid" and i % 3 == 0]  # writes fail before the server
    streak = 0
    for i in range(0, len(first) - 7, 7):  # one object's requests: never more than max_consecutive faults in a row
        streak = streak + 1 if first[i] else 0
        assert streak <= 2


def test_fail_first_and_deny():
    proxy = S3FaultProxy("http://127.0.0.1:9", fail_first={"clip-3.wav": 3},
                         deny={"credentials": "AKIAGOOD", "prefix": "bucket/locked"})
    good = {"Authorization": "AWS4-HMAC-SHA256 Credential=AKIAGOOD/20260101/us-east-1/s3/aws4_request"}
    assert [proxy.decide("GET", "/bucket/clip-3.wav", good) for _ in range(4)] == ["503", "503", "503", None]
    assert proxy.decide("GET", "/bucket/x", {"Authorization": "Credential=AKIAOTHER/..."}) == "bad_key"
    assert proxy.decide("PUT", "/bucket/locked/x", good) == "denied"


def test_stops_by_itself():
    proxy = S3FaultProxy("http://127.0.0.1:9", lifetime_s=0.5).start()
    time.sleep(1.0)
    assert proxy.server.socket.fileno() == -1  # closed
