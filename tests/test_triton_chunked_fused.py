"""What the chunked scalar-decay Triton kernels compute on load instead of
reading from HBM: a per-token, per-head column scale of group-shared keys
(SSD's delta * B: B stays at its G groups, delta scales the values' rows in
the state and the score columns in the output). Against the dense float64
interpreter: SSD at G = 1 and G = 2 with H = 4, seeded random programs with
a column scale on grouped keys (with and without a decay, strict or not, as
a factor of the key or a col() gate), forward in float32 / float16 /
bfloat16, gradients of every input and param, T not a multiple of the chunk,
batch > 1, prefill then decode, outputs poisoned; and the generated code,
so a fusion that silently stops fails here. Kernels run in Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1)."""

import inspect
import random
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import DEVICE, assert_gradients_equal_dense, compiled_mixers, flat_outputs, rel_err, to_device

from mixerc.inputs import random_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64
SMALL = {"chunk": 16, "block_k": 16, "block_v": 16}
SIZES = {"H": 4, "D": 20, "K": 20, "N": 20, "V": 20, "P": 20}


def scaled_program(seed: int) -> str:
    """A random mixer whose keys are a per-token, per-head scale times keys
    shared by G groups of heads."""
    rng = random.Random(seed)
    scale = rng.choice(["softplus(u)", "sigmoid(u) * 2", "exp(-softplus(u))",
                        "softplus(u) * sigmoid(w)"])
    q = rng.choice(["H", "G"])
    mask = rng.choice(["(s <= t)", "(s < t)"])
    decay = rng.choice(["", "decay(-softplus(w)) * ", "decay(-exp(p) * softplus(u)) * "])
    if rng.random() < 0.5:
        lowrank = f"(q @ ({scale} * k)^T)"
    else:  # a column gate folds into the key too
        lowrank = f"col({scale}) * (q @ k^T)"
    return f"""mixer scaled_{seed} {{
  dims H, G divides H, D, V
  input q : [{q}, D]
  input k : [G, D]
  input v : [H, V]
  input u : [H]
  input w : [H]
  param p : [H]
  out y = ({decay}{lowrank} * {mask}) @ v
}}"""


def normalized_program(seed: int) -> str:
    """A random mixer (M @ v) / (M @ 1) with positive scores (a positive
    denominator), with or without a decay, keys per head or per group with a
    per-head scale."""
    rng = random.Random(seed)
    phi = rng.choice(["elu({x}) + 1", "exp(-softplus({x}))", "sigmoid({x})"])
    decay = rng.choice(["", "decay(-softplus(u)) * "])
    strict = rng.random() < 0.5
    mask, eps = ("(s < t)", " + 1") if strict else ("(s <= t)", "")  # row 0 sums nothing
    keys, k = rng.choice([("H", "({k})"), ("G", "(sigmoid(u) * ({k}))")])
    k = k.format(k=phi.format(x="k"))
    return f"""mixer normalized_{seed} {{
  dims H, G divides H, D, V
  input q : [H, D]
  input k : [{keys}, D]
  input v : [H, V]
  input u : [H]
  let M = {decay}(({phi.format(x="q")}) @ {k}^T) * {mask}
  out y = (M @ v) / (M @ 1{eps})
}}"""


def skip_program(seed: int) -> str:
    """A random mixer M @ x + d * x (a per-head param d, either order), with
    or without a decay and a key scale on grouped keys, strict or not."""
    rng = random.Random(seed)
    decay = rng.choice(["", "decay(-softplus(u)) * "])
    keys, k = rng.choice([("H", "k"), ("G", "(softplus(u) * k)")])
    mask = rng.choice(["(s <= t)", "(s < t)"])
    out = rng.choice(["M @ x + d * x", "d * x + M @ x", "(M @ x) + x * d"])
    return f"""mixer skip_{seed} {{
  dims H, G divides H, D, P
  input q : [H, D]
  input k : [{keys}, D]
  input x : [H, P]
  input u : [H]
  param d : [H]
  let M = {decay}(q @ {k}^T) * {mask}
  out y = {out}
}}"""


# M @ x read twice: the skip cannot go into the kernel (and is still right)
SKIP_READ_TWICE = """mixer skip_twice {
  dims H, D, P
  input q : [H, D]
  input k : [H, D]
  input x : [H, P]
  param d : [H]
  let M = (q @ k^T) * (s <= t)
  out y = M @ x + d * x
  out z = M @ x
}"""


SEEDS = [0, 1]  # a col gate + decay and q at G; strict without decay (SSD: a param decay)
NORM_SEEDS = [0, 12]  # strict + decay + scaled G keys (+ 1), decay + G keys (divided)
CASES = [("ssd", 1), ("ssd", 2)] + [(scaled_program(s), 2) for s in SEEDS]
IDS = ["ssd_G1", "ssd_G2"] + [f"random{s}" for s in SEEDS]
NORM_CASES = [("linear_attention", 1)] + [(normalized_program(s), 2) for s in NORM_SEEDS]
NORM_IDS = ["linear_attention"] + [f"normalized{s}" for s in NORM_SEEDS]
SKIP_SEEDS = [0, 3]  # d * x + M @ x with decay and scaled G keys; strict, x * d
SKIP_CASES = [(skip_program(s), 2) for s in SKIP_SEEDS] + [(SKIP_READ_TWICE, 1)]
SKIP_IDS = [f"skip{s}" for s in SKIP_SEEDS] + ["skip_read_twice"]
ALL_CASES, ALL_IDS = CASES + NORM_CASES + SKIP_CASES, IDS + NORM_IDS + SKIP_IDS


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(**SMALL)


def args_of(m, G, B=2, T=29, seed=1):
    return random_inputs(m.program, dict(SIZES, G=G), B, T, seed=seed, dtype=f64)


def test_random_programs_have_a_key_scale(compiled):
    """Every random program is planned with the scale split off its keys (else
    the tests below would not test the fusion)."""
    for src, _ in CASES:
        text = compiled(src).explain()
        assert re.search(r"k: \[G, (D|N)\]", text) and "k_scale: [H]" in text, text
    for src, _ in NORM_CASES:
        assert "normalizer: M @ 1" in compiled(src).explain()


@pytest.mark.parametrize("src,G", NORM_CASES, ids=NORM_IDS)
def test_generated_code_has_no_ones_column(src, G, compiled):
    """The normalizer's ones never reach HBM: no torch.full / cat of values in
    the forward, the kernels told ones_column=True, its z row in them, and
    the division in the kernel where the program divides by M @ 1 itself."""
    m = compiled(src)
    forward = m.source().split("\ndef forward(")[1]
    assert "torch.full(" not in forward and "torch.cat(" not in forward, forward
    call = next(line for line in forward.splitlines() if "chunked_kernels_apply(" in line)
    assert "ones_column=True" in call, call
    assert "den = tl.sum(s, 1) + qz" in m.source()
    # (M @ v) / (M @ 1) divides in the kernel's epilogue; / (M @ 1 + 1) in torch
    divides = src == "linear_attention" or "(M @ 1)" in src
    assert ("divide=True" in call) == divides, call
    assert (re.search(r"/ \w+\[\.\.\., None\]", forward) is None) == divides, forward
    assert "y = y / tl.where(t_ok, den, 1.0)" in m.source()


@pytest.mark.parametrize("src,G", [("ssd", 2)] + SKIP_CASES, ids=["ssd"] + SKIP_IDS)
def test_generated_code_adds_the_skip_in_the_kernel(src, G, compiled):
    """M @ x + d * x: d goes to the kernels (skip=), whose epilogue adds it;
    the forward computes no d * x of its own, unless M @ x is read twice."""
    m = compiled(src)
    forward = m.source().split("\ndef forward(")[1]
    call = next(line for line in forward.splitlines() if "chunked_kernels_apply(" in line)
    fused = src != SKIP_READ_TWICE
    assert ("skip=" in call) == fused, call
    assert ("skip: " in m.explain()) == fused
    assert bool(re.search(r"\b[dD]\[\.\.\., None\]", forward)) != fused, forward
    if fused:
        assert "y += tl.load(DS + h) * v.to(tl.float32)" in m.source()


@pytest.mark.parametrize("src,G", CASES, ids=IDS)
def test_generated_code_keeps_keys_at_their_groups(src, G, compiled):
    """The keys reach the kernels as given (no repeat_interleave, no scale
    multiplied in): the scale goes to the kernel as key_scale=, or the
    kernels compute it on load from its leaves (leaves=, prologue.py)."""
    m = compiled(src)
    forward = m.source().split("\ndef forward(")[1]
    assert "repeat_interleave" not in forward, forward
    call = next(line for line in forward.splitlines() if "chunked_kernels_apply(" in line)
    kernels = m.source()
    if "leaves=" in call:
        assert "key_scale=" not in call, call
        assert "w = tl.where(t_ok, " in kernels
    else:
        assert "key_scale=" in call, call
    assert "w = tl.load(KS + " in kernels and "w[None, :]" in kernels


@pytest.mark.parametrize("src,G", ALL_CASES, ids=ALL_IDS)
def test_forward_equals_dense(src, G, compiled, bf16_dots, poisoned):
    m, d = compiled(src), compiled(src, "dense")
    args = args_of(m, G)
    want = flat_outputs(d(**args))
    y = flat_outputs(m(**to_device(args, torch.float32)))
    assert not y.isnan().any() and rel_err(y.cpu(), want) < 1e-4
    for half in (torch.float16, torch.bfloat16):
        y = flat_outputs(m(**to_device(args, half)))
        assert y.dtype == half and rel_err(y.float().cpu(), want) < 2e-2, half
    assert rel_err(flat_outputs(m(**to_device(args, f64))).cpu(), want) < 1e-9  # the torch chunks


@pytest.mark.parametrize("src,G", ALL_CASES, ids=ALL_IDS)
def test_gradients_equal_dense(src, G, compiled, poisoned):
    m, d = compiled(src), compiled(src, "dense")
    base = args_of(m, G, T=27, seed=2)
    assert_gradients_equal_dense(m, d, base)


@pytest.mark.parametrize("src,G", CASES[:3] + NORM_CASES[1:3] + SKIP_CASES[:2],
                         ids=IDS[:3] + NORM_IDS[1:3] + SKIP_IDS[:2])
def test_prefill_then_decode_equal_dense(src, G, compiled):
    """A prefill's state equals the torch backend's; continuing from it (a
    nonzero initial state through the kernels) and decoding token by token
    (the scale applied to the keys per head) equal dense on the whole input."""
    m, d, t = compiled(src), compiled(src, "dense"), compiled(src, "torch")
    args = args_of(m, G, T=40, seed=3)
    want = d(**args)
    x = to_device(args, torch.float32)
    tokens = set(m.program.inputs)
    part = lambda a, b, x=x: {n: (v[:, a:b] if n in tokens else v) for n, v in x.items()}  # noqa
    y1, state = m(**part(0, 18), return_state=True)
    _, ref_state = t(**{n: (v[:, :18] if n in tokens else v) for n, v in args.items()},
                     return_state=True)
    assert state.tensors.keys() == ref_state.tensors.keys()
    for key, s in state.tensors.items():
        assert s.shape == ref_state.tensors[key].shape and s.abs().max() > 0 and rel_err(s.cpu(), ref_state.tensors[key]) < 1e-5, key
    y2, state = m(**part(18, 36), initial_state=state, return_state=True)
    assert rel_err(torch.cat([y1, y2], 1).cpu(), want[:, :36]) < 1e-4
    for i in range(36, 40):
        yt, state = m.step(state, **{n: (v[:, i] if n in tokens else v) for n, v in x.items()})
        assert rel_err(yt.cpu(), want[:, i]) < 1e-4, i


def _scaled_recurrence(q, k, v, a, w, S0):
    """y_t = q_t S_t, S_t = exp(a_t) S_{t-1} + w_t k_t v_t^T in float64."""
    H = v.shape[2]
    q, k = (x.repeat_interleave(H // x.shape[2], 2) for x in (q, k))
    S, ys = S0, []
    for i in range(v.shape[1]):
        S = torch.exp(a[:, i])[..., None, None] * S + \
            (w[:, i, :, None] * k[:, i])[..., None] * v[:, i, :, None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, i], S))
    return torch.stack(ys, 1), S


def test_kernel_scale_gradient_with_initial_and_final_state(compiled):
    """The kernel through ChunkedFn with a key scale, directly: k at G = 2 of
    H = 4 heads, q at 1, a nonzero initial state and a used final state; the
    gradients of q, k, v, a, S0 and the scale against a float64 recurrence."""
    from mixerc.runtime.triton.chunked import chunked_kernels_apply
    mod = compiled("ssd")._impl.module
    fn = next(getattr(mod, n) for n in vars(mod)
              if n.startswith("chunked_kernel") and "_key_scale_" in n and n.endswith("_skip"))
    g = torch.Generator().manual_seed(7)
    B, T, H, K, V = 2, 35, 4, 20, 20
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g)  # noqa: E731
    base = [r(B, T, 1, K), r(B, T, 2, K), r(B, T, H, V),
            -torch.rand(B, T, H, dtype=f64, generator=g), torch.rand(B, T, H, dtype=f64,
                                                                    generator=g) + 0.5,
            r(B, H, K, V)]
    ref = [x.clone().requires_grad_() for x in base]
    got = [x.float().to(DEVICE).requires_grad_() for x in base]
    wy, ws = r(B, T, H, V), r(B, H, K, V)
    y, S = _scaled_recurrence(*ref)
    want = torch.autograd.grad((y * wy).sum() + (S * ws).sum(), ref)
    q, k, v, a, w, S0 = got
    y2, S2 = chunked_kernels_apply(fn, q, k, v, a, S0, 16, 16, 16, 4, 2, key_scale=w)
    assert rel_err(y2.detach().cpu(), y) < 1e-5 and rel_err(S2.detach().cpu(), S) < 1e-5
    have = torch.autograd.grad((y2 * wy.float()).sum() + (S2 * ws.float()).sum(), got)
    for name, h, x in zip(["q", "k", "v", "a", "w", "S0"], have, want):
        assert h.shape == x.shape and rel_err(h.cpu(), x) < 1e-4, name


class _Ops(TorchDispatchMode):
    """The aten ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("src,G", [("ssd", 2), (scaled_program(0), 2)], ids=["ssd", "random0"])
def test_key_scale_chain_rule_runs_in_the_dk_kernel(src, G, compiled, monkeypatch):
    """The backward's dk run takes the key scale's chain rule in its epilogue
    (w times its output, w's gradient k . g by V block) and the dv run
    scales its rows by w (DSCALE 2 and 1): they get them, and the backward
    multiplies no [.., K] tensor by a matrix in torch (the einsums over k's
    groups); the gradients stay those of the dense interpreter
    (test_gradients_equal_dense, and here K = 20 over two V blocks of 16, so
    w's gradient sums partials)."""
    m, d = compiled(src), compiled(src, "dense")
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_op"))
    real, scaled = getattr(mod, op), []

    def spy(*args):
        scaled.append(args[-3])  # DSCALE (then keep_states, reverse)
        return real(*args)
    monkeypatch.setattr(mod, op, spy)
    base = args_of(m, G, T=27, seed=3)
    x = {n: t.to(DEVICE).float().requires_grad_() for n, t in base.items()}
    y = flat_outputs(m(**x))
    dy = torch.randn_like(y)
    with _Ops() as ops:
        y.backward(dy)
    # the forward, then the dq run (its keys scaled), the dk run (2: rows times
    # w and w's gradient) and the dv run (1: rows times w)
    assert scaled == [0, 0, 2, 1], scaled
    assert not ops.names & {"bmm", "einsum", "mm"}, ops.names
    xd = {n: t.clone().requires_grad_() for n, t in base.items()}
    flat_outputs(d(**xd)).backward(dy.double().cpu())
    for n in x:  # (an input the program does not read has no gradient)
        if xd[n].grad is None:
            assert x[n].grad is None or not x[n].grad.any(), n
        else:
            assert rel_err(x[n].grad.double().cpu(), xd[n].grad) < 1e-4, n


class _Touching(TorchDispatchMode):
    """The aten ops dispatched inside it that read or write a tensor of
    `shape` (views move nothing: not counted)."""
    VIEWS = {"alias", "detach", "view", "_unsafe_view", "expand", "slice", "select",
             "as_strided", "unsqueeze", "squeeze", "transpose", "permute", "t"}

    def __init__(self, shape):
        super().__init__()
        self.shape, self.names = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "aten" and func.overloadpacket.__name__ not in self.VIEWS:
            outs = out if isinstance(out, (tuple, list)) else [out]
            if any(torch.is_tensor(x) and tuple(x.shape) == self.shape
                   for x in list(args) + list(outs)):
                self.names.add(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("src,G", [("ssd", 2)] + SKIP_CASES[:2], ids=["ssd"] + SKIP_IDS[:2])
def test_skip_gradient_runs_in_the_dv_kernel(src, G, compiled, monkeypatch):
    """y = M @ x + d * x: the backward's dv run adds d_h dy_t and sums d's
    gradient dy . x in its epilogue (skip_grad=, SKIP 2), so no torch op
    reads or writes a tensor of y's shape (P = 12: no other operand has
    it); d's and x's gradients are the dense interpreter's, over T = 37 on
    chunks of 16 and P over blocks of 16 and 8 (partial sums)."""
    m, d = compiled(src), compiled(src, "dense")
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_op"))
    real, flags = getattr(mod, op), []
    signature = inspect.signature(getattr(mod, op[:-len("_op")] + "_launch"))

    def spy(*args):
        flags.append(signature.bind(*args).arguments["skip_grad"])
        return real(*args)
    monkeypatch.setattr(mod, op, spy)
    sizes = dict(SIZES, G=G, P=12)
    base = random_inputs(m.program, sizes, 2, 37, seed=5, dtype=f64)
    for block in (16, 8):
        del flags[:]
        m._impl.pin_config(**dict(SMALL, block_v=block))
        x = {n: t.to(DEVICE).float().requires_grad_() for n, t in base.items()}
        y = flat_outputs(m(**x))
        dy = torch.randn_like(y)
        with _Touching(y.shape) as ops:
            y.backward(dy)
        assert flags[-1] is True and not any(flags[:-1]), flags  # the dv run is the last
        assert not ops.names, ops.names
        xd = {n: t.clone().requires_grad_() for n, t in base.items()}
        flat_outputs(d(**xd)).backward(dy.double().cpu())
        for n in x:
            if xd[n].grad is not None:
                assert rel_err(x[n].grad.double().cpu(), xd[n].grad) < 1e-4, (block, n)
    m._impl.pin_config(**SMALL)


def test_keys_reach_the_kernel_at_their_groups(compiled, monkeypatch):
    """SSD at G = 2: q and k reach the kernels' op at 2 heads; the scale is
    computed on load from dt at 4 heads (no key_scale tensor)."""
    m = compiled("ssd")
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_op"))
    real, seen = getattr(mod, op), []

    def spy(q, k, v, a, key_scale, *rest):
        leaves, mapped, raw, dscale, keep_states, _reverse = rest[-6:]
        assert key_scale is None and a is None and mapped and not keep_states
        assert raw is None and dscale == 0
        seen.append((q.shape[2], k.shape[2], v.shape[2], max(x.shape[-1] for x in leaves)))
        return real(q, k, v, a, key_scale, *rest)
    monkeypatch.setattr(mod, op, spy)
    m(**to_device(args_of(m, 2, T=40), torch.float32))
    assert seen == [(2, 2, 4, 4)], seen


NORMALIZED_DECAY = """mixer normalized_decay {
  dims H, D, V
  input q : [H, D]
  input k : [H, D]
  input v : [H, V]
  input u : [H]
  let M = decay(-softplus(u)) * ((elu(q) + 1) @ (elu(k) + 1)^T) * (s <= t)
  out y = (M @ v) / (M @ 1)
}"""


@pytest.mark.parametrize("V", [5, 8])
def test_normalizer_gradient_with_initial_and_final_state(V, compiled):
    """The normalizer's kernels through ChunkedFn, directly: the ones column
    and the division in the kernels, a nonzero initial state and a used final
    state (so the dv run reads the ones column's gradient too), the dq and dk
    runs' contraction over [v, 1] padded with zero columns to a multiple of 8
    (V = 5: two; V = 8: seven); y is the quotient alone (V columns: dy has
    no normalizer column); the gradients of q, k, v, a and S0 against a
    float64 recurrence."""
    import inspect

    from mixerc.runtime.triton.chunked import chunked_kernels_apply
    mod = compiled(NORMALIZED_DECAY)._impl.module
    fn = next(f for n, f in vars(mod).items() if n.startswith("chunked_kernel_") and
              inspect.isfunction(f) and "ones_column" in inspect.signature(f).parameters)
    g = torch.Generator().manual_seed(V)
    B, T, H, K = 2, 35, 3, 12
    u = lambda *s: torch.rand(*s, dtype=f64, generator=g)  # noqa: E731
    base = [u(B, T, H, K), u(B, T, H, K), torch.randn(B, T, H, V, dtype=f64, generator=g),
            -u(B, T, H) * 0.5, u(B, H, K, V + 1)]
    ref = [x.clone().requires_grad_() for x in base]
    got = [x.float().to(DEVICE).requires_grad_() for x in base]

    def recurrence(q, k, v, a, S):
        ys = []
        for i in range(T):
            kv = k[:, i, :, :, None] * torch.cat([v[:, i], torch.ones_like(v[:, i, :, :1])], -1)[
                :, :, None]
            S = torch.exp(a[:, i])[..., None, None] * S + kv
            n = torch.einsum("bhk,bhkv->bhv", q[:, i], S)
            ys.append(n[..., :-1] / n[..., -1:])
        return torch.stack(ys, 1), S

    wy, ws = torch.randn(B, T, H, V, dtype=f64, generator=g), torch.randn(
        B, H, K, V + 1, dtype=f64, generator=g)
    y, S = recurrence(*ref)
    want = torch.autograd.grad((y * wy).sum() + (S * ws).sum(), ref)
    q, k, v, a, S0 = got
    y2, S2 = chunked_kernels_apply(fn, q, k, v, a, S0, 16, 16, 16, 4, 2, ones_column=True,
                                   divide=True)
    assert y2.shape == y.shape
    assert rel_err(y2.detach().cpu(), y) < 1e-5 and rel_err(S2.detach().cpu(), S) < 1e-5
    have = torch.autograd.grad((y2 * wy.float()).sum() + (S2 * ws.float()).sum(), got)
    for name, h, x in zip(["q", "k", "v", "a", "S0"], have, want):
        assert h.shape == x.shape and rel_err(h.cpu(), x) < 1e-4, name
