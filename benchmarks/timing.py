"""Timing shared by the benchmarks: variants timed side by side, in alternation."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per call of each function, timed in alternation so that load from
    other processes on a shared machine hits every variant alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernel selection
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - start)
    return best
