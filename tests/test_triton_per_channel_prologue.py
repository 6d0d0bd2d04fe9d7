"""The log-decay map the per-channel chunks' cumsum kernel computes on load
(codegen/triton/terms/per_channel.py `decay_map`, rendered by
codegen/triton/prologue.py's scalar_map; the kernel is the template's
_fwd_cumsum, built from runtime/triton/per_channel.py's cumsum steps): fla's
GLA gate logsigmoid(gk) / 16 and other elementwise maps of a per-token
[H, K] input and [H, K] params. The generated forward must not compute the
map in torch before the chunked kernels (a fusion that silently stops fails
here), their op must receive the gate as the user passed it, and every path
must equal the dense float64 interpreter: forward in float32, bfloat16 and
float64 (the torch code), every gradient (the backward recomputes the map in
torch and chains through it: runtime/triton/per_channel.py
MappedPerChannelFn), the gradient through a state carried between calls,
prefill then decode, T not a multiple of the chunk, batch > 1, random map
programs (with [H, K] and [H] params), strong decays over a long input, the
torch.compile branch, the scan's branch, and a map the kernel cannot take (a
per-token [H] input) on today's torch path.
The chunked kernels are pinned (algorithm="chunks": small test dims would
pick the scan); outputs poisoned. Kernels run in Triton's CPU interpreter
(conftest sets TRITON_INTERPRET=1)."""

import random
import re

import pytest
import torch
from conftest import (assert_gradients_equal_dense, assert_prefill_then_decode, compiled_mixers,
                      rel_err, to_device)
from test_triton_scan_prologue import forward_source, on_device

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64


def program(name: str, decay: str, params: str = "") -> str:
    return f"""mixer {name} {{
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input gk : [H, K]
{params}
  out y = (decay({decay}) * (q @ k^T)) @ v
}}"""


GATE = program("gla_gate", "logsigmoid(gk) / 16")


def mapped_program(seed: int) -> str:
    """A random GLA-like mixer whose log-decay is a map of gk and [H, K] params."""
    rng = random.Random(seed)
    inner = rng.choice(["gk", "gk + b", "gk * c"])
    decay = rng.choice(["logsigmoid({g}) / 16", "-softplus({g})", "-exp(A) * sigmoid({g})",
                        "log(sigmoid({g}))", "-(softplus({g}) * c)"]).format(g=inner)
    params = [f"  param {n} : [H, K] = uniform(0.5, 1.5)" for n in ("A", "b", "c")
              if re.search(rf"\b{n}\b", decay)]
    return program(f"pcmap_{seed}", decay, "\n".join(params))


FIXED = [GATE, program("softplus_gate", "-softplus(gk)"),
         program("exp_gate", "-exp(A) * sigmoid(gk)", "  param A : [H, K] = uniform(-1, 0.5)"),
         program("log_sigmoid_gate", "log(sigmoid(gk))"),
         # a per-head [H] param beside the gate
         program("per_head_gate", "-exp(a) * softplus(gk)", "  param a : [H] = uniform(-1, 0)")]
SEEDS = [1, 4, 9]
CASES = FIXED + [mapped_program(s) for s in SEEDS]
IDS = ["logsigmoid16", "softplus", "exp_A_sigmoid", "log_sigmoid", "per_head_a"] + \
    [f"mapped{s}" for s in SEEDS]
# a per-token [H] input in the map: not one the cumsum kernel takes (today's torch path)
UNMAPPED = """mixer unmapped_gate {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input gk : [H, K]
  input dt : [H]
  out y = (decay(-softplus(gk) * sigmoid(dt)) * (q @ k^T)) @ v
}"""


@pytest.fixture(scope="module")
def compiled():
    # chunks of 16 (several chunks and sub-chunks at these T), the chunked kernels
    return compiled_mixers(algorithm="chunks", tri_chunk=16, tri_sub=16)


def args_of(m, B=2, T=37, H=2, K=12, V=8, seed=1, gate_mean=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    args = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V),
                gk=r(B, T, H, K) + gate_mean)
    for n in ("A", "b", "c"):
        if n in m.program.params:
            args[n] = r(H, K) * 0.3 + (0.0 if n == "A" else 1.0)
    if "a" in m.program.params:
        args["a"] = r(H) * 0.3 - 0.5
    if "dt" in m.program.inputs:
        args["dt"] = r(B, T, H)
    return args


def host_of(m):
    mod = m._impl.module
    name = next(fn for fn in m._impl._kernel_dims if hasattr(mod, fn + "_backward"))
    return getattr(mod, name)


def mapped_calls(m, monkeypatch) -> list:
    """The chunked kernels' launches with the map on load (run.mapped's
    arguments), and the unmapped op's (("op", args)), in order."""
    host, mod = host_of(m), m._impl.module
    calls = []
    mapped, op = host.mapped, getattr(mod, host.__name__ + "_op")

    def spy_mapped(*args):
        calls.append(("mapped", args))
        return mapped(*args)

    def spy_op(*args):
        calls.append(("op", args))
        return op(*args)
    monkeypatch.setattr(host, "mapped", spy_mapped)
    monkeypatch.setattr(mod, host.__name__ + "_op", spy_op)
    return calls


def test_the_programs_have_maps(compiled):
    """Every program is planned with the cumsum kernel computing its map (else
    the tests below would not test it), explain says so, and a per-token [H]
    input keeps today's path."""
    for src in CASES:
        text = compiled(src).explain()
        assert "the chunks' cumsum kernel computes on load" in text, text
        assert "_fwd_cumsum(" in compiled(src).source()
    assert "cumsum kernel computes on load" not in compiled(UNMAPPED).explain()
    assert "log_decay = (F.logsigmoid(gk) / 16.0)" in compiled(GATE).explain()


def test_gate_forward_computes_no_map(compiled):
    """The gate's generated forward: no logsigmoid and no / 16 in torch before
    the chunked kernels or the scan (the float64 branch alone computes it);
    both hosts are told gk as given (leaves=) and no log-decay
    (tests/test_triton_scan_maps.py: the scan's); no float32 copy of gk
    outside the float64 branch."""
    forward = forward_source(compiled(GATE))
    lines = forward.splitlines()
    call = next(i for i, ln in enumerate(lines) if "per_channel_apply(" in ln)
    assert "leaves=[gk_in]" in lines[call + 1] and ", None, state" in lines[call + 1]
    f64_branch = next(i for i, ln in enumerate(lines) if "else:  # float64" in ln)
    before = [ln.split("#")[0] for ln in lines[:f64_branch]]
    text = "\n".join(before)
    assert not re.search(r"logsigmoid|/ 16|gk\.to\(|_prologue\(|log_decay\w* = ", text), text
    scan = [ln for ln in before if "per_channel_scan(" in ln]
    assert len(scan) == 1 and ", None, None, " in scan[0] and "leaves=[gk_in]" in scan[0], scan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_receives_what_the_user_passed(compiled, monkeypatch, launches, dtype):
    """The mapped launches get gk as given (its storage, its dtype): the only
    [B, T, H, K] float32 tensor the forward writes is the cumsum, by the
    mapped cumsum kernel (the shared unmapped one never runs)."""
    m = compiled(GATE)
    calls = mapped_calls(m, monkeypatch)
    args = on_device(args_of(m), dtype)
    with torch.no_grad():
        m(**args)
    (what, (q, k, v, leaves, state, *cfg)), = calls
    assert what == "mapped" and state is None and cfg[0] == 16
    assert len(leaves) == 1 and leaves[0].data_ptr() == args["gk"].data_ptr()
    assert leaves[0].dtype == dtype and leaves[0].shape == args["gk"].shape
    assert q.data_ptr() == args["q"].data_ptr()
    assert launches[0].endswith("_fwd_cumsum") and "_mx_chunk_cumsum" not in launches


def test_a_strided_gate_is_read_as_given(compiled, monkeypatch):
    """gk a slice of a wider projection (non-contiguous): read by its strides."""
    m, d = compiled(GATE), compiled(GATE, "dense")
    args = args_of(m, T=21)
    wide = torch.randn(*args["gk"].shape[:3], 2 * args["gk"].shape[3], dtype=f64)
    args["gk"] = wide[..., 1::2]
    want = d(**args)
    calls = mapped_calls(m, monkeypatch)
    dev = on_device(args, torch.float32)
    with torch.no_grad():
        y = m(**dev)
    assert calls[0][1][3][0].data_ptr() == dev["gk"].data_ptr()
    assert rel_err(y.cpu(), want) < 1e-4


@pytest.mark.parametrize("T", [37, 70])
@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_forward_equals_dense(src, T, compiled, monkeypatch, bf16_dots, poisoned):
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=T)
    want = d(**args)
    calls = mapped_calls(m, monkeypatch)
    with torch.no_grad():
        y = m(**on_device(args, torch.float32))
        assert not y.isnan().any() and rel_err(y.cpu(), want) < 1e-4
        y = m(**on_device(args, torch.bfloat16))
        assert y.dtype == torch.bfloat16 and rel_err(y.float().cpu(), want) < 2e-2
        assert [c[0] for c in calls] == ["mapped", "mapped"]  # the kernels mapped on load
        assert rel_err(m(**on_device(args, f64)).cpu(), want) < 1e-9  # the torch code
    assert len(calls) == 2


@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_every_gradient_equals_dense(src, compiled, monkeypatch, poisoned):
    """T = 70 (chunks of 16: 4 whole and 6 tokens), batch 2, every input and
    param; the mapped forward ran (not the unmapped op)."""
    m, d = compiled(src), compiled(src, "dense")
    calls = mapped_calls(m, monkeypatch)
    torch.manual_seed(0)
    assert_gradients_equal_dense(m, d, args_of(m, B=2, T=70, seed=3))
    assert [c[0] for c in calls] == ["mapped"]


def test_the_backward_maps_on_load_too(compiled, monkeypatch, launches):
    """The backward's cumulative log-decays come from the leaves by the mapped
    cumsum kernel (as the forward's: the shared cumsum of a written log-decay
    never runs), and the map runs in torch only for the leaves' gradient:
    not at all when no leaf needs one."""
    m, d = compiled(GATE), compiled(GATE, "dense")
    host = host_of(m)
    maps = []
    prologue = host.prologue
    monkeypatch.setattr(host, "prologue", lambda *a: maps.append(1) or prologue(*a))
    assert_gradients_equal_dense(m, d, args_of(m, T=37, seed=4))
    assert launches.count(host.__name__ + "_fwd_cumsum") == 2  # forward and backward
    assert "_mx_chunk_cumsum" not in launches and maps == [1]
    del launches[:], maps[:]
    assert_gradients_equal_dense(m, d, args_of(m, T=37, seed=4), wrt=["q", "k", "v"])
    assert launches.count(host.__name__ + "_fwd_cumsum") == 2 and maps == []


def test_gradients_through_a_carried_state(compiled):
    """Two calls, the first's final state the second's initial state, every
    gradient (q, k, v, gk, the param) through both (d_final of the first
    call, d_initial of the second) against dense on the whole sequence."""
    src = FIXED[2]
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=53, seed=6)
    w = torch.randn(2, 53, 2, 8, dtype=f64, generator=torch.Generator().manual_seed(7))
    ref = {n: x.clone().requires_grad_() for n, x in args.items()}
    (d(**ref) * w).sum().backward()
    got = {n: x.float().to(DEVICE).requires_grad_() for n, x in args.items()}
    part = lambda a, b: {n: (x[:, a:b] if x.dim() >= 3 else x)  # noqa: E731
                         for n, x in got.items()}
    y1, state = m(**part(0, 30), return_state=True)
    y2 = m(**part(30, 53), initial_state=state)
    (torch.cat([y1, y2], 1) * w.float().to(DEVICE)).sum().backward()
    for n in args:
        assert rel_err(got[n].grad.cpu(), ref[n].grad) < 1e-4, n


@pytest.mark.parametrize("src", FIXED, ids=IDS[:len(FIXED)])
def test_prefill_then_decode(src, compiled):
    """Prefills of 20 and 17 tokens (the second from a nonzero state: both on
    the mapped kernels), then decode steps (the map in torch)."""
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=2, T=40, seed=8)
    assert_prefill_then_decode(m, on_device(args, torch.float32), d(**args), 20, 37)


def test_strong_decays_over_a_long_input(compiled, poisoned):
    """-softplus(gk) with gk ~ 5: log-decays ~ -5 per step, T = 1024 (chunks of
    16: cumsums to ~ -80 within each, exp(-80) beside 1 in one chunk): finite
    and equal to dense, forward and gradients."""
    src = FIXED[1]
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, B=1, T=1024, H=1, K=16, V=16, seed=9, gate_mean=5.0)
    want = d(**args)
    with torch.no_grad():
        y = m(**on_device(args, torch.float32))
    assert torch.isfinite(y).all() and rel_err(y.cpu(), want) < 1e-4
    assert_gradients_equal_dense(m, d, args)


def test_the_compile_branch(compiled, monkeypatch):
    """While torch.compile traces with a gradient the map runs as torch ops
    before the op (inductor fuses it), through the op's own autograd; without
    a gradient the mapped op (opaque to the tracer). Both equal dense."""
    m, d = compiled(GATE), compiled(GATE, "dense")
    args = args_of(m, T=21, seed=10)
    calls = mapped_calls(m, monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_gradients_equal_dense(m, d, args)
    with torch.no_grad():
        y = m(**on_device(args, torch.float32))
    assert rel_err(y.cpu(), d(**args)) < 1e-4
    assert [c[0] for c in calls] == ["op", "mapped"]


def test_a_map_the_kernel_does_not_take_keeps_the_torch_map(compiled):
    """A per-token [H] input in the map: not on load (today's path, the map in
    torch), still equal to dense, with gradients."""
    m, d = compiled(UNMAPPED), compiled(UNMAPPED, "dense")
    args = args_of(m, T=37, seed=11)
    with torch.no_grad():
        assert rel_err(m(**to_device(args, torch.float32)).cpu(), d(**args)) < 1e-4
    assert "leaves=" not in forward_source(m)
    assert_gradients_equal_dense(m, d, args)


def test_the_scan_branch_computes_the_map_on_load():
    """The same term on the scan (algorithm="scan"): its kernel computes the
    map from the leaves too (tests/test_triton_scan_maps.py); forward and
    every gradient equal dense."""
    get = compiled_mixers(algorithm="scan")
    m, d = get(FIXED[2]), get(FIXED[2], "dense")
    args = args_of(m, T=29, seed=12)
    with torch.no_grad():
        assert rel_err(m(**on_device(args, torch.float32)).cpu(), d(**args)) < 1e-4
    assert_gradients_equal_dense(m, d, args)
