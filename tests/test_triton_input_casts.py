"""Where the Triton backend's generated forward converts half-precision
inputs to float32 (codegen/triton/module.py cast_sites): only where
something reads them in float32, and only on the branch that does. A bf16
input the kernels read as given (q, k, v of the chunked kernels, Mamba's x,
dt, B, C on the scan, the maps' leaves) must not be copied to float32 on the
path that runs the kernels: each copy is a pass over HBM the peers' kernels
do not make. The branches that still read the cast (the chunked arm of
Mamba's scan-or-chunks choice, the float64 torch code) must still see it,
and their outputs must equal the dense interpreter's."""

import ast

import pytest
import torch
from conftest import DEVICE, compiled_mixers, rel_err, to_device
from reference import make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from mixerc.codegen.triton.module import _cast_site

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")

# the inputs a forward still copies to float32 for bf16 inputs, and why: a
# test that fails here after a change either found a new copy (a regression)
# or one that went away (shrink the set)
STILL_CAST = {
    "gla": {"g"},                        # these dims take the scan, whose host widens g
    "mamba": set(),
    "ssd": set(),                        # dt: a map's leaf, read by the kernels
    "retnet": set(),
    "linear_attention": set(),
    "based": set(),
    "hydra": {"dt_f", "dt_b", "delta"},  # its maps run in torch before the passes
}


class _Casts(TorchDispatchMode):
    """Records which of the user's tensors get a float32 copy."""

    def __init__(self, names: dict):
        super().__init__()
        self.names, self.seen = names, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(args[0]) and \
                kwargs.get("dtype") == torch.float32 and args[0].data_ptr() in self.names:
            self.seen.add(self.names[args[0].data_ptr()])
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def _bf16_call(name: str, T: int = 40):
    """make_inputs' arguments with the token inputs in bf16 and the params in
    float32 (the binder's dtype for half inputs), and the token inputs' names."""
    args = make_inputs(name, T=T)
    tokens = {n for n, x in args.items() if x.dim() >= 3}
    return {n: x.to(device=DEVICE, dtype=torch.bfloat16 if n in tokens else torch.float32)
            for n, x in args.items()}, tokens


@pytest.mark.parametrize("name", sorted(STILL_CAST))
def test_no_float32_copy_of_what_the_kernels_read(name, compiled):
    m = compiled(name)
    args, tokens = _bf16_call(name)
    record = _Casts({args[n].data_ptr(): n for n in tokens})
    with record:
        m(**args)
    assert record.seen == STILL_CAST[name], (name, record.seen)


def test_the_chunked_arm_still_casts(compiled, bf16_dots):
    """Mamba with the chunked kernels pinned: its maps (delta, delta * x, the
    log-decay) read x and dt in float32 inside that arm alone, and the bf16
    result stays within bf16's error of the dense interpreter's."""
    m = compiled_mixers(algorithm="chunks")("mamba")
    args, _ = _bf16_call("mamba", T=37)
    record = _Casts({args[n].data_ptr(): n for n in ("x", "dt")})
    with record:
        y = m(**args)
    assert record.seen == {"x", "dt"}
    want = compiled("mamba", "dense")(**to_device(make_inputs("mamba", T=37), torch.float64))
    assert rel_err(y, want) < 2e-2


def _site(body: str, name: str):
    tree = ast.parse("def forward():\n" + "\n".join("    " + ln for ln in body.split("\n")))
    return _cast_site(tree.body[0].body, name, top=True)


def test_cast_sites():
    """The rule itself: the innermost if-arm holding every read, before its
    first read; the top for reads at the top, in a condition, in both arms
    at the top level, or inside a loop (a cast there would repeat)."""
    body = "\n".join([
        "y = x_in",                      # 0
        "if c:",                         # 1
        "    y = f(a)",                  # 2
        "else:",                         # 3
        "    z = g(b)",                  # 4
        "    if d:",                     # 5
        "        y = h(b, e)",           # 6
        "    else:",                     # 7
        "        y = h(e)",              # 8
        "if u(top):",                    # 9
        "    y = 1",                     # 10
        "for i in r:",                   # 11
        "    y = y + w",                 # 12
        "if c:",                         # 13
        "    y = both",                  # 14
        "else:",                         # 15
        "    y = both",                  # 16
    ])
    assert _site(body, "a") == 2
    assert _site(body, "b") == 4          # both reads in the else arm, before the first
    assert _site(body, "e") == 5          # both arms of the inner if: before it
    assert _site(body, "top") is None     # read in a condition
    assert _site(body, "w") is None       # read in a loop
    assert _site(body, "both") is None    # both arms of a top-level if
    assert _site(body, "x") is False      # never read (x_in is another name)


def test_gla_chunks_read_g_as_given(compiled, bf16_dots):
    """GLA on the chunked kernels: no float32 copy of any bf16 input (the
    chunk-local cumsum kernel reads g in its dtype), and the forward and g's
    gradient (bf16, as g) within bf16's error of the dense interpreter's."""
    m = compiled_mixers(algorithm="chunks")("gla")
    args, tokens = _bf16_call("gla", T=37)
    args["g"].requires_grad_(True)
    record = _Casts({args[n].data_ptr(): n for n in tokens})
    with record:
        y = m(**args)
    assert record.seen == set()
    exact = {n: x.requires_grad_(n == "g") for n, x in
             to_device(make_inputs("gla", T=37), torch.float64).items()}
    want = compiled("gla", "dense")(**exact)
    assert rel_err(y, want) < 2e-2
    w = torch.randn_like(want)
    (g,) = torch.autograd.grad((y.float() * w.float()).sum(), [args["g"]])
    (g_want,) = torch.autograd.grad((want * w).sum(), [exact["g"]])
    assert g.dtype == torch.bfloat16 and rel_err(g, g_want) < 3e-2


# the mixers whose chunked kernel's y is the output as is (linear attention:
# its value columns, the division fused): the kernel stores it in the inputs'
# dtype, so nothing converts a float32 y after it
DIRECT = ["retnet", "ssd", "linear_attention"]


class _OutputCasts(TorchDispatchMode):
    """Records the shape of every float32 -> bf16 copy of at least `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(args[0]) and \
                args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16 and \
                args[0].numel() >= self.numel:
            self.seen.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def _spy_y_dtypes(m, monkeypatch, wide=None) -> list:
    """The dtype of y of every call of the chunked kernels' op, in order; with
    wide (a list), the op stores y in float32 while wide[0] is true (its
    out_dtype, the argument after num_stages, replaced)."""
    mod = m._impl.module
    op = next(n for n in vars(mod) if n.startswith("chunked_kernel") and n.endswith("_op"))
    real, seen = getattr(mod, op), []

    def spy(*args):
        if wide and wide[0]:
            assert args[12] in (torch.float32, torch.bfloat16), args[12]
            args = args[:12] + (torch.float32,) + args[13:]
        out = real(*args)
        seen.append(out[0].dtype)
        return out
    monkeypatch.setattr(mod, op, spy)
    return seen


@pytest.mark.parametrize("name", DIRECT)
def test_the_kernel_writes_the_output_in_the_inputs_dtype(name, compiled, monkeypatch,
                                                          bf16_dots):
    """bf16 inputs: the output kernel stores y in bf16 (accumulated in float32),
    no float32 output-sized tensor is converted to bf16 after it, and the
    output is within bf16's error of the dense interpreter's; float32 inputs
    keep a float32 y."""
    m = compiled(name)
    seen = _spy_y_dtypes(m, monkeypatch)
    want = compiled(name, "dense")(**to_device(make_inputs(name, T=40), torch.float64))
    args, _ = _bf16_call(name)
    record = _OutputCasts(want.numel())
    with record:
        y = m(**args)
    assert y.dtype == torch.bfloat16 and seen == [torch.bfloat16], seen
    assert record.seen == [], record.seen
    assert rel_err(y, want) < 2e-2
    seen.clear()
    y = m(**to_device(make_inputs(name, T=40), torch.float32))
    assert y.dtype == torch.float32 and seen == [torch.float32], seen
    assert rel_err(y, want) < 1e-4


@pytest.mark.parametrize("name", DIRECT)
def test_the_output_in_the_inputs_dtype_with_gradients(name, compiled, monkeypatch, bf16_dots):
    """With a gradient: the forward's kernel stores y in bf16 where the backward
    does not read it (the division's quotient, linear attention's, stays
    float32), the backward's runs in bf16 where their result is the gradient
    as is (SSD's dq and dk in float32: summed over groups after the runs;
    its dv run scales by delta and adds the skip term in its kernel, linear
    attention's dq and dk runs take its feature maps' chain rule). The forward and the token
    inputs' gradients within bf16's error of the dense interpreter's, and
    every gradient as with the kernel's float32 y (SSD's A_log and dt_bias
    sum bf16 products: farther from dense either way)."""
    m = compiled(name)
    wide = [False]
    seen = _spy_y_dtypes(m, monkeypatch, wide)
    args, tokens = _bf16_call(name, T=37)
    args = {n: x.requires_grad_(True) for n, x in args.items()}
    exact = {n: x.requires_grad_(True) for n, x in
             to_device(make_inputs(name, T=37), torch.float64).items()}
    want = compiled(name, "dense")(**exact)
    w = torch.randn_like(want)
    ref = torch.autograd.grad((want * w).sum(), list(exact.values()), allow_unused=True)
    grads = []
    for flag in (False, True):
        wide[0] = flag
        seen.clear()
        y = m(**args)
        assert y.dtype == torch.bfloat16 and rel_err(y, want) < 2e-2
        first = torch.float32 if name == "linear_attention" or flag else torch.bfloat16
        assert seen == [first], seen
        grads.append(torch.autograd.grad((y.float() * w.float()).sum(), list(args.values()),
                                         allow_unused=True))
        # the backward's dq, dk and dv runs: a gradient that needs nothing more
        # after the kernel is stored in bf16 (the spy makes every run float32
        # while `wide` is set)
        f32, bf16 = torch.float32, torch.bfloat16
        runs = {"retnet": [bf16] * 3, "ssd": [f32, f32, bf16], "linear_attention": [bf16] * 3}
        assert seen[1:] == ([f32] * 3 if flag else runs[name]), seen
    for n, g, g32, r in zip(args, *grads, ref):
        if r is None or float(r.abs().max()) == 0:
            continue
        assert g is not None and g.dtype == args[n].dtype, n
        # one bf16 ulp at most: where a run stores the gradient in bf16, Triton's
        # interpreter truncates, where torch (the float32 runs' cast) and a GPU round
        assert rel_err(g, g32) < 8e-3, n
        if n in tokens:
            assert rel_err(g, r) < 3e-2, n


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_the_quasiseparable_kernel_writes_the_output_in_the_inputs_dtype(grad, compiled,
                                                                         bf16_dots):
    """Hydra (both passes and the diagonal in one output launch, the mixer's
    output as is): with bf16 inputs the kernel stores y in bf16, with or
    without a gradient (the backward then reads a bf16 dy), and no float32
    output-sized tensor is converted after it; float32 inputs keep float32."""
    m = compiled("hydra")
    want = compiled("hydra", "dense")(**to_device(make_inputs("hydra", T=40), torch.float64))
    args, tokens = _bf16_call("hydra")
    if grad:
        args = {n: x.requires_grad_(n in tokens) for n, x in args.items()}
    record = _OutputCasts(want.numel())
    with record:
        y = m(**args)
    assert y.dtype == torch.bfloat16 and record.seen == [], record.seen
    assert rel_err(y, want) < 2e-2
    if grad:
        y.float().square().sum().backward()
        assert all(args[n].grad is not None and args[n].grad.dtype == torch.bfloat16
                   for n in tokens)
    y = m(**to_device(make_inputs("hydra", T=40), torch.float32))
    assert y.dtype == torch.float32 and rel_err(y, want) < 1e-4
