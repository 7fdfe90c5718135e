"""The enrollment failure window (pure)."""

from __future__ import annotations

from controlplane.throttle import FailureWindow


def test_a_key_is_refused_after_its_limit_until_failures_age_out() -> None:
    window = FailureWindow(limit=3, window=60.0)
    for t in (0.0, 10.0, 20.0):
        assert window.allowed("k", t)
        window.failed("k", t)
    assert not window.allowed("k", 30.0)
    assert window.retry_after("k", 30.0) == 30.0
    assert window.allowed("other", 30.0)  # per key
    assert window.allowed("k", 60.5)  # the first failure aged out
    window.failed("k", 61.0)
    assert not window.allowed("k", 62.0)


def test_memory_is_bounded() -> None:
    window = FailureWindow(limit=1, window=60.0, max_keys=2)
    window.failed("a", 1.0)
    window.failed("b", 2.0)
    window.failed("c", 3.0)  # forgets "a", the stalest
    assert window.allowed("a", 4.0)
    assert not window.allowed("b", 4.0) and not window.allowed("c", 4.0)


def test_a_key_failing_again_is_remembered_longest() -> None:
    window = FailureWindow(limit=2, window=60.0, max_keys=2)
    window.failed("a", 1.0)
    window.failed("b", 2.0)
    window.failed("a", 3.0)  # "a" failed last: "b" is now the stalest
    window.failed("c", 4.0)
    assert not window.allowed("a", 5.0)  # two failures kept
    assert window.allowed("b", 5.0)
