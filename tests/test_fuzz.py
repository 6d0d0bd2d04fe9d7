"""The fuzz campaign of issue 8 in CI: about a minute of seeded cases on 2 cores.
tests/fuzz.py holds the generators and the runner; `python -m tests.fuzz --cases
20000` is the long mode."""

import collections
import random

import fuzz
import pytest
from mixerc.analysis import analyze
from mixerc.checker import check_source
from mixerc.errors import MixerError

CI_CASES = 1200  # ~50 s with --jobs 2 on the CI machine


def test_fuzz_campaign():
    results = fuzz.campaign(fuzz.make_case(0, i) for i in range(CI_CASES))
    groups = fuzz.failure_groups(results)
    report = fuzz.table(results, "stage") + "".join(
        f"\n{len(recs):5d} x {stage} {etype} {frame}: {recs[0]['source'][:200]!r}"
        for (stage, etype, frame), recs in groups.items())
    assert not groups, report
    # and it tested something: most well-typed programs ran through to the end
    typed = [r for r in results if r["gen"] == "well_typed"]
    assert sum(r["outcome"] == "ok" for r in typed) >= 0.8 * len(typed), report


def test_generators_make_a_healthy_mix():
    """The campaign cannot silently test nothing: well-typed programs mostly
    check and cover every class of matrix; mutations both check and fail;
    cases are deterministic per seed."""
    checked, classes = 0, collections.Counter()
    for i in range(300):
        try:
            program = check_source(fuzz.Program(random.Random(i)).source())
        except MixerError:
            continue
        checked += 1
        try:
            classes.update(m.cls for m in analyze(program).matrices)
        except Exception:  # noqa: BLE001 - the campaign reports these, not this guard
            pass
    assert checked >= 0.3 * 300, checked
    for cls in ("softmax", "semiseparable", "semiseparable (sum)", "quasiseparable",
                "per-channel decay", "polynomial kernel", "toeplitz", "masked low-rank",
                "low-rank", "diagonal", "dense"):
        assert classes[cls] >= 3, (cls, classes)

    sources = [fuzz.mutated_example(random.Random(i)) for i in range(200)]
    ok = 0
    for src in sources:
        try:
            check_source(src)
            ok += 1
        except Exception:  # noqa: BLE001 - MixerError or a finding: either way it failed
            pass
    assert 0.1 * len(sources) <= ok <= 0.9 * len(sources), ok

    gens = collections.Counter(fuzz.make_case(0, i)["gen"] for i in range(1000))
    assert set(gens) == {"hostile", "mutation", "soup", "well_typed", "deep"}, gens
    assert fuzz.make_case(3, 500) == fuzz.make_case(3, 500) != fuzz.make_case(4, 500)


def test_runner_classifies_outcomes():
    """ok, mixer_error, exception and timeout, through the worker pool."""
    cases = [{"id": 0, "gen": "t", "source": "attention"},
             {"id": 1, "gen": "t", "source": "mixer f {\n  dims H\n  out y = q\n}\n"},
             {"id": 2, "gen": "t", "source": None},  # not text: load_source must refuse it
             {"id": 3, "gen": "t", "source": "gla", "sleep": 30}]
    got = {r["id"]: r for r in fuzz.campaign(cases, time_limit=3)}
    assert (got[0]["outcome"], got[0]["stage"]) == ("ok", "decode"), got[0]
    assert (got[1]["outcome"], got[1]["stage"]) == ("mixer_error", "check"), got[1]
    assert (got[2]["outcome"], got[2]["stage"]) == ("mixer_error", "load"), got[2]
    assert (got[3]["outcome"], got[3]["stage"]) == ("timeout", None), got[3]
    assert "run_case" in got[3]["tb"]  # the hung worker's stack came back
