"""The Triton backend's chunked scalar-decay kernel against the dense
interpreter: linear attention, RetNet, Mamba-2 SSD and hand-varied
programs (strict masks, q and k at group heads, gates, no decay, a rank-one
decay), forward in float32 (< 1e-4), float16 and bfloat16 (< 2e-2; bf16
through the test-only dot patch), gradients of every input and param and
of the initial state, prefill state and decode, T not a multiple of the
chunk, batch > 1, several K and V blocks, outputs poisoned before the kernel
writes, strong decays over 512 steps. Every other chunked case (per-channel
decay, feature maps) stays on the torch backend; Hydra's two passes run on
the kernels. Without a GPU the kernels run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1)."""


import pytest
import torch
from conftest import DEVICE, assert_gradients_equal_dense, compiled_mixers, rel_err, to_device

import mixerc
from mixerc.inputs import random_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

# small chunks, K and value blocks: several of each at T = 37, K = V = 20
SMALL = {"chunk": 16, "block_k": 16, "block_v": 16}
SIZES = {"H": 4, "G": 2, "K": 20, "D": 20, "N": 20, "V": 20, "P": 20}

GROUPED_STRICT = """mixer grouped_strict {
  dims H, G divides H, D, V
  input q : [G, D]
  input k : [G, D]
  input v : [H, V]
  input u : [H]
  out y = (decay(-softplus(u)) * (q @ k^T) * (s < t)) @ v
}"""
GATED_NO_DECAY = """mixer gated {
  dims H, G divides H, D, V
  input q : [H, D]
  input k : [G, D]
  input v : [H, V]
  input u : [H]
  out y = (row(sigmoid(u)) * (q @ k^T) * (s <= t)) @ v
}"""
STRICT_NO_DECAY = """mixer strict_plain {
  dims H, D, V
  input q : [H, D]
  input k : [H, D]
  input v : [H, V]
  out y = ((q @ k^T) * (s < t)) @ v
}"""
EMA = """mixer ema {
  dims H, V
  input v : [H, V]
  input u : [H]
  out y = decay(-softplus(u)) @ (sigmoid(u) * v)
}"""
PROGRAMS = ["linear_attention", "retnet", "ssd", GROUPED_STRICT, GATED_NO_DECAY,
            STRICT_NO_DECAY, EMA]
IDS = ["linear_attention", "retnet", "ssd", "grouped_strict", "gated", "strict_plain", "ema"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(**SMALL)


def args_of(m, B=2, T=37, seed=1):
    return random_inputs(m.program, SIZES, B, T, seed=seed, dtype=f64)


def test_scalar_decay_terms_run_on_the_kernel(compiled):
    for src in PROGRAMS:
        m = compiled(src)
        text = m.explain()
        assert "runs on: two Triton kernels" in text and "torch backend" not in text, text
        assert "@triton.jit" in m.source() and "chunked_kernels_apply(" in m.source()


@pytest.mark.parametrize("name", ["gla", "mamba", "based", "h3"])
def test_other_chunked_cases_stay_off_these_kernels(name, compiled):
    """A feature map goes to the polynomial's quadratic-form kernels
    (tests/test_triton_poly.py); a per-channel decay to its own kernel
    (tests/test_triton_per_channel.py), never to these."""
    m = compiled(name)
    text = m.explain()
    assert "two Triton kernels" not in text, text
    if name == "based":
        assert "runs on: the quadratic form by Triton kernels" in text, text
    else:
        assert "runs on: Triton kernels (forward: a scan of the state in registers, or chunks" \
            in text, text
    if name == "gla":
        d = compiled(name, "dense")
        args = args_of(m, T=21)
        assert rel_err(m(**to_device(args, torch.float32)).cpu(), d(**args)) < 1e-4


# Hydra's forward and reversed passes are chunked terms too (its diagonal is not)
NUMERIC, NUMERIC_IDS = PROGRAMS + ["hydra"], IDS + ["hydra"]


@pytest.mark.parametrize("src", NUMERIC, ids=NUMERIC_IDS)
def test_forward_equals_dense(src, compiled, bf16_dots):
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, T=21 if src == "hydra" else 37)  # hydra: two passes, fewer steps
    want = d(**args)
    y = m(**to_device(args, torch.float32))
    assert y.dtype == torch.float32 and rel_err(y.cpu(), want) < 1e-4
    for half in (torch.float16, torch.bfloat16):
        y = m(**to_device(args, half))
        assert y.dtype == half and rel_err(y.cpu(), want) < 2e-2, half
    # float64 inputs run the torch backend's chunks (the kernel takes float32 and halves)
    assert rel_err(m(**to_device(args, f64)).cpu(), want) < 1e-9


@pytest.mark.parametrize("src", NUMERIC, ids=NUMERIC_IDS)
def test_gradients_equal_dense(src, compiled):
    m, d = compiled(src), compiled(src, "dense")
    base = args_of(m, T=21 if src == "hydra" else 35, seed=2)
    assert_gradients_equal_dense(m, d, base)


@pytest.mark.parametrize("src", PROGRAMS[:4], ids=IDS[:4])
def test_prefill_state_and_decode(src, compiled):
    """A prefill's state equals the torch backend's (itself checked against
    dense); continuing from it (a nonzero initial state) and decoding token
    by token equal the dense interpreter on the whole input."""
    m, d, t = compiled(src), compiled(src, "dense"), compiled(src, "torch")
    args = args_of(m, T=37, seed=3)
    want = d(**args)
    x = to_device(args, torch.float32)
    tokens = set(m.program.inputs)
    part = lambda a, b, x=x: {n: (v[:, a:b] if n in tokens else v) for n, v in x.items()}  # noqa
    y1, state = m(**part(0, 20), return_state=True)
    x64 = to_device(args, f64)
    _, ref_state = t(**{n: (v[:, :20] if n in tokens else v) for n, v in x64.items()},
                     return_state=True)
    assert state.tensors.keys() == ref_state.tensors.keys()
    for key, s in state.tensors.items():
        assert s.abs().max() > 0 and rel_err(s.cpu(), ref_state.tensors[key]) < 1e-5, key
    y2, state = m(**part(20, 33), initial_state=state, return_state=True)
    assert rel_err(torch.cat([y1, y2], 1).cpu(), want[:, :33]) < 1e-4
    for i in range(33, 37):
        yt, state = m.step(state, **{n: (v[:, i] if n in tokens else v) for n, v in x.items()})
        assert rel_err(yt.cpu(), want[:, i]) < 1e-4, i


def _recurrence(q, k, v, a, S0, strict):
    """The chunked mixer token by token in float64 (the definition)."""
    B, T, H = v.shape[:3]
    q, k = (x.repeat_interleave(H // x.shape[2], 2) for x in (q, k))
    S, ys = S0, []
    for i in range(T):
        S = torch.exp(a[:, i])[..., None, None] * S
        if strict:
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, i], S))
        S = S + k[:, i, :, :, None] * v[:, i, :, None, :]
        if not strict:
            ys.append(torch.einsum("bhk,bhkv->bhv", q[:, i], S))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("strict", [False, True])
def test_initial_state_and_group_gradients(strict, compiled):
    """The kernel through its adjoint backward, directly: q at G = 1 head, k at
    G = 2, v at H = 4, a nonzero initial state and a used final state; every
    gradient (initial state included) against a float64 recurrence."""
    from mixerc.runtime.triton.chunked import chunked_kernels_apply
    m = compiled(GROUPED_STRICT if strict else "ssd")
    mod = m._impl.module
    fn = next(getattr(mod, n) for n in vars(mod) if n.startswith("chunked_kernel")
              and n.endswith(("_decay", "_strict", "_skip")) and callable(getattr(mod, n)))
    g = torch.Generator().manual_seed(7)
    B, T, H, K, V = 2, 35, 4, 20, 20
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g)  # noqa: E731
    base = [r(B, T, 1, K), r(B, T, 2, K), r(B, T, H, V), -torch.rand(B, T, H, dtype=f64,
                                                                      generator=g), r(B, H, K, V)]
    ref = [x.clone().requires_grad_() for x in base]
    got = [x.float().to(DEVICE).requires_grad_() for x in base]
    wy, ws = r(B, T, H, V), r(B, H, K, V)
    y, S = _recurrence(*ref, strict)
    want = torch.autograd.grad((y * wy).sum() + (S * ws).sum(), ref)
    y2, S2 = chunked_kernels_apply(fn, *got, 16, 16, 16, 4, 2)
    assert rel_err(y2.detach().cpu(), y) < 1e-5 and rel_err(S2.detach().cpu(), S) < 1e-5
    have = torch.autograd.grad((y2 * wy.float()).sum() + (S2 * ws.float()).sum(), got)
    for name, h, w in zip(["q", "k", "v", "a", "S0"], have, want):
        assert h.shape == w.shape and rel_err(h.cpu(), w) < 1e-4, name


def test_groups_are_read_at_their_heads(compiled, monkeypatch):
    """SSD's C (q) reaches the kernel at its G heads, never repeated to H."""
    m = compiled("ssd")
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_op"))
    real = getattr(mod, op)
    seen = []

    def spy(q, k, v, *rest):
        seen.append((q.shape[2], k.shape[2], v.shape[2]))
        return real(q, k, v, *rest)
    monkeypatch.setattr(mod, op, spy)
    m(**to_device(args_of(m, T=40), torch.float32))  # past 16 tokens: the chunk kernels, not the decode kernel
    assert seen == [(2, 2, 4)], seen


def test_every_output_element_is_written(compiled, poisoned):
    """torch.empty poisoned with NaN: an element the kernel skipped (a row
    past the last chunk, a value column past a block edge, a chunk state)
    would stay NaN."""
    m, d = compiled("ssd"), compiled("ssd", "dense")
    args = args_of(m, T=29, seed=5)
    got = {n: x.float().to(DEVICE).requires_grad_() for n, x in args.items()}
    y, state = m(**got, return_state=True)
    assert not y.isnan().any() and rel_err(y.detach().cpu(), d(**args)) < 1e-4
    assert not any(s.isnan().any() for s in state.tensors.values())
    y.sum().backward()
    for n, x in got.items():
        assert not x.grad.isnan().any(), n


STRONG = """mixer strong {
  dims H, D, V
  input q : [H, D]
  input k : [H, D]
  input v : [H, V]
  input a : [H]
  out y = (decay(a) * (q @ k^T)) @ v
}"""


def test_strong_decay_over_long_inputs_stays_finite():
    """A log-decay of -5 per step over 512 steps (e^-2560 end to end): the
    masked triangle is never exponentiated and nothing overflows."""
    m = mixerc.compile(STRONG, backend="triton")  # the default chunk (64)
    d = mixerc.compile(STRONG, backend="dense")
    g = torch.Generator().manual_seed(0)
    B, T, H, D, V = 1, 512, 2, 16, 16
    args = {"q": torch.randn(B, T, H, D, dtype=f64, generator=g),
            "k": torch.randn(B, T, H, D, dtype=f64, generator=g),
            "v": torch.randn(B, T, H, V, dtype=f64, generator=g),
            "a": torch.full((B, T, H), -5.0, dtype=f64)}
    want = d(**args)
    got = {n: x.float().to(DEVICE).requires_grad_() for n, x in args.items()}
    y = m(**got)
    assert torch.isfinite(y).all() and rel_err(y.detach().cpu(), want) < 1e-4
    y.sum().backward()
    for n, x in got.items():
        assert torch.isfinite(x.grad).all(), n
    y16 = m(**to_device(args, torch.float16))
    assert torch.isfinite(y16).all() and rel_err(y16.cpu(), want) < 2e-2


def test_varlen_equals_dense_per_sequence(compiled):
    m, d = compiled("ssd"), compiled("ssd", "dense")
    args = args_of(m, B=1, T=50, seed=4)
    offsets = [0, 7, 30, 50]
    y = m(**to_device(args, torch.float32),
          cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=DEVICE))
    tokens = set(m.program.inputs)
    for a, b in zip(offsets, offsets[1:]):
        want = d(**{n: (x[:, a:b] if n in tokens else x) for n, x in args.items()})
        assert rel_err(y[:, a:b].cpu(), want) < 1e-4


def test_custom_op_opcheck(compiled):
    m = compiled("ssd")
    mod = m._impl.module
    op = next(getattr(mod, n) for n in vars(mod)
              if n.startswith("chunked_kernel") and n.endswith("_op"))
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 20, 4, 20, 20
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    # SSD's delta, or none; the last four a backward's runs on reversed time,
    # the last three scaling their output rows (DSCALE 1), then taking the key
    # scale's chain rule too (2: raw is k, a fourth result) or the skip's
    # (skip_grad, the dv run: raw is the forward's x, a fourth result)
    k, x = r(B, T, 2, K), r(B, T, H, V)
    for S0, scale, reverse, raw, dscale, skip_grad in (
            (None, None, False, None, 0, False), (r(B, H, K, V), r(B, T, H), False, None, 0, False),
            (r(B, H, K, V), None, True, None, 0, False), (None, r(B, T, H), True, None, 1, False),
            (None, r(B, T, H), True, k, 2, False), (r(B, H, K, V), r(B, T, H), True, x, 1, True)):
        args = (r(B, T, 2, K), k, r(B, T, H, V), -torch.rand(B, T, H, generator=g),
                scale, S0, H, 16, 16, 16, 4, 1, torch.float32, r(H), skip_grad, [],
                False, raw, dscale, S0 is None, reverse)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    # the decay and the scale computed on load from A_log, dt, dt_bias (prologue.py)
    args = (r(B, T, 2, K), r(B, T, 2, K), r(B, T, H, V), None, None, r(B, H, K, V), H,
            16, 16, 16, 4, 1, torch.bfloat16, r(H), False, [r(H), r(B, T, H), r(H)], True, None,
            0, False, False)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("src", ["ssd", "linear_attention"])
def test_states_between_the_kernels_in_the_dots_dtype(src, compiled, bf16_dots):
    """bf16 operands: the states entering each chunk travel between the two
    kernels in bf16 unless the caller keeps them (the backward's decay
    gradient reads them in float32). The output kernel rounds them to bf16
    before its dot anyway, so y is the same to the bit either way (linear
    attention's normalizer column, read in float32, within bf16's rounding)."""
    m = compiled(src)
    mod = m._impl.module
    op = next(getattr(mod, n) for n in vars(mod)
              if n.startswith("chunked_kernel") and n.endswith("_op"))
    g = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 45, 4, 16, 16
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    if src == "ssd":
        head = (bf(r(B, T, 2, K)), bf(r(B, T, 2, K)), bf(r(B, T, H, V)), None, None,
                r(B, H, K, V), H, 16, 16, 16, 4, 1, torch.float32, r(H) * 0 + 1, False,
                [r(H) * 0.3, r(B, T, H), r(H) * 0.3], True, None, 0)
    else:  # elu + 1 features and the ones column, divided in the epilogue
        head = (bf(r(B, T, H, K)), bf(r(B, T, H, K)), bf(r(B, T, H, V)), None, None, None,
                H, 16, 16, 16, 4, 1, torch.float32, True, True, [], True,
                [0, 0, 0, 0], None)  # no slot mapped, no derivative: a forward
    y, final, states = op(*head, False, False)[:3]  # (ssd's: and w's gradient, unused)
    y_kept, final_kept, states_kept = op(*head, True, False)[:3]
    assert states.dtype == torch.bfloat16 and states_kept.dtype == torch.float32
    # within one bf16 rounding (Triton's interpreter truncates where a GPU rounds)
    assert ((states.float() - states_kept).abs() <= states_kept.abs() * 2 ** -7).all()
    assert torch.equal(final, final_kept) and not y.isnan().any()
    if src == "ssd":
        assert torch.equal(y, y_kept)
    else:
        assert rel_err(y, y_kept) < 1e-2


def test_torch_compile_fullgraph_forward_and_backward(compiled):
    m = compiled("ssd")
    layer = m.module(H=4, P=20, N=20, G=2, device=DEVICE)
    x = to_device(args_of(m, T=21, seed=6), torch.float32)
    x = {n: t for n, t in x.items() if n in dict(m.signature.inputs)}
    eager = {n: t.clone().requires_grad_() for n, t in x.items()}
    want = layer(**eager)
    want.sum().backward()
    fast = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = {n: t.clone().requires_grad_() for n, t in x.items()}
    y = fast(**got)
    assert rel_err(y.detach(), want.detach()) < 1e-6
    y.sum().backward()
    for n in got:
        assert rel_err(got[n].grad, eager[n].grad) < 1e-5, n


@pytest.mark.parametrize("name", ["linear_attention", "retnet", "ssd", "hydra"])
@pytest.mark.parametrize("standalone", [False, True])
def test_generated_module_is_clean(name, standalone):
    """pyflakes finds nothing in the triton backend's modules (imports, unused
    names), standalone ones included."""
    from test_generated_code import flakes
    src = mixerc.compile(name, backend="triton")._impl.generate(standalone=standalone)[0]
    assert flakes(src) == ""


@pytest.mark.parametrize("src", ["retnet", "ssd", "linear_attention"])
def test_decode_kernel_in_place_and_reused_states(src, compiled, monkeypatch):
    """Steps run the fused decode kernel (the template's `_decode`; more in
    test_triton_decode_fused.py), which updates the newest state in place; an
    older state that was already continued is refused, a clone continues;
    with gradients a step takes the differentiable path and leaves its state
    alone."""
    m, d = compiled(src), compiled(src, "dense")
    mod = m._impl.module
    calls = []
    (host,) = [n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_decode")]
    real = getattr(mod, host)
    monkeypatch.setattr(mod, host, lambda *a, **k: calls.append(1) or real(*a, **k))
    args = args_of(m, T=30, seed=8)
    want = d(**args)
    x = to_device(args, torch.float32)
    tokens = set(m.program.inputs)
    step = lambda i: {n: (v[:, i] if n in tokens else v) for n, v in x.items()}  # noqa: E731
    _, state = m(**{n: (v[:, :20] if n in tokens else v) for n, v in x.items()},
                 return_state=True)
    (key, first), = state.tensors.items()
    buffers = set()
    for i in range(20, 25):
        yt, state = m.step(state, **step(i))
        assert rel_err(yt.cpu(), want[:, i]) < 1e-4, i
        buffers.add(state.tensors[key].data_ptr())
        if i == 22:
            older, kept = state, state.clone()
    assert len(calls) == 5 and len(buffers) == 1 and first.data_ptr() not in buffers
    with pytest.raises(mixerc.MixerError, match="already continued"):
        m.step(older, **step(23))
    yt, _ = m.step(kept, **step(23))
    assert rel_err(yt.cpu(), want[:, 23]) < 1e-4
    # with gradients: the differentiable path, the state it was given untouched
    before = state.tensors[key].clone()
    grad = {n: (v.clone().requires_grad_() if n in tokens else v) for n, v in x.items()}
    yt, _ = m.step(state, **{n: (v[:, 25] if n in tokens else v) for n, v in grad.items()})
    yt.sum().backward()
    assert rel_err(yt.detach().cpu(), want[:, 25]) < 1e-4
    assert torch.equal(state.tensors[key], before)


@pytest.mark.parametrize("extra", [0, 3, 7])
@pytest.mark.parametrize("layout", ["contiguous", "slice_grad", "expanded", "quotient",
                                    "quotient_expanded"])
def test_quotient_gradient_kernel_equals_its_formula(extra, layout):
    """The backward's quotient gradient in one kernel (runtime/triton/chunked.py
    quotient_grad: dn = dy_n / m, dm = dy_m - sum dn . y_n, then zeros)
    against the torch formula in float64, with dy as autograd hands it over:
    contiguous, the zero-padded gradient of the output's value columns (a
    slice's), or expanded from a sum (all strides 0); or the gradient of
    the quotient's columns alone (ChunkedFn's output with divide: V
    columns, bf16 or expanded), against the formula on it zero-padded; V = 5
    (not a power of 2), in float32 and written in bf16; the zero columns
    (the kernel writes them into an uninitialized buffer) are zero."""
    from mixerc.runtime.torch.autograd import quotient_grad as formula
    from mixerc.runtime.triton.chunked import quotient_grad
    g = torch.Generator().manual_seed(extra)
    B, T, H, V = 2, 19, 3, 5
    y = torch.randn(B, T, H, V + 1, generator=g)
    y[..., -1] = torch.rand(B, T, H, generator=g) + 0.5  # the normalizer m
    if layout == "contiguous":
        dy = torch.randn(B, T, H, V + 1, generator=g)
    elif layout == "slice_grad":
        dy = torch.nn.functional.pad(torch.randn(B, T, H, V, generator=g), (0, 1))
    elif layout == "expanded":
        dy = torch.tensor(0.7).expand(B, T, H, V + 1)
    elif layout == "quotient":
        dy = torch.randn(B, T, H, V, generator=g).to(torch.bfloat16)
    else:
        dy = torch.tensor(0.7).expand(B, T, H, V)
    full = torch.nn.functional.pad(dy.double(), (0, 1)) if dy.shape[-1] == V else dy.double()
    want = formula(full, y.double(), extra)
    assert rel_err(formula(dy.double(), y.double(), extra), want) < 1e-15
    for dtype, tol in ((None, 1e-6), (torch.bfloat16, 1e-2)):
        got = quotient_grad(dy.to(DEVICE), y.to(DEVICE), extra, dtype)
        assert got.dtype == (dtype or torch.float32) and got.shape == want.shape
        assert rel_err(got.double().cpu(), want) < tol, (layout, dtype)
        assert not got[..., V + 1:].any()
