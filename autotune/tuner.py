"""mixerc's tuner: measure a problem's configs, keep the fastest correct one.

    result = tune(problem, effort="quick", budget_s=30)   # TuningProblem -> TuneResult
    config = lookup(problem)        # cache only: the tuned config or None, never measures
    config = config_for(problem)    # what a compiled mixer runs, per MIXERC_AUTOTUNE

Each candidate runs once and its output goes through `problem.check` before it
is timed; a candidate that raises or gives a wrong output is recorded with a
note and never chosen. A winner other than the default is re-timed against the
default, interleaved, and kept only if it is still faster, so noise cannot
make the tuned config slower than the default.
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MixerCacheError, MixerError, MixerValueError
from .backends import Timeout
from .cache import Cache
from .entry import Entry, Timing
from .identity import key_fields, key_of
from .problem import check_problem
from .search import EFFORT_RANK, EFFORTS, planned, search
from .space import canonical_json
from .timer import measure, repeats_for, sync, time_once

MODES = ("0", "1", "force")


def autotune_mode() -> str:
    """MIXERC_AUTOTUNE: 0 (default) never tunes at run time, 1 tunes on a cache
    miss, force retunes (once per process and key)."""
    mode = os.environ.get("MIXERC_AUTOTUNE", "0").strip().lower() or "0"
    if mode not in MODES:
        raise MixerCacheError(f"MIXERC_AUTOTUNE={mode!r} is not one of {', '.join(MODES)}")
    return mode


@dataclass
class Trial:
    config: dict
    ms: float | None             # None: crashed or wrong
    note: str = ""
    cached: bool = False         # timing reused from the cache, not measured now


@dataclass
class TuneResult:
    name: str
    key: str
    best: dict
    default: dict
    trials: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    benchmarks_run: int = 0
    cache_hit: bool = False
    elapsed_s: float = 0.0

    def ms(self, config: dict) -> float | None:
        c = canonical_json(config)
        return next((t.ms for t in self.trials if canonical_json(t.config) == c), None)

    @property
    def best_ms(self) -> float | None:
        return self.ms(self.best)

    @property
    def default_ms(self) -> float | None:
        return self.ms(self.default)

    def speedup(self, trial: Trial) -> float | None:
        d = self.default_ms
        return d / trial.ms if d and trial.ms else None


def _name(problem) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(problem.name))[:100] or "mixer"


# ---------------------------------------------------------------- lookups
def lookup(problem, cache: Cache | None = None) -> dict | None:
    """The cached config for this problem, checked against its current space and
    shape, or None. Never measures anything."""
    check_problem(problem)
    cache = cache if cache is not None else Cache.from_env()
    entry = cache.load(key_of(key_fields(problem)))
    if entry is None:
        return None
    return _usable_best(entry, problem)


def _usable_best(entry: Entry, problem) -> dict | None:
    """The entry's best if the template still allows it for this exact shape
    (T is bucketed, so it may not), else its fastest timing that is allowed."""
    ranked = sorted((t for t in entry.timings if t.ms is not None), key=lambda t: t.ms)
    candidates = ([entry.best] if entry.best is not None else []) + [t.config for t in ranked]
    for cfg in candidates:
        try:
            return problem.space.validate(cfg, problem.shape)
        except MixerError:
            continue
    return None


_forced: set = set()


def config_for(problem, cache: Cache | None = None) -> dict:
    """The config a compiled mixer should run, following MIXERC_AUTOTUNE."""
    mode = autotune_mode()
    cache = cache if cache is not None else Cache.from_env()
    if mode == "force":
        key = key_of(key_fields(problem))
        if key not in _forced:
            _forced.add(key)
            return tune(problem, force=True, cache=cache).best
    found = lookup(problem, cache)
    if found is not None:
        return found
    if mode == "1":
        return tune(problem, cache=cache).best
    return problem.space.default(problem.shape)


# ---------------------------------------------------------------- tuning
def tune(problem, *, effort: str = "quick", budget_s: float | None = None, force: bool = False,
         cache: Cache | None = None, progress: Callable | None = None, seed: int = 0) -> TuneResult:
    """Tune `problem` (or return its cached result: benchmarks_run == 0).

    effort: "quick" or "full" (see search.EFFORTS); budget_s: wall-clock limit
    on measuring (the default config is always measured); force: ignore cached
    timings and measure again; progress(done, planned, trial) after each one."""
    t0 = time.perf_counter()
    check_problem(problem)
    if effort not in EFFORTS:
        raise MixerValueError(f"unknown effort {effort!r}; choose {', '.join(EFFORTS)}")
    eff = EFFORTS[effort]
    cache = cache if cache is not None else Cache.from_env()
    fields = key_fields(problem)
    key = key_of(fields)
    default = problem.space.default(problem.shape)

    if not force:
        hit = _full_hit(cache.load(key), problem, effort, default, t0)
        if hit is not None:
            return hit
    # one tuner per key at a time on this cache dir: a second process waits, then
    # finds the first one's entry instead of measuring on a busy machine
    lock = cache.local.lock(key, "tune", timeout=(budget_s or eff.budget_s) + 60)
    notes = []
    try:
        lock.acquire()
    except Timeout:
        notes.append("another process held the tuning lock too long; tuning anyway")
    try:
        entry = None if force else cache.load(key)
        if not force:
            hit = _full_hit(entry, problem, effort, default, t0)
            if hit is not None:
                return hit
        return _tune(problem, eff, budget_s, cache, key, fields, default, entry, notes,
                     progress, seed, t0)
    finally:
        lock.release()


def _full_hit(entry, problem, effort, default, t0) -> TuneResult | None:
    """A cached result needing no measurement: same space, at least this effort."""
    if entry is None or entry.space.fingerprint() != problem.space.fingerprint() \
            or EFFORT_RANK[entry.effort] < EFFORT_RANK[effort]:
        return None
    best = _usable_best(entry, problem)
    if best is None:
        return None
    trials = [Trial(t.config, t.ms, t.note, cached=True) for t in entry.timings]
    return TuneResult(_name(problem), entry.key, best, default, trials,
                      [f"cache hit ({entry.effort} tuning from {entry.tuned_at or 'unknown time'})"],
                      benchmarks_run=0, cache_hit=True, elapsed_s=time.perf_counter() - t0)


def _tune(problem, eff, budget_s, cache, key, fields, default, entry, notes, progress, seed,
          t0) -> TuneResult:
    space, shape = problem.space, problem.shape
    results, trials = {}, {}
    if entry is not None:  # a smaller space or lower effort: reuse what was measured
        for t in entry.timings:
            try:
                cfg = space.validate(t.config, shape)
            except MixerError:
                continue
            results[canonical_json(cfg)] = t.ms
            trials[canonical_json(cfg)] = Trial(cfg, t.ms, t.note, cached=True)
        if trials:
            notes.append(f"reused {len(trials)} cached timings; measuring only new configs")
    budget = budget_s if budget_s is not None else eff.budget_s
    total = planned(len(space.configs(shape)), len(space.params), eff)
    runs, start = 0, time.perf_counter()   # the budget is for measuring, not for lock waits
    for cfg in search(space, shape, eff, results, seed):
        c = canonical_json(cfg)
        if c in results:
            continue
        if runs and time.perf_counter() - start > budget:
            notes.append(f"budget of {budget:g} s spent after {runs} benchmarks")
            break
        why = problem.screen(cfg) if hasattr(problem, "screen") else None
        if why is not None:  # e.g. kernels that spill on this GPU: never benchmarked
            results[c], trials[c] = None, Trial(cfg, None, f"dropped before benchmarking: {why}")
            notes.append(f"dropped {c}: {why}")
            continue
        trial = _run(problem, cfg, eff)
        runs += 1
        results[c], trials[c] = trial.ms, trial
        if trial.ms is None:
            notes.append(f"discarded {canonical_json(cfg)}: {trial.note}")
        if progress is not None:
            progress(runs, max(total, runs), trial)

    ok = [(t.ms, c) for c, t in trials.items() if t.ms is not None]
    if not ok:
        notes.append("no candidate passed the check; keeping the default (nothing cached)")
        return TuneResult(_name(problem), key, default, default, list(trials.values()), notes,
                          runs, False, time.perf_counter() - t0)
    best = trials[min(ok)[1]].config
    best = _confirm(problem, eff, best, default, trials, notes)
    ordered = list(trials.values())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cache.store(Entry(key, fields, _name(problem), space, eff.name, best,
                      [_as_timing(t) for t in ordered], stamp))
    return TuneResult(_name(problem), key, best, default, ordered, notes, runs, False,
                      time.perf_counter() - t0)


def _as_timing(t: Trial) -> Timing:
    return Timing(t.config, t.ms, t.note)


def _run(problem, cfg: dict, eff) -> Trial:
    """Check one candidate's output, then time it."""
    try:
        fn = problem.runner(cfg)
        start = time.perf_counter()
        out = fn()
        sync(problem.device)
        estimate = time.perf_counter() - start
        reason = problem.check(out)
        del out
    except Exception as e:  # a crashing candidate is data, not a reason to stop tuning
        return Trial(cfg, None, f"crashed: {type(e).__name__}: {str(e)[:200]}")
    if reason is not None:
        return Trial(cfg, None, f"wrong output: {str(reason)[:200]}")
    try:
        return Trial(cfg, measure(fn, problem.device, estimate_s=estimate, settings=eff.timer))
    except Exception as e:
        return Trial(cfg, None, f"crashed while timing: {type(e).__name__}: {str(e)[:200]}")


def _confirm(problem, eff, best, default, trials, notes) -> dict:
    """Re-time best and default call by call, interleaved (so drift in machine
    load hits both alike); keep best only if it is still faster."""
    b, d = trials[canonical_json(best)], trials.get(canonical_json(default))
    if best == default or d is None or d.ms is None or b.cached or d.cached:
        return best
    try:
        fb, fd = problem.runner(best), problem.runner(default)
        tb, td = [], []
        for _ in range(repeats_for(max(b.ms, d.ms) / 1e3, eff.timer)):
            td.append(time_once(fd, problem.device))
            tb.append(time_once(fb, problem.device))
    except Exception as e:
        notes.append(f"re-timing failed ({type(e).__name__}); keeping the default")
        return default
    mb, md = statistics.median(tb), statistics.median(td)
    notes.append(f"re-timed interleaved: best {mb:.3f} ms, default {md:.3f} ms "
                 f"({len(tb)} calls each)")
    if mb >= md:
        notes.append(f"{canonical_json(best)} was not faster than the default when re-timed; "
                     "keeping the default")
        return default
    return best
