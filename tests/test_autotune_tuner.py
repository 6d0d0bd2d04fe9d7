"""The tuner on problems written against the TuningProblem interface: it picks
the fastest correct config, never a wrong or crashing one, caches by the right
key, reuses timings, and follows MIXERC_AUTOTUNE."""

import statistics
import time

import pytest
import torch
from test_autotune_toy import SleepProblem, ToyLinearAttention, isolated_cache  # noqa: F401

from mixerc.autotune import Choice, ConfigSpace, config_for, identity, lookup, tune
from mixerc.autotune.problem import bucket_T
from mixerc.autotune.search import EFFORTS
from mixerc.autotune.timer import TimerSettings, measure, repeats_for
from mixerc.errors import MixerCacheError, MixerValueError


def test_wrong_and_crashing_candidates_are_discarded_with_a_note_never_chosen():
    # the wrong config (chunk 128) would otherwise be among the fastest
    p = ToyLinearAttention(T=512, H=2, D=16, wrong=(128,), crash=(64,), default=16)
    r = tune(p)
    assert r.best["M.chunk"] not in (64, 128)
    by_chunk = {t.config["M.chunk"]: t for t in r.trials}
    assert by_chunk[128].ms is None and "wrong output" in by_chunk[128].note
    assert by_chunk[64].ms is None and "crashed: RuntimeError" in by_chunk[64].note
    assert any("discarded" in n and "128" in n for n in r.notes)
    assert r.benchmarks_run == 6
    assert p.check(p.runner(r.best)()) is None
    cached = lookup(p)
    assert cached == r.best


def test_picks_the_fastest_config_and_its_table_shows_it():
    p = SleepProblem(fastest=128, default=32)
    r = tune(p)
    assert r.best == {"M.chunk": 128}
    assert r.speedup(next(t for t in r.trials if t.config == r.best)) > 2
    assert r.default_ms > r.best_ms


def test_second_run_is_a_cache_hit_with_zero_benchmarks_in_under_100_ms():
    p = SleepProblem(fastest=64)
    first = tune(p)
    assert first.benchmarks_run == 4 and not first.cache_hit
    runs = p.runs
    t0 = time.perf_counter()
    again = tune(p)
    elapsed = time.perf_counter() - t0
    assert again.cache_hit and again.benchmarks_run == 0 and p.runs == runs
    assert again.best == first.best
    assert elapsed < 0.1, elapsed


def test_nothing_passes_keeps_the_default_and_caches_nothing():
    p = ToyLinearAttention(T=64, chunks=(8, 16), default=8, wrong=(8,), crash=(16,))
    r = tune(p)
    assert r.best == {"M.chunk": 8} and r.best_ms is None
    assert any("no candidate passed" in n for n in r.notes)
    assert lookup(p) is None


def test_a_larger_space_measures_only_the_new_configs():
    tune(SleepProblem(chunks=(16, 32, 64), fastest=None, default=32))
    bigger = SleepProblem(chunks=(16, 32, 64, 128, 256), fastest=256, default=32)
    r = tune(bigger)
    assert r.benchmarks_run == 2 and not r.cache_hit
    assert sorted(t.config["M.chunk"] for t in r.trials if not t.cached) == [128, 256]
    assert r.best == {"M.chunk": 256}
    assert tune(bigger).benchmarks_run == 0


def test_full_effort_after_quick_tunes_again_but_quick_after_full_hits():
    p = SleepProblem()
    tune(p, effort="quick")
    r = tune(p, effort="full")
    assert not r.cache_hit
    assert tune(p, effort="quick").cache_hit


def test_force_measures_again():
    p = SleepProblem()
    tune(p)
    assert tune(p, force=True).benchmarks_run == 4


def test_changed_template_version_device_name_or_threads_miss(monkeypatch):
    tune(SleepProblem(template_version="1"))
    assert tune(SleepProblem(template_version="1")).cache_hit
    assert lookup(SleepProblem(template_version="2")) is None
    monkeypatch.setattr(identity, "_cpu_name", lambda: "some other cpu")
    assert lookup(SleepProblem(template_version="1")) is None
    assert tune(SleepProblem(template_version="1")).benchmarks_run == 4
    monkeypatch.undo()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert lookup(SleepProblem(template_version="1")) is None
    finally:
        torch.set_num_threads(threads)


def test_sequence_lengths_share_an_entry_up_to_the_next_power_of_two():
    assert [bucket_T(t) for t in (1, 2, 3, 4096, 4097, 8192)] == [1, 2, 4, 4096, 8192, 8192]
    tune(SleepProblem(T=5000))
    assert lookup(SleepProblem(T=8192)) is not None
    assert lookup(SleepProblem(T=4096)) is None


def test_lookup_rechecks_cached_configs_against_the_current_constraints():
    p = SleepProblem(fastest=128)
    assert tune(p).best == {"M.chunk": 128}
    # same key and space, but the template now forbids 128 for this shape:
    p.space = ConfigSpace(p.space.params, constraints=[lambda c, s: c["M.chunk"] != 128])
    assert lookup(p) in ({"M.chunk": 16}, {"M.chunk": 32}, {"M.chunk": 64})


def test_budget_stops_a_large_search_but_the_default_is_always_measured():
    p = SleepProblem(chunks=tuple(range(1, 200)), fastest=150, default=3, base_ms=5)
    r = tune(p, budget_s=0.3)
    assert 1 <= r.benchmarks_run < 40
    assert any("budget" in n for n in r.notes)
    assert r.default_ms is not None
    r0 = tune(SleepProblem(template_version="b0", base_ms=5), budget_s=0.0)
    assert r0.benchmarks_run == 1 and r0.best == {"M.chunk": 32}


class FastOnlyAtFirst(SleepProblem):
    """chunk 64 is fast for its first measurement only, then twice as slow as the
    rest: timing noise that made a config look best must not make it the pick."""

    def __init__(self):
        super().__init__(fastest=None, default=32)
        self.calls64 = 0

    def runner(self, config):
        def run():
            if config["M.chunk"] == 64:
                self.calls64 += 1
                time.sleep((0.3 if self.calls64 <= 12 else 2.4) / 1e3)
            else:
                time.sleep(1.2 / 1e3)
        return run


def test_a_winner_that_is_not_faster_when_retimed_loses_to_the_default():
    r = tune(FastOnlyAtFirst())
    assert r.best == {"M.chunk": 32}
    assert any("not faster than the default when re-timed" in n for n in r.notes)
    assert lookup(FastOnlyAtFirst()) == {"M.chunk": 32}


def test_modes_of_mixerc_autotune(monkeypatch):
    p = SleepProblem(fastest=128)
    assert config_for(p) == {"M.chunk": 32} and p.runs == 0     # 0: default on a miss
    monkeypatch.setenv("MIXERC_AUTOTUNE", "1")
    assert config_for(p) == {"M.chunk": 128} and p.runs > 0      # 1: tune on a miss
    runs = p.runs
    assert config_for(p) == {"M.chunk": 128} and p.runs == runs  # then the cache
    monkeypatch.setenv("MIXERC_AUTOTUNE", "0")
    assert config_for(p) == {"M.chunk": 128}                     # 0: cache when present
    monkeypatch.setenv("MIXERC_AUTOTUNE", "force")
    config_for(p)
    assert p.runs > runs                                          # force: retune once
    runs = p.runs
    config_for(p)
    assert p.runs == runs
    monkeypatch.setenv("MIXERC_AUTOTUNE", "yes")
    with pytest.raises(MixerCacheError):
        config_for(p)


def test_malformed_problems_are_named():
    p = SleepProblem()
    p.key = {"module": "x"}
    with pytest.raises(MixerValueError, match="key"):
        tune(p)
    with pytest.raises(MixerValueError, match="effort"):
        tune(SleepProblem(), effort="max")


def test_timer_takes_the_median_after_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002 if len(calls) > 1 else 0.05)  # a slow first call (compile)
    ms = measure(fn, "cpu", estimate_s=0.002, settings=TimerSettings(warmup=1, min_repeats=5,
                                                                      max_repeats=5))
    assert len(calls) == 6
    assert 1.5 < ms < 20
    assert repeats_for(1.0, EFFORTS["quick"].timer) == 3
    assert repeats_for(1e-6, EFFORTS["quick"].timer) == 10


def test_toy_speed_depends_on_chunk_length():
    # the premise of CPU tuning: chunk length matters (here 8 vs 128 at T=1024)
    p = ToyLinearAttention(T=1024, H=2, D=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is steadier on a busy machine
    try:
        t = {c: statistics.median(_time(p.runner({"M.chunk": c})) for _ in range(3))
             for c in (8, 128)}
    finally:
        torch.set_num_threads(threads)
    assert t[8] > 1.5 * t[128], t


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_a_space_with_several_knobs_is_tuned_as_a_product():
    p = SleepProblem()
    p.space = p.space.merge(ConfigSpace({"S.split": Choice([1, 2], default=1)}))
    r = tune(p)
    assert set(r.best) == {"M.chunk", "S.split"} and r.benchmarks_run == 8
