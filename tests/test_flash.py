"""The flash strategy (softmax over a band of t - s) against the dense interpreter:
block loop and SDPA fast path, masks that straddle blocks, rows with no key,
KV-cache / window decode, gradients; and the scores it must leave to dense."""

import mixerc
import pytest
from mixerc.errors import MixerPerformanceWarning
import torch
from conftest import compile_cache, rel_err
from reference import make_inputs

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("fresh_cache")


def mixer(name, matrix, extra=""):
    return f"""mixer {name} {{
  dims H, D
  input q : [H, D]
  input k : [H, D]
  input v : [H, D]
  {extra}
  out y = ({matrix}) @ v
}}"""


def sm(scores="q @ k^T / sqrt(D)", mask=None):
    return f"softmax({scores}, mask = {mask})" if mask else f"softmax({scores})"


INLINE = {
    "full": mixer("full", sm()),
    "band": mixer("band", sm(mask="-2 <= t - s and t - s <= 5")),
    "lagged": mixer("lagged", sm(mask="2 <= t - s and t - s <= 9")),  # rows 0, 1 see no key
    "strict": mixer("strict", sm(mask="s < t")),                        # row 0 sees no key
    "scaled": mixer("scaled", "-0.5 * " + sm("-(q @ k^T) * tau", "s <= t"),
                    extra="param tau : [H]"),
    "reversed": mixer("reversed", f"rev({sm(mask='s <= t')})"),
    "shifted": mixer("shifted", f"shift({sm(mask='s <= t and t - s < 5')})"),
    "two_sided": mixer("two_sided", f"{sm(mask='s <= t')} + {sm('q @ k^T', 's > t')}"),
    "differential": mixer("differential",
                          f"{sm(mask='s <= t')} - 0.5 * {sm('q @ k^T', 't - s < 8 and s <= t')}"),
    # score modifications and masks that are not a band: rendered into the tiles
    "biased": mixer("biased", sm("q @ k^T + (t - s)", "s <= t")),
    "positional": mixer("positional", sm(mask="s <= t and t < 40")),  # absolute positions
}
CLAIMED = ["attention", "sliding_window", *INLINE]
DECODE = ["attention", "sliding_window", "lagged", "strict", "scaled", "shifted", "differential"]
# blocks that divide neither T nor each other's multiples
SMALL = {"block_q": 32, "block_k": 48}


def inputs(name, B=2, T=150, seed=0, dtype=f64, H=3, D=8):
    """make_inputs for the standard mixers (attention: H=4 heads, G=2 groups),
    H heads of D dims for the inline ones."""
    if name in ("attention", "sliding_window") and (H, D) == (3, 8):
        return make_inputs(name, B=B, T=T, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=f64, generator=g).to(dtype)  # noqa: E731
    G = 1 if name == "attention" else H
    args = {"q": r(B, T, H, D), "k": r(B, T, G, D), "v": r(B, T, G, D)}
    if name == "scaled":
        args["tau"] = torch.rand(H, dtype=f64, generator=g).to(dtype) + 0.5
    return args


@pytest.fixture(scope="module")
def compiled():
    compile_once = compile_cache(INLINE)

    def get(name, backend="torch", sdpa=False, **blocks):
        m = compile_once(name, backend)
        if backend == "torch":
            cfg = m._impl.config
            for k in list(cfg):
                param = k.rsplit(".", 1)[1]
                cfg[k] = sdpa if param == "sdpa" else blocks.get(param, SMALL[param])
        return m
    return get


def source(m):
    """The generated module (regenerated: m.source() reads the JIT cache file,
    which another test's cache directory may hold)."""
    return m._impl.generate()[0]


def split(m, args, a, b):
    return {k: (v[:, a:b] if k in m.program.inputs else v) for k, v in args.items()}


def token(m, args, t):
    return {k: (v[:, t] if k in m.program.inputs else v) for k, v in args.items()}


@pytest.mark.parametrize("name", CLAIMED)
def test_strategy_claims_the_matrix(name, compiled):
    m = compiled(name)
    assert set(m.plan.matrices[0].strategies) == {"flash"}
    src = source(m)
    assert "flash" in src and "dense_apply" not in src


@pytest.mark.parametrize("name", CLAIMED)
@pytest.mark.parametrize("blocks", [SMALL, {"block_q": 7, "block_k": 5}, {"block_q": 512,
                                                                           "block_k": 1024}])
def test_float64_equals_dense(name, blocks, compiled):
    args = inputs(name, seed=1)
    ref = compiled(name, "dense")(**args)
    y = compiled(name, **blocks)(**args)
    assert y.dtype == f64 and rel_err(y, ref) < 1e-9


@pytest.mark.parametrize("name", CLAIMED)
def test_float32_close_to_float64(name, compiled):
    args = inputs(name, seed=2)
    ref = compiled(name, "dense")(**args)
    y = compiled(name)(**{k: v.float() for k, v in args.items()})
    assert y.dtype == torch.float32 and rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("name", ["attention", "full"])
def test_sdpa_fast_path(name, compiled):
    m = compiled(name, sdpa=True)
    assert "sdpa_attention(" in source(m)
    args = inputs(name, seed=3)
    ref = compiled(name, "dense")(**args)
    assert rel_err(m(**args), ref) < 1e-9
    assert rel_err(m(**{k: v.float() for k, v in args.items()}), ref) < 1e-4
    if name == "attention":  # with a cache it is not SDPA's causal mask: the loop runs
        y1, st = m(**split(m, args, 0, 100), return_state=True)
        y2 = m(**split(m, args, 100, 150), initial_state=st)
        assert rel_err(torch.cat([y1, y2], 1), ref) < 1e-9


@pytest.mark.parametrize("name,sdpa", [(n, False) for n in DECODE] + [("attention", True)])
def test_prefill_and_steps_reproduce_forward(name, sdpa, compiled):
    m = compiled(name, sdpa=sdpa)
    T, cut = 150, 101
    args = inputs(name, seed=4)
    y = m(**args)
    assert rel_err(y, compiled(name, "dense")(**args)) < 1e-9
    y1, state = m(**split(m, args, 0, cut), return_state=True)
    y2, state2 = m(**split(m, args, cut, T), initial_state=state, return_state=True)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12
    outs, st = [], state
    for t in range(cut, T):
        yt, st = m.step(st, **token(m, args, t))
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y[:, cut:]) < 1e-12
    assert set(st.tensors) == set(state2.tensors) == set(m._impl.module.STATE_KEYS)
    st, outs = None, []
    for t in range(70):  # past the window of 64
        yt, st = m.step(st, **token(m, args, t))
        outs.append(yt)
    assert rel_err(torch.stack(outs, 1), y[:, :70]) < 1e-12


@pytest.mark.parametrize("name,size", [("sliding_window", 63), ("lagged", 9)])
def test_window_state_has_a_fixed_size(name, size, compiled):
    m = compiled(name)
    args = inputs(name, seed=5)
    shapes = set()
    for T in (1, 10, 140):
        _, st = m(**split(m, args, 0, T), return_state=True)
        shapes.add(tuple(st.tensors["y.k"].shape))
        for t in range(T, T + 3):
            _, st = m.step(st, **token(m, args, t))
            shapes.add(tuple(st.tensors["y.k"].shape))
    assert shapes == {(2, size, 3 if name == "lagged" else 4, 8)}
    assert st.tensors["y.pos"].shape == (2,)  # tokens seen, per sequence


def test_causal_cache_grows_with_the_context(compiled):
    m = compiled("attention")
    args = inputs("attention", seed=6)
    _, st = m(**split(m, args, 0, 40), return_state=True)
    _, st = m.step(st, **token(m, args, 40))
    assert st.tensors["y.k"].shape[1] == 41 and "y.filled" not in st.tensors


@pytest.mark.parametrize("name", ["attention", "band", "lagged", "strict", "scaled"])
@pytest.mark.parametrize("block_k", [3, 64])  # online over key blocks / one softmax
def test_gradcheck(name, block_k, compiled):
    """float64 gradcheck of the block loop: masked, skipped and partial blocks,
    rows with no key, group heads (attention: H=2, G=1)."""
    m = compiled(name, block_q=4, block_k=block_k)
    args = inputs(name, B=1, T=11, seed=7, H=2, D=3)
    xs = [x.requires_grad_() for x in args.values()]
    assert torch.autograd.gradcheck(lambda *xs: m(**dict(zip(args, xs))), xs, fast_mode=True)


@pytest.mark.parametrize("name", ["sliding_window", "scaled"])
def test_gradients_equal_dense(name, compiled):
    args = {k: v.clone().requires_grad_() for k, v in inputs(name, T=90, seed=8).items()}
    w = torch.randn(2, 90, 4 if name == "sliding_window" else 3, 8, dtype=f64)
    ref = torch.autograd.grad((compiled(name, "dense")(**args) * w).sum(), list(args.values()))
    got = torch.autograd.grad((compiled(name)(**args) * w).sum(), list(args.values()))
    for n, g, r in zip(args, got, ref):
        assert rel_err(g, r) < 1e-9, n


UNCLAIMED = {
    "transposed": mixer("transposed", f"{sm()}^T"),
    "squared": mixer("squared", sm("(q @ k^T) * (q @ k^T)", "s <= t")),
    "masked_after": mixer("masked_after", f"tril({sm()}, -1)"),  # mask outside the softmax
    "gated": mixer("gated", f"{sm(mask='s <= t')} * (q @ k^T)"),
}


@pytest.mark.parametrize("name", UNCLAIMED)
def test_other_scores_fall_back_to_dense(name):
    with pytest.warns(MixerPerformanceWarning, match="dense interpreter"):
        m = mixerc.compile(UNCLAIMED[name], backend="torch")
    assert m.plan.matrices[0].strategies == ["dense"]
    args = inputs(name, T=50, seed=9)
    ref = mixerc.compile(UNCLAIMED[name], backend="dense")(**args)
    assert rel_err(m(**args), ref) < 1e-9


def test_a_softmax_normalized_over_later_keys_is_not_causal():
    """tril(softmax(S)) is zero above the diagonal, but row t's normalizer
    still reads keys s > t: no decode (dense would give wrong steps)."""
    m = mixerc.compile(UNCLAIMED["masked_after"], backend="torch")
    assert not m.analysis.causal and "normalizes each row" in m.analysis.reason
    with pytest.raises(mixerc.MixerDecodeError):
        m.step(None, **token(m, inputs("masked_after", T=3), 0))
