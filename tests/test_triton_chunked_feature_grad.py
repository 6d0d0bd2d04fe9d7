"""The chunked kernels' backward takes the feature maps' chain rule itself
(templates/triton_chunked.py.jinja FQ, FK, FV, DMAP; runtime/triton/chunked.py
MappedChunkedFn): the adjoint runs read q and k as given and map them on
load, and the dq (dk) run multiplies its output by the map's derivative at
the raw q (k), storing q's (k's) gradient in its dtype. Against the dense
float64 interpreter: linear attention (elu + 1), random normalized programs
with other feature maps (exp(-softplus(x)), sigmoid; keys at groups with a
scale, whose k keeps the torch chain rule), a decay with its gradient (which
reads the mapped q and k), fp32 and bf16, batch 2, T not a multiple of the
chunk, an initial state; and the bf16 backward's torch ops, so a fused path
that silently stops fails here. Kernels run in Triton's CPU interpreter."""

import pytest
import torch
from conftest import DEVICE, compiled_mixers, flat_outputs, rel_err, to_device, torch_ops_of
from test_triton_chunked_fused import NORMALIZED_DECAY, normalized_program

from mixerc.inputs import random_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
f64 = torch.float64
SMALL = {"chunk": 16, "block_k": 16, "block_v": 16}
SIZES = {"H": 4, "G": 2, "D": 20, "K": 20, "V": 12}
# normalized programs: 0 exp(-softplus(q)), sigmoid(u) * exp(-softplus(k)) at G keys
# (k's chain rule by torch), a decay, strict (+ 1); 5 sigmoid features and a decay
CASES = ["linear_attention", NORMALIZED_DECAY, normalized_program(0), normalized_program(5)]
IDS = ["linear_attention", "normalized_decay", "normalized0", "normalized5"]


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers(**SMALL)


def run_of(m):
    import inspect
    return next(f for n, f in vars(m._impl.module).items() if n.startswith("chunked_kernel")
                and inspect.isfunction(f) and "decode" in inspect.signature(f).parameters)


def test_cases_fuse_feature_maps(compiled):
    """Every case's kernels map q on load in the backward (q's feature map
    has a rendered derivative), and k where it has no key scale."""
    want = {"linear_attention": (True, True), NORMALIZED_DECAY: (True, True),
            CASES[2]: (True, False), CASES[3]: (True, True)}
    for src in CASES:
        m = compiled(src)
        features = run_of(m).prologue.features
        assert features[0], src
        if src in want:
            assert features == want[src], src
        source = m.source()
        assert "if DMAP == 1:" in source and ("if DMAP == 2:" in source) == features[1], src
        assert "if FV == 1:" in source and "if FK == 1:" in source, src


def grads(m, args, dtype, dy, wrt, initial=None, start=0):
    """The gradients of sum(dy * y[:, start:]) with respect to `wrt` (at their
    tokens from `start`), m on dtype copies of args, the first `start` tokens
    run before without a gradient (their state entering the second call)."""
    x = to_device(args, dtype)
    tokens = set(m.program.inputs)
    state = None
    if start:
        with torch.no_grad():
            _, state = m(**{n: (v[:, :start] if n in tokens else v) for n, v in x.items()},
                         return_state=True)
        x = {n: (v[:, start:] if n in tokens else v) for n, v in x.items()}
    leaves = {n: x[n].detach().clone().requires_grad_() for n in wrt}
    x.update(leaves)
    y = flat_outputs(m(**x, initial_state=state) if state is not None else m(**x))
    assert y.dtype == dtype
    out = torch.autograd.grad((y.float() * dy.float().to(DEVICE)).sum(), list(leaves.values()))
    for n, g in zip(wrt, out):
        assert g.dtype == x[n].dtype, n
    return [g.double().cpu() for g in out]


@pytest.mark.parametrize("start", [0, 18], ids=["from_zero", "initial_state"])
@pytest.mark.parametrize("src", CASES, ids=IDS)
def test_gradients_equal_dense(src, start, compiled, bf16_dots, poisoned):
    m, d = compiled(src), compiled(src, "dense")
    B, T = 2, 45  # (from 18: 27 tokens, two chunks of 16, the second partial)
    args = random_inputs(m.program, SIZES, B, T, seed=4, dtype=f64)
    wrt = [n for n in m.program.inputs if args[n].dim() >= 3]
    ref = {n: x.clone().requires_grad_(n in wrt) for n, x in args.items()}
    y = flat_outputs(d(**ref))
    dy = torch.randn(y[:, start:].shape, dtype=f64, generator=torch.Generator().manual_seed(5))
    want = torch.autograd.grad((y[:, start:] * dy).sum(), [ref[n] for n in wrt])
    want = [w[:, start:] for w in want]
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        have = grads(m, args, dtype, dy, wrt, start=start)
        for n, h, w in zip(wrt, have, want):
            assert h.shape == w.shape and not h.isnan().any(), n
            assert rel_err(h, w) < tol, (n, dtype, rel_err(h, w))


def unfused_work(m, T=37):
    """The bf16 backward's torch ops that a fused chain rule has no need of:
    elu and its backward, and float32 conversions of [B, T, H, K] tensors
    (the mapped q or k, their gradients)."""
    args = random_inputs(m.program, SIZES, 2, T, seed=6, dtype=f64)
    xs = {n: t.to(torch.bfloat16 if t.dim() >= 3 else torch.float32).to(DEVICE)
          .requires_grad_() for n, t in args.items()}
    y = m(**xs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    ops = torch_ops_of(lambda: y.backward(dy))
    K = SIZES["K"]
    return [o for o in ops if o[0] in ("elu", "elu_backward") or (
        o[0] == "_to_copy" and len(o[1][0][0]) == 4 and o[1][0][0][:2] == (2, T)
        and o[1][0][0][-1] == K and torch.float32 in (o[1][0][1], o[2]))]


def test_bf16_backward_maps_in_the_kernels(compiled, bf16_dots, monkeypatch):
    """Linear attention's bf16 backward: no elu, no elu_backward, no float32
    copy of q or k or of their gradients; with the fused path off (the maps
    recomputed by torch ops, their chain rule by autograd) all of them are
    back, so this fails if the fusion silently stops."""
    m = compiled("linear_attention")
    assert unfused_work(m) == []
    monkeypatch.setattr(run_of(m).prologue, "features", (False, False))
    found = {o[0] for o in unfused_work(m)}
    assert {"elu", "elu_backward", "_to_copy"} <= found, found


def test_float64_keeps_the_torch_chain_rule(compiled):
    """float64 inputs run the torch chunks, the maps' chain rule by autograd
    (no features= reaches them), still equal to dense."""
    m, d = compiled("linear_attention"), compiled("linear_attention", "dense")
    args = random_inputs(m.program, SIZES, 2, 29, seed=7, dtype=f64)
    ref = {n: x.clone().requires_grad_() for n, x in args.items()}
    got = {n: x.clone().to(DEVICE).requires_grad_() for n, x in args.items()}
    want = torch.autograd.grad(d(**ref).sum(), list(ref.values()))
    have = torch.autograd.grad(m(**got).sum(), list(got.values()))
    for n, h, w in zip(ref, have, want):
        assert rel_err(h.cpu(), w) < 1e-9, n
