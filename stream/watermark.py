"""A partition's event-time watermark, with idle advance on the wall clock.

The watermark is the newest event time seen on the partition. When the partition receives
nothing for ``idle_s`` seconds, its watermark moves on with the wall clock from where it stood at
the last arrival, so quiet campaigns still close their visits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Watermark:
    """Event-time progress of one partition.

    Attributes:
        watermark_ms: The watermark (epoch ms), ``-1`` before any event.
        newest_event_ms: The newest event time seen (never moved by idle advance).
        anchor_ms: The watermark at the last arrival of a record.
        anchor_wall_s: Wall-clock time (epoch s) of the last arrival of a record.
    """

    watermark_ms: int = -1
    newest_event_ms: int = -1
    anchor_ms: int = -1
    anchor_wall_s: float = 0.0

    def observe(self, ts_ms: int) -> None:
        """An accepted event with event time ``ts_ms`` arrived."""
        if ts_ms > self.watermark_ms:
            self.watermark_ms = ts_ms
        if ts_ms > self.newest_event_ms:
            self.newest_event_ms = ts_ms

    def arrived(self, now_s: float) -> None:
        """Records arrived at wall time ``now_s``: restart the idle clock from here."""
        self.anchor_ms = self.watermark_ms
        self.anchor_wall_s = now_s

    def is_late(self, ts_ms: int, lateness_ms: int) -> bool:
        """Whether an event is older than the watermark minus the allowed lateness."""
        return self.watermark_ms >= 0 and ts_ms < self.watermark_ms - lateness_ms

    def idle_target(self, now_s: float, idle_s: float) -> int | None:
        """Where idle advance would move the watermark now; ``None`` when it would not move."""
        idle_for_s = now_s - self.anchor_wall_s
        if self.anchor_ms < 0 or idle_for_s < idle_s:
            return None
        advanced = self.anchor_ms + int(idle_for_s * 1000)
        return advanced if advanced > self.watermark_ms else None

    def idle_advance(self, now_s: float, idle_s: float) -> bool:
        """Advance with the wall clock when idle for ``idle_s``; whether it moved."""
        target = self.idle_target(now_s, idle_s)
        if target is None:
            return False
        self.watermark_ms = target
        return True
