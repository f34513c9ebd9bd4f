"""Event-time windows made of aligned buckets.

A window of length ``W`` is read as the ``W / bucket`` most recent aligned buckets of its own
bucket size, the newest being the bucket that holds the window's end (so it is partial):

========  ===========  =========
window    bucket size  buckets
========  ===========  =========
``5m``    1 min        5
``1h``    5 min        12
``24h``   1 h          24
========  ===========  =========

The window's end is the newest event time the pipeline has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A window: its label, its length and the size of its buckets, in milliseconds."""

    label: str
    length_ms: int
    bucket_ms: int

    @property
    def buckets(self) -> int:
        """How many buckets make the window."""
        return self.length_ms // self.bucket_ms


WINDOWS: Final = (
    WindowSpec("5m", 5 * 60_000, 60_000),
    WindowSpec("1h", 3_600_000, 300_000),
    WindowSpec("24h", 86_400_000, 3_600_000),
)

# Bucket data older than this behind a partition's newest event time can no longer be in any
# window (the longest window plus its partial bucket).
RETENTION_MS: Final = max(w.length_ms + w.bucket_ms for w in WINDOWS)


def bucket_start(ts_ms: int, bucket_ms: int) -> int:
    """Start of the aligned bucket holding ``ts_ms`` (epoch ms)."""
    return ts_ms - ts_ms % bucket_ms


def window_bucket_starts(end_ms: int, spec: WindowSpec) -> list[int]:
    """Starts of the buckets that make the window ending at ``end_ms``, oldest first."""
    newest = bucket_start(end_ms, spec.bucket_ms)
    return [newest - i * spec.bucket_ms for i in range(spec.buckets - 1, -1, -1)]
