"""The Triton backend's quadratic-form kernels for polynomial kernels of
degree <= 2 (Based; codegen/triton/terms/poly.py) against the dense
interpreter: forward in float32 (< 1e-4), float16 and bfloat16 (< 2e-2;
bf16 through the test-only dot patch), gradients of q, k, v (the
normalizer's included; Based's quotient divided in the forward kernel's
epilogue, its backward through the kept [n / m, m]; a quotient plus one
divided after it), Based and other polynomials (other coefficients, strict
masks, the normalizer first, last or absent), T not a multiple of the
blocks, batch > 1, K and V not powers of 2, an initial state and prefill
then decode; outputs poisoned before the kernels write, and a spy on the
kernels proving which path ran; a call that keeps no state computes none.
The knob `form` and the cost model choose the quadratic form or the
feature map; degrees 1 and 3 and a decay are planned elsewhere and still
equal dense. Static fitness: the three kernels compile for sm_90a and
sm_80 with no spills (HGMMA on sm_90a)."""

import textwrap
from importlib import resources

import pytest
import torch
from conftest import assert_gradients_equal_dense, rel_err, run_without_interpreter

import mixerc
from mixerc.codegen.triton.terms import poly as poly_terms
from mixerc.runtime.triton import poly as poly_runtime

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("fresh_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
f64 = torch.float64

# other coefficients, a strict mask, no normalizer
STRICT = """
mixer poly_strict {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  let z = q @ k^T
  out y = ((0.3 - 0.7 * z + 1.5 * z^2) * (s < t)) @ v
}
"""
# z^2 alone (coefficients 0, 0, 1), the normalizer applied first
SQUARE = """
mixer poly_square {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  let M = ((q @ k^T) / 4)^2 * (s <= t)
  out y = (M @ 1 + 1) * (M @ v)
}
"""
LINEAR = """
mixer poly_linear {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  out y = ((1 + q @ k^T) * (s <= t)) @ v
}
"""
CUBIC = """
mixer poly_cubic {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  out y = ((1 + (q @ k^T)^3 / 8) * (s <= t)) @ v
}
"""
DECAYED = """
mixer poly_decayed {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  input a : [H]
  let z = q @ k^T / sqrt(K)
  out y = (decay(-softplus(a)) * (1 + z + z^2 / 2) * (s <= t)) @ v
}
"""
NONCAUSAL = """
mixer poly_noncausal {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  let z = q @ k^T / sqrt(K)
  out y = (1 + z + z^2 / 2) @ v
}
"""
# Based but not a plain quotient (M @ v) / (M @ 1): divided by torch ops after the kernel
SHIFTED = (resources.files("mixerc.examples").joinpath("based.mx").read_text()
           .replace("(M @ v) / (M @ 1)", "(M @ v) / (M @ 1 + 1)"))
SOURCES = {"based": "based", "strict": STRICT, "square": SQUARE, "linear": LINEAR,
           "cubic": CUBIC, "decayed": DECAYED, "noncausal": NONCAUSAL, "shifted": SHIFTED}


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(name, backend="triton"):
        if (name, backend) not in cache:
            m = mixerc.compile(SOURCES[name], backend=backend)
            if backend == "triton":  # short inputs, several blocks, the quadratic form
                m._impl.pin_config(form="quadratic", block_m=16, block_n=16, block_v=16,
                                   bwd_block_m=16, bwd_block_n=16, bwd_block_v=16)
            cache[name, backend] = m
        return cache[name, backend]
    return get


def kernel_launches(m, monkeypatch):
    """The poly kernels' launches (names, in order) while the test runs: the
    kernels are patched in the module whose functions the custom op calls."""
    launches = []
    op = next(v for n, v in vars(m._impl.module).items()
              if n.endswith("_op") and n.startswith("poly"))
    # the forward the op was registered with (a module loaded twice reuses the
    # first one's op: runtime/triton/ops.py), and the module it reads its kernels from
    g = op._init_fn.__globals__
    for kernel in (n for n in list(g) if n.startswith("poly_kernel") and
                   n.endswith(("_fwd", "_bwd_dq", "_bwd_dkv"))):
        monkeypatch.setitem(g, kernel, _Spy(g[kernel], kernel, launches))
    return launches


class _Spy:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def inputs(B, T, H=2, K=12, V=20, seed=0, decay=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    out = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V))
    if decay:
        out["a"] = r(B, T, H)
    return out


def on_device(args, dtype=torch.float32):
    return {n: x.to(device=DEVICE, dtype=dtype) for n, x in args.items()}


def test_explain_says_where_it_runs(compiled):
    text = compiled("based").explain()
    assert "runs on: the quadratic form by Triton kernels" in text
    assert "knob form: cost | quadratic | features" in text
    for name in ("cubic", "decayed"):  # not routed to these kernels: the torch backend
        assert "runs on: the torch backend" in compiled(name).explain()


@pytest.mark.parametrize("name", ["based", "strict", "square"])
def test_forward_float32_matches_dense(compiled, name, poisoned, monkeypatch):
    m = compiled(name)
    x = inputs(2, 37)
    launches = kernel_launches(m, monkeypatch)
    y = m(**on_device(x))
    assert launches == [launches[0]] and launches[0].endswith("_fwd")
    assert rel_err(y, compiled(name, "dense")(**x)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_matches_dense(compiled, dtype, poisoned, request, monkeypatch):
    if dtype == torch.bfloat16:
        request.getfixturevalue("bf16_dots")
    m = compiled("based")
    x = {n: t.to(dtype).to(f64) for n, t in inputs(3, 21, K=16, V=24, seed=1).items()}
    launches = kernel_launches(m, monkeypatch)
    y = m(**on_device(x, dtype))
    assert y.dtype == dtype and launches
    assert rel_err(y, compiled("based", "dense")(**x)) < 2e-2


@pytest.mark.parametrize("name", ["based", "strict", "square"])
def test_gradients_match_dense(compiled, name, poisoned, monkeypatch):
    m = compiled(name)
    x = inputs(2, 37, seed=2)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(2, 37, 2, 20, generator=g, dtype=f64)
    xs = {n: t.float().requires_grad_() for n, t in x.items()}
    xd = {n: t.clone().requires_grad_() for n, t in x.items()}
    launches = kernel_launches(m, monkeypatch)
    (m(**xs) * dy.float()).sum().backward()
    (compiled(name, "dense")(**xd) * dy).sum().backward()
    assert {n.rsplit("_", 2)[-1] for n in launches} >= {"fwd", "dq", "dkv"}
    for n in x:
        assert rel_err(xs[n].grad, xd[n].grad) < 1e-4, n


@pytest.mark.parametrize("piece", [None, 2 * 2 * 157 * 3], ids=["whole", "pieces"])
def test_state_prefill_and_decode_match_dense(compiled, monkeypatch, piece):
    """A prefill by the kernels with an initial state (from an earlier
    prefill by them), then decode steps (the torch feature-state
    recurrence), equal dense over the whole sequence; the state's feature
    maps computed whole or a few tokens at a time."""
    if piece:
        monkeypatch.setattr(poly_runtime, "STATE_PIECE", piece)
    m, d = compiled("based"), compiled("based", "dense")
    x = inputs(2, 45, seed=4)
    whole = d(**x)
    launches = kernel_launches(m, monkeypatch)
    first = {n: t[:, :20] for n, t in x.items()}
    second = {n: t[:, 20:42] for n, t in x.items()}
    y1, s1 = m(**on_device(first), return_state=True)
    y2, s2 = m(**on_device(second), initial_state=s1, return_state=True)
    assert launches.count(launches[0]) == 2  # both prefills ran the forward kernel
    steps = []
    for i in range(42, 45):
        y, s2 = m.step(s2, **{n: t[:, i].float() for n, t in x.items()})
        steps.append(y[:, None])
    assert len(launches) == 2  # decode steps: no kernel
    assert rel_err(y1, whole[:, :20]) < 1e-4
    assert rel_err(y2, whole[:, 20:42]) < 1e-4
    assert rel_err(torch.cat(steps, 1), whole[:, 42:]) < 1e-4


def test_state_layout_matches_the_feature_map(compiled):
    """The quadratic form's final state is the chunked feature map's (the
    knob form forces each): decode continues the same state either way."""
    m = compiled("based")
    x = on_device(inputs(1, 33, seed=5))
    _, s_quad = m(**x, return_state=True)
    m._impl.pin_config(form="features")
    try:
        _, s_feat = m(**x, return_state=True)
    finally:
        m._impl.pin_config(form="quadratic")
    for key in s_quad.tensors:
        assert rel_err(s_quad.tensors[key], s_feat.tensors[key]) < 1e-5


def test_the_cost_model_and_the_knob_choose(compiled, monkeypatch):
    """form="cost": the quadratic form on a short input, the feature map on a
    long one (K = 12, V = 20: the model's Min crosses near T = 430);
    form="features": no kernel, the torch feature map; all equal dense."""
    m, d = compiled("based"), compiled("based", "dense")
    x = inputs(1, 40, seed=6)
    ref = d(**x)
    long = inputs(1, 480, H=1, seed=6)
    launches = kernel_launches(m, monkeypatch)
    try:
        m._impl.pin_config(form="features")
        assert rel_err(m(**on_device(x)), ref) < 1e-4 and not launches
        m._impl.pin_config(form="cost")
        assert rel_err(m(**on_device(long)), d(**long)) < 1e-4 and not launches
        assert rel_err(m(**on_device(x)), ref) < 1e-4 and launches
    finally:
        m._impl.pin_config(form="quadratic")


def test_float64_runs_the_torch_code(compiled, monkeypatch):
    m = compiled("based")
    x = inputs(2, 25, seed=7)
    launches = kernel_launches(m, monkeypatch)
    assert rel_err(m(**x), compiled("based", "dense")(**x)) < 1e-10
    assert not launches


@pytest.mark.parametrize("name", ["linear", "cubic", "decayed", "noncausal"])
def test_other_polynomials_are_planned_elsewhere(compiled, name):
    """Degree 1 (not a polynomial kernel: the dense path), degree 3, a decay
    and no mask (a global feature-map sum, O(T)) are not this kernel's:
    planned elsewhere, still equal to dense."""
    m = compiled(name)
    assert not any(poly_terms.handles(tp) for mp in m.plan.matrices for tp in mp.terms)
    x = inputs(2, 19, K=8, seed=8, decay=name == "decayed")
    assert rel_err(m(**on_device(x)), compiled(name, "dense")(**x)) < 1e-4


FITNESS = textwrap.dedent("""
    import json
    import mixerc
    from mixerc.codegen.triton import fitness
    out = []
    m = mixerc.compile("based", backend="triton")
    shapes = [(t, K, V) for t in ("sm_90a", "sm_80") for K, V in ((16, 64), (16, 128), (64, 64),
                                                              (128, 128))]
    for target, K, V in shapes:
        for f in fitness.check(m._impl, {"H": 16, "K": K, "V": V}, target):
            out.append(dict(target=target, K=K, V=V, kernel=f.kernel, regs=f.registers,
                            spill=f.spill_bytes, shared=f.shared, limit=f.shared_limit,
                            mma=f.mma, hmma=f.hmma, error=f.error))
    print(json.dumps(out))
""")


def test_kernels_fit_sm90a_and_sm80():
    """Based's kernels (K = 16 with V = 64 and 128, K = V = 64, and K = V = 128,
    `mixerc compile --target`'s default dims, where the dK/dV kernel steps
    over 16 queries: at 32 it spilled 8 B on sm_90a; bf16, default config):
    no spills, shared memory within the limit, the dots on HGMMA (sm_90a, no
    warp-level HMMA fallback) / HMMA (sm_80)."""
    fits = run_without_interpreter(FITNESS, timeout=600)
    assert {f["kernel"] for f in fits} == {"poly_kernel_divide_fwd", "poly_kernel_divide_bwd_dq",
                                           "poly_kernel_divide_bwd_dkv"}
    assert len(fits) == 2 * 4 * 3  # targets x shapes x kernels
    for f in fits:
        where = f"{f['target']} K={f['K']} V={f['V']} {f['kernel']}"
        assert not f["error"], where + ": " + f["error"]
        assert f["spill"] == 0 and f["shared"] <= f["limit"], where
        assert f["mma"] > 0 and f["regs"] <= 255, where
        if f["target"] == "sm_90a":
            assert f["hmma"] == 0, where


def test_the_normalizer_is_summed_in_registers(compiled):
    """Based applies M to 1 last, SQUARE first, STRICT not at all: the kernel
    sums that column (no column of ones read) at its place."""
    where = {name: [poly_terms.normalizer(mp)[0] for mp in compiled(name).plan.matrices]
             for name in ("based", "square", "strict")}
    assert where == {"based": ["last"], "square": ["first"], "strict": [None]}


@pytest.mark.parametrize("name", ["based", "strict", "square"])
@pytest.mark.parametrize("standalone", [False, True])
def test_generated_modules_are_pyflakes_clean(name, standalone):
    from test_generated_code import flakes
    src = mixerc.compile(SOURCES[name], backend="triton")._impl.generate(standalone=standalone)[0]
    assert flakes(src) == ""


def test_stack_states_of_different_lengths(compiled):
    """Based's feature-map state does not depend on the length: prefills of 5
    and 20 tokens (the latter by the kernels) stacked into one batch step on
    as the dense interpreter does on each sequence."""
    m, d = compiled("based"), compiled("based", "dense")
    x = inputs(2, 23, seed=9)
    lengths = (5, 20)
    states = [m(**on_device({n: t[b:b + 1, :lengths[b]] for n, t in x.items()}),
                return_state=True)[1] for b in range(2)]
    state = m.stack_states(states)
    for i in range(3):
        y, state = m.step(state, **{n: torch.stack([t[b, lengths[b] + i] for b in range(2)])
                                    .float() for n, t in x.items()})
        for b, n in enumerate(lengths):
            want = d(**{k: t[b:b + 1, :n + i + 1] for k, t in x.items()})[:, -1]
            assert rel_err(y[b:b + 1], want) < 1e-4, (i, b)


def test_gradients_after_an_initial_state_match_dense(compiled, monkeypatch):
    """A block with gradients after a prefill's state: the kernels' gradients
    plus the state's (phi(q) . S by torch ops) equal dense on the whole sequence."""
    m, d = compiled("based"), compiled("based", "dense")
    x = inputs(2, 41, seed=10)
    _, s1 = m(**on_device({n: t[:, :20] for n, t in x.items()}), return_state=True)
    leaves = {n: t[:, 20:].float().requires_grad_() for n, t in x.items()}
    leaves64 = {n: t[:, 20:].clone().requires_grad_() for n, t in x.items()}
    g = torch.Generator().manual_seed(11)
    dy = torch.randn(2, 21, 2, 20, generator=g, dtype=f64)
    launches = kernel_launches(m, monkeypatch)
    (m(**leaves, initial_state=s1) * dy.float()).sum().backward()
    whole = d(**{n: torch.cat([x[n][:, :20], leaves64[n]], 1) for n in x})
    (whole[:, 20:] * dy).sum().backward()
    assert {n.rsplit("_", 2)[-1] for n in launches} >= {"fwd", "dq", "dkv"}
    for n in x:
        assert rel_err(leaves[n].grad, leaves64[n].grad) < 1e-4, n


@pytest.mark.parametrize("name", ["based", "strict"])
def test_gradients_at_the_default_blocks_match_dense(compiled, poisoned, name):
    """The default geometry: 64-row blocks forward and dQ over 64 / 32 keys,
    the dK/dV kernel's 64 keys per 32 queries (its blocks swapped), value
    columns in two blocks; T = 150 ends inside a block."""
    m, d = compiled(name), compiled(name, "dense")
    x = inputs(1, 150, H=1, seed=12)
    dy = torch.randn(1, 150, 1, 20, generator=torch.Generator().manual_seed(13), dtype=f64)
    xs = {n: t.float().requires_grad_() for n, t in x.items()}
    xd = {n: t.clone().requires_grad_() for n, t in x.items()}
    m._impl.pin_config(block_m=64, block_n=64, block_v=16, bwd_block_m=64, bwd_block_n=32,
                       bwd_block_v=16)
    try:
        y = m(**xs)
        (y * dy.float()).sum().backward()
    finally:
        m._impl.pin_config(block_m=16, block_n=16, block_v=16, bwd_block_m=16, bwd_block_n=16,
                           bwd_block_v=16)
    want = d(**xd)
    (want * dy).sum().backward()
    assert rel_err(y, want) < 1e-4
    for n in x:
        assert rel_err(xs[n].grad, xd[n].grad) < 1e-4, n


def test_gradients_at_k128_match_dense(compiled, poisoned):
    """At K >= 128 the dK/dV kernel steps over at most 16 queries (the
    default 32 spills on sm_90a at K = 128): its blocks at the default
    config, and gradients equal to dense there (T = 70 ends inside a block)."""
    m, d = compiled("based"), compiled("based", "dense")
    mod = m._impl.module
    name = next(n[:-len("_key_side")] for n in vars(mod) if n.endswith("_key_side"))
    meta = getattr(mod, name + "_meta")
    for K, step in ((16, 32), (64, 32), (128, 16), (256, 16)):
        q = torch.empty(1, 1, 1, K, dtype=torch.bfloat16, device="meta")
        side = getattr(mod, name + "_key_side")(meta(q, q, 64, 32, 64))
        assert (side["BLOCK_M"], side["BLOCK_N"]) == (step, 64), K
    x = inputs(1, 70, H=1, K=128, V=20, seed=14)
    dy = torch.randn(1, 70, 1, 20, generator=torch.Generator().manual_seed(15), dtype=f64)
    xs = {n: t.float().requires_grad_() for n, t in x.items()}
    xd = {n: t.clone().requires_grad_() for n, t in x.items()}
    m._impl.pin_config(form="quadratic", block_m=64, block_n=64, block_v=16, bwd_block_m=64,
                       bwd_block_n=32, bwd_block_v=16)
    try:
        y = m(**xs)
        (y * dy.float()).sum().backward()
    finally:
        m._impl.pin_config(form="quadratic", block_m=16, block_n=16, block_v=16, bwd_block_m=16,
                           bwd_block_n=16, bwd_block_v=16)
    want = d(**xd)
    (want * dy).sum().backward()
    assert rel_err(y, want) < 1e-4
    for n in x:
        assert rel_err(xs[n].grad, xd[n].grad) < 1e-4, n


def forward_after_kernel(m, kernel):
    """The generated forward's lines after the quadratic-form kernel's call."""
    src = m._impl.generate()[0]
    body = src[src.index("\ndef forward("):].split("\n\n\n")[0].splitlines()
    at = next(i for i, line in enumerate(body) if f"= {kernel}(" in line)
    return body[at], body[at + 1:]


def test_based_divides_in_the_kernel_epilogue(compiled):
    """Based's (M @ v) / (M @ 1) is the plan's divide: the kernel's host function
    divides (no torch division after it; the torch forms divide by `divided`);
    (M @ v) / (M @ 1 + 1) is not a plain quotient: its kernel does not divide,
    and the forward divides after it."""
    call, after = forward_after_kernel(compiled("based"), "poly_kernel_divide")
    assert "want_state=want_state" in call
    assert not any(" / " in line for line in after), after
    src = compiled("based")._impl.generate()[0]
    assert src.count("divided(") >= 2 + 1  # history and feature forms, the decode fallback
    assert "DIVIDE=True" in src  # fitness compiles the dividing kernel
    call, after = forward_after_kernel(compiled("shifted"), "poly_kernel")
    assert any(" / " in line for line in after), after
    assert "poly_kernel_divide" not in compiled("shifted")._impl.generate()[0]


def test_the_forward_kernel_divides(compiled, poisoned):
    """The op itself: y = [n / m, m] with divide, [n, m] without (the same
    kernel, DIVIDE off): a kernel that stopped dividing fails here."""
    m = compiled("based")
    g = vars(m._impl.module)
    op = next(v for n, v in g.items() if n.endswith("_op") and n.startswith("poly"))
    x = on_device(inputs(2, 29, seed=20))
    coef = poly_runtime.poly_coefficients([1.0, 0.5, 0.125], x["q"].device)
    V = x["v"].shape[-1]
    args = lambda divide: (x["q"], x["k"], x["v"], coef, 0, V, V + 1, divide,  # noqa: E731
                           16, 16, 16, 4, 1, 16, 16, 16, 4, 1)
    plain, divided = op(*args(False)), op(*args(True))
    assert torch.isfinite(divided).all()
    assert torch.equal(plain[..., V], divided[..., V])
    assert rel_err(divided[..., :V], plain[..., :V] / plain[..., V:]) < 1e-6
    assert rel_err(divided[..., :V], plain[..., :V]) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_divided_forward_and_gradients_match_dense(compiled, dtype, poisoned, request,
                                                   monkeypatch):
    """Based at batch 3, T = 29 (not a multiple of the 16-row blocks): the
    dividing kernels (float32, bfloat16) or the torch code (float64), forward
    and every input's gradient against dense."""
    if dtype == torch.bfloat16:
        request.getfixturevalue("bf16_dots")
    m, d = compiled("based"), compiled("based", "dense")
    x = {n: t.to(dtype).to(f64) for n, t in inputs(3, 29, K=16, V=24, seed=21).items()}
    dy = torch.randn(3, 29, 2, 24, generator=torch.Generator().manual_seed(22), dtype=f64)
    xs = {n: t.to(dtype, copy=True).requires_grad_() for n, t in x.items()}
    xd = {n: t.clone().requires_grad_() for n, t in x.items()}
    launches = kernel_launches(m, monkeypatch)
    y = m(**xs)
    (y * dy.to(dtype)).sum().backward()
    want = d(**xd)
    (want * dy).sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float64: 1e-10}[dtype]
    if dtype == torch.float64:
        assert not launches
    else:
        assert launches == ["poly_kernel_divide_fwd", "poly_kernel_divide_bwd_dq",
                            "poly_kernel_divide_bwd_dkv"]
    assert y.dtype == dtype and rel_err(y, want) < tol
    for n in x:
        assert rel_err(xs[n].grad, xd[n].grad) < tol, n


def test_not_a_plain_quotient_matches_dense(compiled, poisoned):
    """(M @ v) / (M @ 1 + 1): the kernel's [n, m], divided by torch ops after it."""
    m, d = compiled("shifted"), compiled("shifted", "dense")
    x = inputs(2, 27, seed=23)
    assert rel_err(m(**on_device(x)), d(**x)) < 1e-4
    assert_gradients_equal_dense(m, d, x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_call_without_return_state_computes_no_state(compiled, monkeypatch, grad):
    """The forward learns from want_state (runtime/call.py: return_state)
    whether the caller keeps the state: without it the keys' feature maps
    are never computed (nor kept for autograd); with it the state continues
    into decode steps that equal dense. The module path likewise."""
    m, d = compiled("based"), compiled("based", "dense")
    calls = []
    features = poly_runtime.poly_features
    monkeypatch.setattr(poly_runtime, "poly_features",
                        lambda *a: calls.append(a) or features(*a))
    x = inputs(2, 40, seed=25)
    first = {n: t[:, :37].float().requires_grad_(grad) for n, t in x.items()}
    whole = d(**x)
    y = m(**first)
    assert not calls and rel_err(y, whole[:, :37]) < 1e-4
    layer = m.module(H=2, K=12, V=20)
    assert rel_err(layer(**first), whole[:, :37]) < 1e-4 and not calls
    y, state = layer(**first, return_state=True)
    assert calls and rel_err(y, whole[:, :37]) < 1e-4
    steps = []
    for i in range(37, 40):
        y, state = m.step(state, **{n: t[:, i].float() for n, t in x.items()})
        steps.append(y[:, None])
    assert rel_err(torch.cat(steps, 1), whole[:, 37:]) < 1e-4
