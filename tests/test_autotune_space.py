"""Config spaces: pruning, defaults, validation, merging, fingerprints; and the
search order over them."""

import pytest

from mixerc.autotune import Choice, ConfigSpace
from mixerc.autotune.search import EFFORTS, search
from mixerc.autotune.space import canonical_json
from mixerc.errors import MixerValueError


def chunk_space(default=64):
    return ConfigSpace({"M.chunk": Choice([16, 32, 64, 128, 256], default=default)},
                       constraints=[lambda cfg, shape: cfg["M.chunk"] <= max(16, shape["T"])])


def test_constraints_prune_before_anything_runs():
    s = chunk_space()
    assert s.configs({"T": 100}) == [{"M.chunk": 16}, {"M.chunk": 32}, {"M.chunk": 64}]
    assert len(s.configs({"T": 8192})) == 5
    assert s.configs({"T": 3}) == [{"M.chunk": 16}]


def test_default_falls_back_to_the_nearest_allowed_config():
    s = chunk_space(default=256)
    assert s.default({"T": 8192}) == {"M.chunk": 256}
    assert s.default({"T": 40}) == {"M.chunk": 32}


def test_validate_rejects_unknown_missing_wrong_type_and_out_of_range():
    s = chunk_space()
    assert s.validate({"M.chunk": 128}) == {"M.chunk": 128}
    bad = [{"M.chunk": 128, "M.warps": 4}, {}, {"M.chunk": 128.0}, {"M.chunk": True},
           {"M.chunk": "128"}, {"M.chunk": 48}, {"M.chunk": "__import__('os').system('x')"},
           [("M.chunk", 64)], "M.chunk=64", None]
    for obj in bad:
        with pytest.raises(MixerValueError):
            s.validate(obj)
    with pytest.raises(MixerValueError, match="not allowed"):
        s.validate({"M.chunk": 256}, {"T": 100})


def test_merge_is_the_product_and_refuses_shared_knobs():
    a = chunk_space()
    b = ConfigSpace({"S.warps": Choice([4, 8], default=4)},
                    constraints=[lambda cfg, shape: cfg["S.warps"] * cfg["M.chunk"] <= 1024])
    m = a.merge(b)
    assert m.size() == 10
    assert {"M.chunk": 256, "S.warps": 8} not in m.configs({"T": 8192})
    assert len(m.configs({"T": 8192})) == 9
    assert m.default({"T": 8192}) == {"M.chunk": 64, "S.warps": 4}
    with pytest.raises(MixerValueError, match="share"):
        a.merge(chunk_space())


def test_fingerprint_follows_values_not_defaults_or_constraints():
    assert chunk_space(64).fingerprint() == chunk_space(128).fingerprint()
    bigger = ConfigSpace({"M.chunk": Choice([16, 32, 64, 128, 256, 512], default=64)})
    assert bigger.fingerprint() != chunk_space().fingerprint()
    assert ConfigSpace.from_json(chunk_space().to_json()).fingerprint() == chunk_space().fingerprint()
    # ints and floats are different values (64 vs 64.0)
    floats = ConfigSpace({"M.chunk": Choice([16.0, 32.0, 64.0, 128.0, 256.0], default=64.0)})
    assert floats.fingerprint() != chunk_space().fingerprint()


def test_bad_declarations_are_errors():
    with pytest.raises(MixerValueError):
        Choice([])
    with pytest.raises(MixerValueError):
        Choice([1, "a"])
    with pytest.raises(MixerValueError):
        Choice([1, 2], default=3)
    with pytest.raises(MixerValueError):
        Choice([[1], [2]])
    with pytest.raises(MixerValueError):
        ConfigSpace({"bad name": Choice([1])})


def test_a_constraint_that_raises_rules_the_config_out():
    s = ConfigSpace({"a": Choice([0, 1, 2])}, constraints=[lambda cfg, shape: 1 / cfg["a"] > 0])
    assert s.configs({}) == [{"a": 1}, {"a": 2}]


def _drive(space, shape, effort, cost):
    """Run the search, filling results from a synthetic cost."""
    results, order = {}, []
    for cfg in search(space, shape, effort, results):
        c = canonical_json(cfg)
        if c not in results:
            results[c] = cost(cfg)
            order.append(cfg)
    return order, results


def test_small_spaces_are_searched_exhaustively_default_first():
    s = chunk_space()
    order, _ = _drive(s, {"T": 8192}, EFFORTS["quick"], lambda c: 1.0)
    assert order[0] == {"M.chunk": 64}
    assert len(order) == 5


def test_large_spaces_get_a_budgeted_search_that_still_finds_a_bowl_minimum():
    vals = list(range(12))
    s = ConfigSpace({"a": Choice(vals, default=0), "b": Choice(vals, default=0),
                     "c": Choice(vals, default=11)})
    target = {"a": 7, "b": 3, "c": 5}

    def cost(cfg):  # a smooth bowl: coordinate descent must reach the bottom
        return 1.0 + sum((cfg[k] - target[k]) ** 2 for k in target)

    order, results = _drive(s, {}, EFFORTS["quick"], cost)
    assert len(order) < s.size() // 5          # far fewer than 1728 measured
    best = min(results, key=results.get)
    assert best == canonical_json(target)


def test_failed_candidates_steer_nothing():
    s = chunk_space()
    order, results = _drive(s, {"T": 8192}, EFFORTS["quick"],
                            lambda c: None if c["M.chunk"] == 128 else float(c["M.chunk"]))
    assert results[canonical_json({"M.chunk": 128})] is None
    assert len(order) == 5
