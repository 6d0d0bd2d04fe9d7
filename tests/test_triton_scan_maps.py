"""The per-channel scan (templates/triton_scan.py.jinja, algorithm="scan")
with a log-decay that does not factor but is an elementwise map of the
user's per-token [H, K] input and [H, K] / [H] params (fla's GLA gate
logsigmoid(gk) / 16: codegen/triton/terms/per_channel.py decay_map, the
scan's `a_map`): the forward kernel computes the map as it loads the leaves,
as the chunks' cumsum kernel does (tests/test_triton_per_channel_prologue.py),
so the generated forward computes no map in torch before the scan and the
scan's op receives the leaves as given (no [B, T, H, K] log-decay). The
backward recomputes the map by torch and chains through it
(runtime/triton/scan.py MappedScanFn); a decode step is one launch of the
chunked family's recurrence kernel that computes it on load (`_fwd_step`). Every path equals the dense float64
interpreter: forward in float32 and bfloat16, every gradient, prefill then
decode, T not a multiple of the scan's checkpoint segment, batch > 1, a
strided gate, outputs poisoned. The scan's forward kernel with the map fits
sm_90a and sm_80 at GLA's K = 128 (no spills), and so does the decode
step's recurrence kernel that computes the map on load (the chunked
family's `_fwd_step`, which both branches' decode steps launch). Kernels run in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1)."""

import re
import textwrap

import pytest
import torch
from conftest import (assert_gradients_equal_dense, assert_one_launch_per_step,
                      assert_prefill_then_decode, assert_steps_in_place, compiled_mixers, rel_err,
                      run_without_interpreter)
from test_triton_per_channel_prologue import FIXED, GATE, args_of, mapped_program
from test_triton_scan_prologue import forward_source, on_device

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

CASES = FIXED + [mapped_program(4)]
IDS = ["logsigmoid16", "softplus", "exp_A_sigmoid", "log_sigmoid", "per_head_a", "mapped4"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(algorithm="scan")  # the scan, pinned (not the cost model's pick)


def scan_forwards(m, monkeypatch) -> list:
    """The scan's forward op's arguments, per call (its backward op unspied)."""
    mod = m._impl.module
    names = [n for n in vars(mod) if n.endswith("_ops") and n.startswith("per_channel_scan")]
    assert len(names) == 1, names
    calls = []
    fwd, bwd = getattr(mod, names[0])

    def spy(*args):
        calls.append(args)
        return fwd(*args)
    monkeypatch.setattr(mod, names[0], (spy, bwd))
    return calls


def test_the_forward_computes_no_map(compiled):
    """Every program: the scan's branch of the generated forward computes no
    log-decay in torch (no `_prologue(` call, no map op) and hands the scan
    its leaves; explain says the scan computes it on load."""
    for src in CASES:
        m = compiled(src)
        assert "and so does the scan" in m.explain()
        forward = forward_source(m)
        lines = forward.splitlines()
        start = next(i for i, ln in enumerate(lines) if "if algorithm == 'scan'" in ln)
        end = next(i for i, ln in enumerate(lines) if ln.strip().startswith("else:  # the chunked"))
        branch = "\n".join(ln.split("#")[0] for ln in lines[start:end])
        assert "_prologue(" not in branch and "log_decay" not in branch, branch
        assert not re.search(r"logsigmoid|softplus|sigmoid|exp\(|log\(|/ 16", branch), branch
        call = next(ln for ln in lines[start:end] if "per_channel_scan(" in ln)
        assert re.search(r", None, None, state\.get\('y'\), .*, leaves=\[(\w+, )*gk_in[,\]]", call), call
    # the gate: no map and no float32 copy of gk in torch outside float64's branch
    gate = forward_source(compiled(GATE)).split("else:  # float64")[0]
    code = "\n".join(ln.split("#")[0] for ln in gate.splitlines())
    assert not re.search(r"logsigmoid|/ 16|gk\.to\(|_prologue\(", code), code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_receives_the_leaves(compiled, monkeypatch, dtype):
    """The forward op gets gk as given (its storage and dtype), no log-decay
    (a None) and the map flag; no float32 [B, T, H, K] tensor besides."""
    m = compiled(GATE)
    calls = scan_forwards(m, monkeypatch)
    args = on_device(args_of(m, T=21), dtype)
    with torch.no_grad():
        m(**args)
    (q, k, v, dt, a, state, block_h, warps, seg, leaves, mapped, *rest), = calls
    assert dt is None and a is None and mapped is True and seg == 0
    assert len(leaves) == 1 and leaves[0].data_ptr() == args["gk"].data_ptr()
    assert leaves[0].dtype == dtype


def test_a_strided_gate_is_read_as_given(compiled, monkeypatch, poisoned):
    """gk a slice of a wider projection (non-contiguous): read by its strides."""
    m, d = compiled(GATE), compiled(GATE, "dense")
    args = args_of(m, T=21, seed=2)
    wide = torch.randn(*args["gk"].shape[:3], 2 * args["gk"].shape[3], dtype=f64)
    args["gk"] = wide[..., 1::2]
    want = d(**args)
    calls = scan_forwards(m, monkeypatch)
    dev = on_device(args, torch.float32)
    dev["gk"] = wide.float()[..., 1::2]  # (a cast would copy it contiguous)
    assert not dev["gk"].is_contiguous()
    with torch.no_grad():
        y = m(**dev)
    assert calls[0][9][0].data_ptr() == dev["gk"].data_ptr()
    assert rel_err(y.cpu(), want) < 1e-4


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_forward_equals_dense(src, compiled, monkeypatch, bf16_dots, poisoned):
    """B = 2, T = 37: float32 and bfloat16 on the mapped scan."""
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=37, V=4, seed=5)
    want = d(**args)
    calls = scan_forwards(m, monkeypatch)
    with torch.no_grad():
        y = m(**on_device(args, torch.float32))
        assert not y.isnan().any() and rel_err(y.cpu(), want) < 1e-4
        y = m(**on_device(args, torch.bfloat16))
        assert rel_err(y.float().cpu(), want) < 2e-2
    assert [c[10] for c in calls] == [True, True]  # the kernel mapped on load


# a token leaf alone, beside an [H, K] param, beside an [H] param
GRAD_CASES = [GATE, FIXED[2], FIXED[4]]


@pytest.mark.parametrize("src", GRAD_CASES, ids=["logsigmoid16", "exp_A_sigmoid", "per_head_a"])
def test_every_gradient_equals_dense(src, compiled, monkeypatch, poisoned):
    """T = 70 (the scan's checkpoints every 64 tokens: a whole segment and 6
    tokens), batch 2, every input and param; the forward mapped on load."""
    m, d = compiled(src), compiled(src, "dense")
    calls = scan_forwards(m, monkeypatch)
    torch.manual_seed(0)
    assert_gradients_equal_dense(m, d, args_of(m, B=2, T=70, V=3, seed=3))
    assert [(c[4], c[8], c[10]) for c in calls] == [(None, 64, True)]


def test_gradients_through_a_carried_state(compiled):
    """Two calls, the first's final state the second's initial state: every
    gradient (q, k, v, gk, A) through both against dense on the whole."""
    src = FIXED[2]
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=41, V=2, seed=6)
    w = torch.randn(2, 41, 2, 2, dtype=f64, generator=torch.Generator().manual_seed(7))
    ref = {n: x.clone().requires_grad_() for n, x in args.items()}
    (d(**ref) * w).sum().backward()
    got = {n: x.float().requires_grad_() for n, x in args.items()}
    part = lambda a, b: {n: (x[:, a:b] if x.dim() >= 3 else x)  # noqa: E731
                         for n, x in got.items()}
    y1, state = m(**part(0, 23), return_state=True)
    y2 = m(**part(23, 41), initial_state=state)
    (torch.cat([y1, y2], 1) * w.float()).sum().backward()
    for n in args:
        assert rel_err(got[n].grad, ref[n].grad) < 1e-4, n


@pytest.mark.parametrize("src", [GATE, FIXED[4]], ids=["logsigmoid16", "per_head_a"])
def test_prefill_then_decode(src, compiled, monkeypatch):
    """Prefills of 20 and 17 tokens on the mapped scan (the second from a
    nonzero state), then decode steps (the recurrence, the map on load)."""
    m, d = compiled(src), compiled(src, "dense")
    calls = scan_forwards(m, monkeypatch)
    args = args_of(m, B=2, T=40, seed=8)
    assert_prefill_then_decode(m, on_device(args, torch.float32), d(**args), 20, 37)
    assert [c[10] for c in calls] == [True, True]


@pytest.mark.parametrize("algorithm", ["scan", "chunks"])
def test_a_decode_step_is_one_launch_mapping_on_load(algorithm, monkeypatch, launches, poisoned):
    """Decode steps (1 to 16 tokens, no gradient) of the gate, from either
    branch's prefill: one launch each of the chunked family's recurrence that
    computes the map on load (`_fwd_step`: no torch map, no launch of the
    shared recurrence on a written log-decay), equal to dense, the state
    updated in place; continuing an older state is refused."""
    get = compiled_mixers(algorithm=algorithm)
    m, d = get(FIXED[4]), get(FIXED[4], "dense")
    host = next(n for n in m._impl._kernel_dims if n.startswith("per_channel") and
                not n.startswith("per_channel_scan"))
    mod = m._impl.module
    monkeypatch.setattr(getattr(mod, host), "prologue", None)  # no map by torch
    scan, = [n for n in vars(mod) if n.startswith("per_channel_scan") and n.endswith("_prologue")]
    real = getattr(mod, scan)

    def no_map(v, dt, leaves, skip):  # the scan's torch map: not for a decode step
        assert leaves is None
        return real(v, dt, leaves, skip)
    monkeypatch.setattr(mod, scan, no_map)
    args = args_of(m, B=2, T=60, seed=13)
    want = d(**args)
    x = on_device(args, torch.float32)
    with torch.no_grad():
        _, state = m(**{n: (v[:, :20] if v.dim() >= 3 else v) for n, v in x.items()},
                     return_state=True)
        assert_one_launch_per_step(m, x, want, launches, host + "_fwd_step", 20, state, "y")
        assert_steps_in_place(m, x, want, "y", at=40)


@pytest.mark.parametrize("algorithm", ["scan", "chunks"])
def test_a_bf16_decode_step_stores_y_in_bf16(algorithm, launches, poisoned):
    """A decode step on bfloat16 inputs (the gate's y the mixer's output as
    is): the mapped step kernel stores y in bfloat16 (accumulated in
    float32), equal to dense."""
    m, d = compiled_mixers(algorithm=algorithm)(GATE), compiled_mixers()(GATE, "dense")
    args = args_of(m, B=2, T=24, seed=14)
    want = d(**args)
    x = on_device(args, torch.bfloat16)
    with torch.no_grad():
        _, state = m(**{n: v[:, :22] for n, v in on_device(args, torch.float32).items()},
                     return_state=True)
        del launches[:]
        y, state = m.step(state, **{n: v[:, 22] for n, v in x.items()})
    assert len(launches) == 1 and launches[0].endswith("_fwd_step"), launches
    assert y.dtype == torch.bfloat16 and rel_err(y.float().cpu(), want[:, 22]) < 2e-2


def test_strong_decays_stay_finite(compiled, poisoned):
    """-softplus(gk), gk ~ 5 (log-decays ~ -5 a step) over 150 tokens: finite
    and equal to dense, forward and gradients."""
    src = FIXED[1]
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=1, T=150, H=1, K=16, V=2, seed=9, gate_mean=5.0)
    with torch.no_grad():
        y = m(**on_device(args, torch.float32))
    assert torch.isfinite(y).all() and rel_err(y.cpu(), d(**args)) < 1e-4
    assert_gradients_equal_dense(m, d, args)


FITNESS = textwrap.dedent("""
    import json
    import mixerc
    from mixerc.codegen.triton import fitness
    out = []
    r = mixerc.compile(%r, backend="triton")._impl
    mod = r.module
    shapes = r.kernel_shapes({"H": 16, "K": 128, "V": 128})
    for function, name, kernel in fitness.kernels_of(mod):
        if not (name.endswith("_fwd_step") or "_scan" in function and name.endswith("_fwd")):
            continue
        key, D, DV = shapes[function]
        meta = getattr(mod, name + "_compile_meta", None) or \
            getattr(mod, function + "_compile_meta")
        cfg = {k: mod.DEFAULT_CONFIG[key + "." + k] for k in meta.knobs}
        for target in ("sm_90a", "sm_80"):
            fit = fitness._fit(kernel, function, name, cfg, target, "bf16", False,
                               lambda: meta(D, DV, cfg, "bf16"))
            out.append(dict(target=target, kernel=name, err=fit.error,
                            regs=fit.registers, spill=fit.spill_bytes))
    print(json.dumps(out))
""") % GATE


def test_the_mapped_scan_fits_sm90a_and_sm80():
    """The scan's forward with the gate's map on load (MAP, the leaf's strides)
    and the decode step's recurrence with it (`_fwd_step`) at GLA's K = V =
    128, the default config: no spills on either target."""
    fits = run_without_interpreter(FITNESS, timeout=600)
    assert sorted((f["target"], f["kernel"].split("_")[-1]) for f in fits) == [
        ("sm_80", "fwd"), ("sm_80", "step"), ("sm_90a", "fwd"), ("sm_90a", "step")]
    for f in fits:
        assert not f["err"] and f["spill"] == 0 and f["regs"] <= 255, f
