"""Which configs to measure, in which order.

Small spaces are searched exhaustively. Larger ones get a budgeted search: a
random sample to find a good region, then coordinate descent (move one knob
one step while that helps). The default always goes first: it is the baseline
that speedups are quoted against, and the answer when nothing else passes.

A search is a generator of configs; between two yields the tuner records each
result in `results` (canonical config JSON -> ms, or None for a failed
candidate), which the search reads to steer. Yielding a config that already
has a result is harmless: the tuner skips it (that is how cached timings are
reused).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from .space import ConfigSpace, canonical_json
from .timer import TimerSettings


@dataclass(frozen=True)
class Effort:
    name: str
    exhaustive_limit: int     # spaces with at most this many valid configs: try them all
    random_samples: int       # budgeted search: random configs before local refinement
    budget_s: float           # default wall-clock budget for one problem
    timer: TimerSettings


EFFORTS = {
    "quick": Effort("quick", 16, 8, 60.0, TimerSettings(warmup=1, min_repeats=3, max_repeats=10,
                                                        target_s=0.1)),
    "full": Effort("full", 256, 32, 600.0, TimerSettings(warmup=2, min_repeats=5, max_repeats=50,
                                                         target_s=0.5)),
}
EFFORT_RANK = {"quick": 0, "full": 1}


def planned(n_configs: int, n_knobs: int, effort: Effort) -> int:
    """A guess of how many configs the search will yield (for a progress bar)."""
    if n_configs <= effort.exhaustive_limit:
        return n_configs
    return min(n_configs, 1 + effort.random_samples + 4 * n_knobs)


def search(space: ConfigSpace, shape: dict, effort: Effort, results: dict,
           seed: int = 0) -> Iterator[dict]:
    configs = space.configs(shape)
    default = space.default(shape)
    yield default
    if len(configs) <= effort.exhaustive_limit:
        yield from configs
        return
    # seeded: two runs of the same problem try the same configs
    rng = random.Random(seed)
    yield from rng.sample(configs, min(effort.random_samples, len(configs)))
    allowed = {canonical_json(c) for c in configs}
    by_key = {canonical_json(c): c for c in configs}

    def best():
        timed = [(ms, k) for k, ms in results.items() if ms is not None and k in allowed]
        return by_key[min(timed)[1]] if timed else default

    while True:
        centre = best()
        for n in space.neighbours(centre):
            if canonical_json(n) in allowed and canonical_json(n) not in results:
                yield n
        if best() == centre:  # no neighbour helped: a local optimum
            return
