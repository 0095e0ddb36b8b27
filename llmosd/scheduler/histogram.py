"""A fixed-bucket histogram the worker threads update and /metrics reads (no metrics library below the API).

One thread observes; readers take a snapshot. A snapshot taken mid-update may be one observation behind
in one bucket, which a scrape tolerates."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Snapshot:
    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]  # observations <= each bound, then the +Inf total
    total: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]

    def __add__(self, other: Snapshot) -> Snapshot:
        """Both histograms as one (a model's instances reported together)."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be added")
        cumulative = tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True))
        return Snapshot(self.bounds, cumulative, self.total + other.total)


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = SECONDS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> Snapshot:
        counts = list(self._counts)
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return Snapshot(self.bounds, tuple(cumulative), self._sum)
