"""Timing one candidate: median of repeats after warm-up, in milliseconds.

CPU: wall clock around each call. torch's thread count is left as the user
set it (it is part of the cache key instead), and the garbage collector is
paused so a collection does not land inside a sample.
CUDA: events recorded on the current stream around each call; never used for
the CPU path, so it cannot be exercised without a GPU: keep it minimal.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class TimerSettings:
    warmup: int = 1          # calls before sampling (the correctness run already warmed up once)
    min_repeats: int = 3
    max_repeats: int = 20
    target_s: float = 0.2    # aim for this much sampled time per candidate


def repeats_for(estimate_s: float, s: TimerSettings) -> int:
    """How many samples fit the per-candidate target, within [min, max]."""
    if estimate_s <= 0:
        return s.max_repeats
    return max(s.min_repeats, min(s.max_repeats, math.ceil(s.target_s / estimate_s)))


def measure(fn: Callable[[], object], device: str = "cpu", *, estimate_s: float = 0.0,
            settings: TimerSettings = TimerSettings()) -> float:
    """Median time of `fn()` in ms. `estimate_s` (one call's time, e.g. from the
    correctness run) sets the number of repeats."""
    n = repeats_for(estimate_s, settings)
    if device.startswith("cuda"):
        return _measure_cuda(fn, device, n, settings.warmup)
    return _measure_cpu(fn, n, settings.warmup)


def _measure_cpu(fn, n: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    was_enabled = gc.isenabled()
    gc.disable()  # no gc.collect() first: with torch loaded a full collection costs ~0.1 s
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(samples) * 1e3


def _measure_cuda(fn, device: str, n: int, warmup: int) -> float:
    import torch

    with torch.cuda.device(torch.device(device)):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        pairs = []
        for _ in range(n):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs)  # already ms


def time_once(fn: Callable[[], object], device: str = "cpu") -> float:
    """One call's time in ms (for interleaved comparisons)."""
    if device.startswith("cuda"):
        return _measure_cuda(fn, device, 1, 0)
    return _measure_cpu(fn, 1, 0)


def sync(device: str) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize(torch.device(device))
