"""Tuning problems for the autotuner tests, written against the TuningProblem
interface only (the torch backend's real problems are tested in
test_autotune_mixer.py).

`ToyLinearAttention` is a real chunked causal linear attention whose CPU speed
depends on the chunk length (short chunks: many small steps; long chunks:
quadratic work inside each), with chosen chunk lengths made deliberately wrong
or crashing. `SleepProblem` is a fast stand-in whose timings are set by
config. Both are importable by the subprocess scripts of the cache tests.
"""

from __future__ import annotations

import time

import torch

from mixerc.autotune import Choice, ConfigSpace


def linear_attention_chunked(q, k, v, chunk: int, skip_state: bool = False):
    """y_t = sum_{s<=t} (q_t . k_s) v_s for [B, T, H, D] inputs, chunk by chunk."""
    B, T, H, D = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))          # [B, H, T, D]
    state = q.new_zeros(B, H, D, v.shape[-1])
    mask = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    out = []
    for i in range(0, T, chunk):
        qc, kc, vc = q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk]
        n = qc.shape[2]
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask[:n, :n], 0.0)
        out.append(scores @ vc + qc @ state)
        if not skip_state:
            state = state + kc.transpose(-1, -2) @ vc
    return torch.cat(out, 2).transpose(1, 2)


def linear_attention_reference(q, k, v):
    q, k, v = (x.double() for x in (q, k, v))
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    return torch.einsum("bhts,bshd->bthd", scores, v)


class ToyLinearAttention:
    name = "toy_linear_attention"

    def __init__(self, T=1024, H=2, D=16, wrong=(), crash=(), chunks=(8, 16, 32, 64, 128, 256),
                 default=16, template_version="1", seed=0):
        # template_version stands for a changed generated module: a new key
        self.key = {"module": f"toy-linear-attention-{template_version}", "backend": "torch"}
        self.shape = {"B": 1, "T": T, "H": H, "D": D, "dtype": "float32"}
        self.space = ConfigSpace({"M.chunk": Choice(list(chunks), default=default)},
                                 constraints=[lambda cfg, shape: cfg["M.chunk"] <= max(8, shape["T"])])
        self.device = "cpu"
        self.wrong, self.crash = set(wrong), set(crash)
        g = torch.Generator().manual_seed(seed)
        self.inputs = [torch.randn(1, T, H, D, generator=g) / D ** 0.5 for _ in range(3)]
        self.reference = linear_attention_reference(*self.inputs)
        self.runs = 0

    def runner(self, config):
        chunk = config["M.chunk"]
        if chunk in self.crash:
            def boom():
                raise RuntimeError(f"kernel failed for chunk {chunk}")
            return boom

        def run():
            self.runs += 1
            return linear_attention_chunked(*self.inputs, chunk, skip_state=chunk in self.wrong)
        return run

    def check(self, output):
        err = float((output.double() - self.reference).norm() / self.reference.norm())
        return None if err < 1e-4 else f"relative error {err:.2e}"


class SleepProblem:
    """Each config sleeps a known time: the fastest is chunk=`fastest`."""
    name = "sleepy"

    def __init__(self, chunks=(16, 32, 64, 128), fastest=64, default=32, template_version="1",
                 T=4096, base_ms=0.3):
        self.key = {"module": f"sleep-{template_version}", "backend": "torch"}
        self.shape = {"B": 1, "T": T, "H": 2, "dtype": "float32"}
        self.space = ConfigSpace({"M.chunk": Choice(list(chunks), default=default)})
        self.device = "cpu"
        self.fastest, self.base_ms = fastest, base_ms
        self.runs = 0
        self.on_run = None   # hook: called with the config on every run

    def runner(self, config):
        delay = self.base_ms * (1 if config["M.chunk"] == self.fastest else 4) / 1e3

        def run():
            self.runs += 1
            if self.on_run is not None:
                self.on_run(config)
            time.sleep(delay)
            return config["M.chunk"]
        return run

    def check(self, output):
        return None


def test_chunked_matches_reference():
    p = ToyLinearAttention(T=100)
    for chunk in (8, 32, 256):
        assert p.check(p.runner({"M.chunk": chunk})()) is None


def test_wrong_and_crashing_configs_are_what_they_claim():
    p = ToyLinearAttention(T=100, wrong=(16,), crash=(8,))
    assert "relative error" in p.check(p.runner({"M.chunk": 16})())
    try:
        p.runner({"M.chunk": 8})()
    except RuntimeError:
        pass
    else:
        raise AssertionError("chunk 8 should crash")


# ---------------------------------------------------------------- shared by the autotune/cache tests
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir, no Redis, no tuning at run time, and
    the once-per-process Redis warning re-armed. Never the user's real cache."""
    from mixerc.autotune import backends, tuner

    monkeypatch.setenv("MIXERC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXERC_REMOTE_CACHE", raising=False)
    monkeypatch.delenv("MIXERC_AUTOTUNE", raising=False)
    monkeypatch.setattr(backends, "_remote_warned", False)
    monkeypatch.setattr(backends, "_down_urls", set())
    monkeypatch.setattr(tuner, "_forced", set())
    return tmp_path / "cache"


SUBPROCESS_TUNE = """
import json, sys, warnings
import torch
torch.set_num_threads(1)  # part of the CPU cache key: the same in every process
sys.path.insert(0, {tests!r})
from test_autotune_toy import SleepProblem
from mixerc.autotune import tune
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    r = tune(SleepProblem(**{kwargs!r}))
print(json.dumps({{"best": r.best, "runs": r.benchmarks_run, "hit": r.cache_hit,
                  "warnings": [str(x.message) for x in w]}}))
"""


def tune_in_subprocess(env: dict, wait: bool = True, **kwargs):
    """Tune a SleepProblem in a fresh Python process ("another machine" when
    given another cache dir); returns its JSON report (or the Popen)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("MIXERC_") and k != "PYTEST_CURRENT_TEST"}
    full_env.update(env)
    proc = subprocess.Popen([sys.executable, "-c",
                             SUBPROCESS_TUNE.format(tests=TESTS_DIR, kwargs=kwargs)],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return finish(proc) if wait else proc


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])
