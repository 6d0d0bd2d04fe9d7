"""Quasiseparable matrices (Hydra: a lower semiseparable pass, its reversed
twin, a diagonal) on the Triton backend in one states launch and one output
launch (codegen/triton/terms/quasiseparable.py rendering
templates/triton_quasiseparable.py.jinja; runtime/triton/quasiseparable.py)
against the dense interpreter: Hydra and hand-written pairs (different
decays per direction, q and k at group heads or shared, with and without the
diagonal, strict, non-strict and shifted passes), forward in float32
(< 1e-4), float16 and bfloat16 (< 2e-2; bf16 through the test-only dot
patch), gradients of every input and param (each pass's adjoint runs, no
forward recomputed), T not a multiple of the chunk, batch > 1, outputs
poisoned; the launches counted, so a silent fallback to one call per pass
fails. Without a GPU the kernels run in Triton's interpreter."""

import pytest
import torch
from conftest import assert_gradients_equal_dense, compiled_mixers, rel_err, to_device

import mixerc
from mixerc.inputs import random_inputs

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64
SMALL = {"chunk": 16, "block_k": 16, "block_v": 16}
SIZES = {"H": 4, "G": 2, "D": 20, "V": 20, "N": 20, "P": 20}

# q, k at group heads, a decay of its own per direction, non-strict, a diagonal
GROUPED = """mixer qs_grouped {
  dims H, G divides H, D, V
  input q : [G, D]
  input k : [G, D]
  input q2 : [G, D]
  input k2 : [G, D]
  input v : [H, V]
  input u : [H]
  input u2 : [H]
  input d : [H]
  let L = decay(-softplus(u)) * (q @ k^T)
  let U = rev(decay(rev(-softplus(u2))) * (rev(q2) @ rev(k2)^T))
  out y = (L + U + diag(d)) @ v
}"""
# strict both ways, no diagonal; the upper pass's operands written in its own time
STRICT = """mixer qs_strict {
  dims H, G divides H, D, V
  input q : [G, D]
  input k : [G, D]
  input v : [H, V]
  input u : [H]
  input u2 : [H]
  let L = decay(-softplus(u)) * (q @ k^T) * (s < t)
  let U = rev(decay(-softplus(u2)) * (q @ k^T) * (s < t))
  out y = (L + U) @ v
}"""
# shared B and C, key scales, a shifted lower pass and a non-strict upper one
MIXED = """mixer qs_mixed {
  dims H, N, P
  input x : [H, P]
  input B : [N]
  input C : [N]
  input dt : [H]
  input dt2 : [H]
  param A_log : [H] = log(uniform(1, 4))
  let A = -exp(A_log)
  let f = shift(decay(A * softplus(dt)) * (C @ B^T) * col(softplus(dt)))
  let b = rev(decay(rev(A * softplus(dt2))) * (rev(C) @ rev(B)^T) * col(rev(softplus(dt2))))
  out y = (f + b + diag(dt)) @ x
}"""
# no decay on the upper pass: not this kernel's; one call per pass, still exact
OTHER = """mixer qs_other {
  dims H, D, V
  input q : [H, D]
  input k : [H, D]
  input v : [H, V]
  input u : [H]
  let L = decay(-softplus(u)) * (q @ k^T)
  let U = rev((rev(q) @ rev(k)^T) * (s <= t))
  out y = (L + U) @ v
}"""
PROGRAMS = ["hydra", GROUPED, STRICT, MIXED]
IDS = ["hydra", "grouped", "strict", "mixed"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(**SMALL)


def args_of(m, B=2, T=37, seed=1):
    return random_inputs(m.program, SIZES, B, T, seed=seed, dtype=f64)


class Launches:
    """Kernel launches by name (the interpreter's or a GPU's JIT functions)."""

    def __init__(self, monkeypatch):
        self.seen = []
        classes = [triton.runtime.jit.JITFunction]
        interp = getattr(triton.runtime, "interpreter", None)
        if interp is not None and hasattr(interp, "InterpretedFunction"):
            classes.append(interp.InterpretedFunction)
        for cls in classes:
            real = cls.run

            def run(fn, *a, _real=real, **k):
                self.seen.append(getattr(fn, "__name__", None) or fn.fn.__name__)
                return _real(fn, *a, **k)
            monkeypatch.setattr(cls, "run", run)


@pytest.mark.parametrize("src", PROGRAMS, ids=IDS)
def test_one_launch_per_kernel_kind_for_both_passes(src, compiled, monkeypatch):
    m = compiled(src)
    body = m.source().split("\ndef forward(", 1)[1]
    assert body.count("quasiseparable_apply(") == 1 and ".flip(1)" not in body.split(
        "quasiseparable_apply(")[1], body
    assert "both passes and the diagonal: one states and one output launch" in m.explain()
    if src == "hydra":  # every operand of the reversed pass is rev(x): nothing flipped
        assert ".flip(" not in body, body
    launches = Launches(monkeypatch)
    with torch.no_grad():
        m(**to_device(args_of(m, T=40), torch.float32))
    assert sorted(launches.seen) == ["quasiseparable_kernel_fwd",
                                     "quasiseparable_kernel_states"], launches.seen


def test_other_pairs_keep_one_call_per_pass(compiled):
    m, d = compiled(OTHER), compiled(OTHER, "dense")
    assert "quasiseparable_apply(" not in m.source()
    args = args_of(m, T=21)
    assert rel_err(m(**to_device(args, torch.float32)).cpu(), d(**args)) < 1e-4


# Hydra in both half dtypes and float64 (the separate passes); the others in
# one half dtype each (the interpreter's time)
HALVES = {"hydra": (torch.float16, torch.bfloat16), "grouped": (torch.bfloat16,),
          "strict": (torch.float16,), "mixed": (torch.bfloat16,)}


@pytest.mark.parametrize("src", PROGRAMS, ids=IDS)
def test_forward_equals_dense(src, compiled, bf16_dots):
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, T=37, seed=3)
    want = d(**args)
    y = m(**to_device(args, torch.float32))
    assert y.dtype == torch.float32 and rel_err(y.cpu(), want) < 1e-4
    for half in HALVES[IDS[PROGRAMS.index(src)]]:
        y = m(**to_device(args, half))
        assert y.dtype == half and rel_err(y.cpu(), want) < 2e-2, half
    if src == "hydra":
        assert rel_err(m(**to_device(args, f64)).cpu(), want) < 1e-9


@pytest.mark.parametrize("src", [PROGRAMS[0], GROUPED, STRICT, MIXED],
                         ids=["hydra", "grouped", "strict", "mixed"])
def test_gradients_equal_dense(src, compiled):
    m, d = compiled(src), compiled(src, "dense")
    base = args_of(m, T=21, seed=2)
    assert_gradients_equal_dense(m, d, base)


def test_backward_recomputes_no_forward(compiled, monkeypatch):
    """The backward is the passes' adjoint runs from dy: three states and
    three output launches per pass (dq, dk, dv) and a decay gradient each,
    no fused launch and no forward of a pass recomputed (which would add a
    states and an output launch per pass)."""
    m = compiled("hydra")
    xs = {n: x.requires_grad_() for n, x in to_device(args_of(m, T=40), torch.float32).items()}
    y = m(**xs)
    launches = Launches(monkeypatch)
    y.backward(torch.randn_like(y))
    seen = launches.seen
    assert not [n for n in seen if n.startswith("quasiseparable_kernel")], seen
    assert len([n for n in seen if n.endswith("_states")]) == 2 * 3, seen
    assert len([n for n in seen if n.endswith("_fwd")]) == 2 * 3, seen
    assert seen.count("_mx_decay_grad") == 2, seen


def test_every_output_element_is_written(compiled, poisoned):
    """torch.empty poisoned with NaN: a row past the last chunk, a value
    column past a block edge or a chunk state the kernels skipped stays NaN."""
    m, d = compiled("hydra"), compiled("hydra", "dense")
    args = args_of(m, B=3, T=29, seed=5)
    with torch.no_grad():
        y = m(**to_device(args, torch.float32))
    assert not y.isnan().any() and rel_err(y.cpu(), d(**args)) < 1e-4


def test_decode_is_refused(compiled):
    m = compiled("hydra")
    with pytest.raises(mixerc.MixerError):
        m(**to_device(args_of(m, T=8), torch.float32), return_state=True)


FITNESS = """
import json, mixerc
from mixerc.codegen.triton import fitness
m = mixerc.compile("hydra", backend="triton")
out = []
for target in ("sm_90a", "sm_80"):
    for f in fitness.check(m._impl, {"H": 16, "N": 64, "P": 64}, target):
        out.append(dict(target=target, kernel=f.kernel, spill=f.spill_bytes, mma=f.mma,
                        kind=f.mma_kind, fits=f.fits, error=f.error))
print(json.dumps(out))
"""


def test_fused_kernels_fit_sm90a_and_sm80():
    """Static fitness (no GPU: compiled for the targets) of the two launches
    at Hydra's default config, N = P = 64, bf16: no spills, within shared
    memory, HGMMA on sm_90a."""
    from conftest import run_without_interpreter
    fits = [f for f in run_without_interpreter(FITNESS, timeout=600)
            if f["kernel"].startswith("quasiseparable_kernel_")]
    assert {(f["target"], f["kernel"]) for f in fits} == {
        (t, f"quasiseparable_kernel_{k}") for t in ("sm_90a", "sm_80")
        for k in ("states", "fwd")}, fits
    for f in fits:
        assert f["fits"] and not f["error"] and f["spill"] == 0 and f["mma"] > 0, f
        if f["target"] == "sm_90a":
            assert f["kind"] == "HGMMA", f
