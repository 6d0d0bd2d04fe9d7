"""Generated modules read like a person wrote them: explicit imports only,
nothing unused (pyflakes finds no issue), no no-op reshapes, names from the
mixer's lets and the operands' roles, and standalone modules that inline only
the runtime definitions they use."""

import io
import re

import mixerc
import pyflakes.api
import pyflakes.reporter
import pytest
from conftest import STDLIB

pytestmark = pytest.mark.usefixtures("fresh_cache")


def flakes(src: str) -> str:
    out = io.StringIO()
    pyflakes.api.check(src, "generated.py", pyflakes.reporter.Reporter(out, out))
    return out.getvalue()


@pytest.mark.parametrize("name", STDLIB)
@pytest.mark.parametrize("standalone", [False, True])
def test_pyflakes_finds_nothing(name, standalone):
    src = mixerc.compile(name)._impl.generate(standalone=standalone)[0]
    assert flakes(src) == ""
    assert "import *" not in src


TRITON_PROGRAMS = ["attention", "sliding_window", "retnet", "ssd", "linear_attention", "hydra",
                   "gla", "mamba"]


@pytest.mark.parametrize("index", range(len(TRITON_PROGRAMS) + 4))
@pytest.mark.parametrize("standalone", [False, True])
def test_triton_modules_pyflakes_clean(index, standalone):
    """The Triton backend's modules too: kernels with score modifications,
    per-token and per-head values, windows (the named variants of
    test_plan_classes.FIXED)."""
    pytest.importorskip("triton")
    from test_plan_classes import FIXED
    src = (TRITON_PROGRAMS + FIXED[:4])[index]
    code = mixerc.compile(src, backend="triton")._impl.generate(standalone=standalone)[0]
    assert flakes(code) == ""


@pytest.mark.parametrize("name", STDLIB)
def test_no_noop_reshapes(name, monkeypatch):
    """Run the generated forward and record every reshape it calls whose
    result has the shape it already had."""
    import sys

    import torch
    from reference import make_inputs

    m = mixerc.compile(name)
    file = m._impl.module.__file__
    noops, original = [], torch.Tensor.reshape

    def reshape(self, *shape):
        out = original(self, *shape)
        caller = sys._getframe(1)
        if out.shape == self.shape and caller.f_code.co_filename == file and \
                caller.f_code.co_name == "forward":
            noops.append(caller.f_lineno)
        return out

    monkeypatch.setattr(torch.Tensor, "reshape", reshape)
    m(**make_inputs(name, B=2, T=9, seed=0))
    lines = m.source().splitlines()
    assert noops == [], [lines[i - 1].strip() for i in noops]


def test_values_are_named_after_lets_and_roles():
    src = mixerc.compile("ssd").source()
    forward = src[src.index("def forward("):src.index("def init_params(")]
    assert "delta = F.softplus(" in forward        # a let keeps its name
    assert re.search(r"\blog_decay\b = ", forward)  # an operand is named by its role


def test_standalone_modules_inline_only_what_they_use():
    ssd = mixerc.compile("ssd")._impl.generate(standalone=True)[0]
    for helper in ("def key_span", "def causal_conv", "def conv_fft", "def iv_add",
                   "def poly_features", "def shift_tokens", "def sdpa_attention"):
        assert helper not in ssd, helper
    assert "def to_chunks" in ssd and "def chunked_apply" in ssd and "class Mixer" in ssd
    attention = mixerc.compile("attention")._impl.generate(standalone=True)[0]
    assert "def sdpa_attention" in attention and "def to_chunks" not in attention
