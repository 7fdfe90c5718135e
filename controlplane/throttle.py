"""A sliding window of failures per key: enrollment attempts with a bad token.

Pure (the caller passes the clock). A key with `limit` failures within
`window` seconds is refused until the oldest of them ages out: guessing an
enrollment secret (192 random bits) is hopeless anyway; this keeps someone from
making the control plane check secrets as fast as NATS delivers requests.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class FailureWindow:
    limit: int = 10
    window: float = 60.0
    max_keys: int = 10_000  # bound the memory an attacker can make us use
    # Least recently failed first: forgetting the oldest key is O(1), so a
    # flood of made-up keys cannot make each failure cost a scan.
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def allowed(self, key: str, now: float) -> bool:
        recent = self._failures.get(key)
        if recent is None:
            return True
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if not recent:
            del self._failures[key]
            return True
        return len(recent) < self.limit

    def failed(self, key: str, now: float) -> None:
        if key in self._failures:
            self._failures.move_to_end(key)
        elif len(self._failures) >= self.max_keys:
            self._failures.popitem(last=False)  # the key whose latest failure is oldest
        self._failures.setdefault(key, deque()).append(now)

    def retry_after(self, key: str, now: float) -> float:
        recent = self._failures.get(key)
        return max(0.0, recent[0] + self.window - now) if recent else 0.0
