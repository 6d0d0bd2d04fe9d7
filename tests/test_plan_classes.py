"""Every member of a class gets that class's algorithm: random instances of
each class the kernel plan covers (softmax with score modifications and
masks, low rank on a band, non-causal low rank, a decay times a polynomial
kernel, sums of terms) are planned without the dense interpreter and agree
with it: float64 < 1e-9, float32 < 1e-4, gradients of every input and param,
prefill and decode where causal; T not a multiple of the blocks, grouped
heads, batch > 1."""

import random

import mixerc
import pytest
import torch
from conftest import rel_err

pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64

HEAD = """mixer m {{
  dims H, G divides H, D, V
  input q : [H, D]
  input k : [{kh}, D]
  input v : [{kh}, V]
  input u : [H]
  input w : [{kh}]
  input doc : []
  param slope : [H]
  param cap : [H]
  param a : [H]
{body}
}}
"""

SCORE_MODS = ["S", "S - slope * abs(t - s)", "S - slope * (t - s)", "cap * tanh(S / cap)",
              "S + row(u)", "S + col(w)", "S * sigmoid(row(u))", "S - 0.1 * (t - s) * (t - s)",
              "S + exp(-abs(t - s) / 4)", "S / (1 + abs(cap))"]
MASKS = [None, "s <= t", "s <= t and t - s < 5", "0 <= t - s < 11", "s < t",
         "s <= t or s < 4", "s <= t and row(doc) == col(doc)", "row(doc) == col(doc)",
         "s <= t and t < 20 + s", "t - s > -3 and s <= t + 2", "s <= t and col(w) > -1"]


def softmax_program(rng: random.Random) -> str:
    mod = rng.choice(SCORE_MODS).replace("S", "(q @ k^T / sqrt(D))")
    mask = rng.choice(MASKS)
    grouped = rng.random() < 0.5 and "col(w)" not in mod + str(mask)
    sm = f"softmax({mod}, mask = {mask})" if mask else f"softmax({mod})"
    return HEAD.format(kh="G" if grouped else "H", body=f"  out y = {sm} @ v")


def lowrank_program(rng: random.Random) -> str:
    kind = rng.choice(["window", "window_decay", "two_sided", "global", "global_gated",
                       "poly_decay", "sum"])
    body = {
        "window": f"(q @ k^T) * (0 <= t - s < {rng.randint(2, 13)})",
        "window_decay": f"decay(-softplus(row(u) + a)) * (q @ k^T) * (t - s < "
                        f"{rng.randint(2, 13)})",
        "two_sided": f"(q @ k^T) * ({-rng.randint(0, 6)} <= t - s <= {rng.randint(0, 9)})",
        "global": "q @ k^T",
        "global_gated": "row(sigmoid(u)) * (q @ k^T) * col(sigmoid(w))",
        "poly_decay": "(1 + q @ k^T / sqrt(D))^2 * decay(-softplus(u)) * (s <= t)",
        "sum": "decay(-softplus(u)) * (q @ k^T) + (q @ k^T) * (0 <= t - s < 3) + diag(u) "
               "+ softmax(q @ k^T, mask = s <= t)",
    }[kind]
    body = body.replace("decay(-softplus(row(u) + a))", "decay(-softplus(u + a))")
    return HEAD.format(kh="H", body=f"  out y = ({body}) @ v")


def instances(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


FIXED = [  # the named variants, whatever the random draw
    HEAD.format(kh="G", body="  out y = softmax(q @ k^T / sqrt(D) - slope * (t - s), "
                             "mask = s <= t) @ v"),                        # ALiBi, GQA
    HEAD.format(kh="H", body="  out y = softmax(cap * tanh(q @ k^T / cap), mask = s <= t) @ v"),
    HEAD.format(kh="G", body="  out y = softmax(q @ k^T, mask = s <= t or s < 5) @ v"),  # prefix-LM
    HEAD.format(kh="G", body="  out y = softmax(q @ k^T, mask = s <= t and row(doc) == col(doc))"
                             " @ v"),                                      # documents, GQA
    HEAD.format(kh="H", body="  out y = (decay(-softplus(u)) * (q @ k^T) * (t - s < 6)) @ v"),
    HEAD.format(kh="H", body="  out y = ((q @ k^T) * (0 <= t - s < 7)) @ v"),
    # bands wider than two chunks: the chunk pairs inside them enter as states
    HEAD.format(kh="H", body="  out y = (decay(-softplus(u)) * (q @ k^T) * (t - s < 30)) @ v"),
    HEAD.format(kh="H", body="  out y = ((q @ k^T) * (-20 <= t - s <= 25)) @ v"),
    HEAD.format(kh="H", body="  out y = ((q @ k^T) @ v) / ((q @ k^T) @ 1 + 50)"),  # non-causal
]
PROGRAMS = FIXED + instances(softmax_program, 12, 1) + instances(lowrank_program, 12, 2)


def inputs(m, B=2, T=37, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    H, G, D, V = 4, 2, 3, 2
    kh = m.program.inputs["k"][0]
    heads = {"H": H, "G": G}[kh]
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g)  # noqa: E731
    args = {"q": r(B, T, H, D) * 0.7, "k": r(B, T, heads, D) * 0.7, "v": r(B, T, heads, V),
            "u": r(B, T, H), "w": r(B, T, heads),
            "doc": torch.div(torch.arange(T, dtype=f64), 9, rounding_mode="floor")
            .expand(B, T).clone(),
            "slope": torch.rand(H, dtype=f64, generator=g) * 0.5,
            "cap": torch.rand(H, dtype=f64, generator=g) * 3 + 1,
            "a": r(H)}
    return {n: x.to(dtype) for n, x in args.items()}


def small_blocks(m):
    """Blocks that divide neither T nor each other: every tile kind appears."""
    m._impl.pin_config(block_q=8, block_k=12, chunk=8, sdpa=False)
    return m


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(src, backend):
        if (src, backend) not in cache:
            cache[src, backend] = mixerc.compile(src, backend=backend)
            if backend == "torch":
                small_blocks(cache[src, backend])
        return cache[src, backend]
    return get


@pytest.mark.parametrize("src", PROGRAMS, ids=range(len(PROGRAMS)))
def test_planned_without_the_dense_interpreter(src, compiled):
    m = compiled(src, "torch")
    assert "dense" not in {s for mp in m.plan.matrices for s in mp.strategies}, m.explain()
    assert "runs through the dense interpreter" not in m.explain()


@pytest.mark.parametrize("src", PROGRAMS, ids=range(len(PROGRAMS)))
def test_forward_equals_dense(src, compiled):
    m, d = compiled(src, "torch"), compiled(src, "dense")
    args = inputs(m, seed=1)
    want = d(**args)
    assert rel_err(m(**args), want) < 1e-9
    y32 = m(**{n: x.float() for n, x in args.items()})
    assert y32.dtype == torch.float32 and rel_err(y32, want) < 1e-4


@pytest.mark.parametrize("src", PROGRAMS, ids=range(len(PROGRAMS)))
def test_gradients_equal_dense(src, compiled):
    m, d = compiled(src, "torch"), compiled(src, "dense")
    args = {n: x.requires_grad_() if n != "doc" else x for n, x in inputs(m, T=19, seed=2).items()}
    weight = torch.randn(d(**args).shape, dtype=f64)
    wrt = [x for n, x in args.items() if n != "doc"]
    want = torch.autograd.grad((d(**args) * weight).sum(), wrt, allow_unused=True)
    got = torch.autograd.grad((m(**args) * weight).sum(), wrt, allow_unused=True)
    for n, g, r in zip([n for n in args if n != "doc"], got, want):
        if r is None:
            assert g is None or g.abs().max() == 0, n
            continue
        assert rel_err(g, r) < 1e-8, n


@pytest.mark.parametrize("src", PROGRAMS, ids=range(len(PROGRAMS)))
def test_prefill_and_decode_equal_dense(src, compiled):
    m, d = compiled(src, "torch"), compiled(src, "dense")
    if not m.causal:
        with pytest.raises(mixerc.MixerDecodeError):
            m.step(None, **{n: x[:, 0] if x.dim() > 1 and n != "doc" or n == "doc" else x
                            for n, x in inputs(m, T=2).items()})
        return
    args = inputs(m, seed=3)
    want = d(**args)
    tokens = set(m.program.inputs)
    part = lambda a, b: {n: (x[:, a:b] if n in tokens else x) for n, x in args.items()}  # noqa
    y1, state = m(**part(0, 13), return_state=True)
    y2, state = m(**part(13, 30), initial_state=state, return_state=True)
    assert rel_err(torch.cat([y1, y2], 1), want[:, :30]) < 1e-9
    for t in range(30, 37):
        yt, state = m.step(state, **{n: (x[:, t] if n in tokens else x) for n, x in args.items()})
        assert rel_err(yt, want[:, t]) < 1e-9, t


def test_gqa_decode_state_holds_group_heads(compiled):
    src = HEAD.format(kh="G", body="  out y = softmax(q @ k^T / sqrt(D), mask = s <= t) @ v")
    m = compiled(src, "torch")
    args = inputs(m, T=9)
    _, state = m(**args, return_state=True)
    keys = [x for n, x in state.tensors.items() if n.endswith(".k")]
    assert keys and all(x.shape[2] == 2 for x in keys)  # G = 2 heads, not H = 4
    assert "keys [time, G, D]" in m.explain()


@pytest.mark.parametrize("src", FIXED[:4], ids=range(4))
def test_online_softmax_across_pieces(src, compiled, monkeypatch):
    """Scores over the memory budget are split into pieces joined by an online
    softmax: force tiny pieces and compare with dense (forward and gradients)."""
    from mixerc.runtime.torch import attention
    monkeypatch.setattr(attention, "SCORE_BUDGET", 1)  # one tile of keys per piece
    m, d = compiled(src, "torch"), compiled(src, "dense")
    args = {n: x.requires_grad_() if n != "doc" else x for n, x in inputs(m, T=41).items()}
    y, want = m(**args), d(**args)
    assert rel_err(y, want) < 1e-9
    q = args["q"]
    g, = torch.autograd.grad(y.sum(), q)
    r, = torch.autograd.grad(want.sum(), q)
    assert rel_err(g, r) < 1e-8


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_windowed_decay_strong_and_mixed_decays(dtype, compiled):
    """A decay inside a window wider than several chunks, with log-decays from
    about -0.001 to -12 per step over a long input: the chunk pairs off the
    diagonal scale q and k by their decays (each factor <= 1) and stay finite
    and equal to dense, forward and gradients."""
    src = HEAD.format(kh="H", body="  out y = (decay(-softplus(u + a)) * (q @ k^T) "
                                   "* (t - s < 30)) @ v")
    m, d = compiled(src, "torch"), compiled(src, "dense")
    args = inputs(m, T=301, seed=4)
    args["a"] = torch.tensor([-7.0, 2.5, 12.0, -2.0], dtype=f64)  # weak .. strong per head
    args["u"] = args["u"] * 3
    want = d(**args)
    got = m(**{n: x.to(dtype) for n, x in args.items()})
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < (1e-9 if dtype == f64 else 1e-4)
    if dtype == f64:
        args = {n: x.requires_grad_() if n != "doc" else x for n, x in args.items()}
        names = [n for n in args if n != "doc"]
        want = torch.autograd.grad(d(**args).sum(), [args[n] for n in names], allow_unused=True)
        got = torch.autograd.grad(m(**args).sum(), [args[n] for n in names], allow_unused=True)
        for n, g, r in zip(names, got, want):
            if r is not None:
                assert torch.isfinite(g).all() and rel_err(g, r) < 1e-8, n
