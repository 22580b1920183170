"""What every wire codec raises for a message it will not take."""

from __future__ import annotations

from typing import ClassVar


class WireRejected(ValueError):
    """A received message failed a check; `reason` is one of the class's REASONS,
    a closed set so that logs and counters can be keyed by it."""

    WHAT: ClassVar[str] = "message"
    REASONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{self.WHAT} rejected ({reason}): {detail}")
        self.reason = reason
