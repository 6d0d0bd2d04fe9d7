"""torch.compile over every Triton kernel family: a mixer's module compiled
with fullgraph=True (a graph break fails) runs each family's launches as
torch custom ops (opaque to dynamo, shapes from their fake
implementations), and its forward and gradients equal the uncompiled
module's and the dense interpreter's. Without a gradient a short input
takes the in-place decode kernels eagerly; a traced call must take the
custom ops instead (a decode kernel's in-place state update cannot be
traced), and gives the same numbers.

Backends on this CPU machine (kernels in Triton's interpreter): inductor
works (it compiles the graph around the ops to C++ with g++), but a cold
inductor compile costs 30-50 s per mixer on 2 cores, so one family (the
per-channel kernels, whose forward and backward ops are the newest) runs
under inductor and the others under aot_eager (the same dynamo graph and
AOT autograd, no code generation)."""

import pytest
import torch
from conftest import rel_err

import mixerc
from mixerc.inputs import random_inputs

pytestmark = pytest.mark.usefixtures("fresh_cache")

# mixer: (dims, pinned knobs (several chunks at T = 40), the custom ops a
# gradient call runs, those a short call without gradients runs (None: the
# torch backend's decode code, traceable as it is), backend)
FAMILIES = {
    "attention": (dict(H=2, G=1, D=16), dict(block_q=16, block_k=16), "flash_", "flash_",
                  "aot_eager"),
    "retnet": (dict(H=2, K=16, V=16), dict(chunk=16), "chunked_", "chunked_", "aot_eager"),
    "gla": (dict(H=2, K=16, V=16), dict(tri_chunk=32), "per_channel_", "per_channel_",
            "inductor"),
    # the scan's forward and reverse-scan backward ops
    "mamba": (dict(E=2, N=4), dict(tri_chunk=32, algorithm="scan"), "scan_", "scan_",
              "aot_eager"),
    "based": (dict(H=2, K=4, V=16), dict(block_m=16, block_n=16), "poly_", None, "aot_eager"),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every compiled module's forward is the same code object (runtime/call.py):
    without a reset, dynamo's recompile limit (8) counts every test's graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording(backend: str, ops: list):
    """A torch.compile backend: `backend`, after noting the mixerc custom ops
    in each graph dynamo hands it."""
    from torch._dynamo.backends.registry import lookup_backend
    inner = lookup_backend(backend)

    def compile_graph(gm, example_inputs):
        # subgraphs too: an autograd.Function (the chunked kernels' adjoint
        # backward) is traced into a higher-order op with its own graphs
        ops.append([str(n.target) for g in gm.modules() if isinstance(g, torch.fx.GraphModule)
                    for n in g.graph.nodes
                    if n.op == "call_function" and str(n.target).startswith("mixerc.")])
        return inner(gm, example_inputs)
    return compile_graph


def run(fn, args, weights, grad: bool):
    """(y, {input name: gradient of sum(y * weights)})."""
    leaves = {n: x.clone().requires_grad_(grad) for n, x in args.items()}
    with torch.set_grad_enabled(grad):
        y = fn(**leaves)
    if not grad:
        return y, {}
    (y * weights.to(y.dtype)).sum().backward()
    return y.detach(), {n: x.grad for n, x in leaves.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_compiled_module_equals_eager_and_dense(name):
    dims, pinned, grad_ops, short_ops, backend = FAMILIES[name]
    m = mixerc.compile(name, backend="triton")
    m._impl.pin_config(**pinned)
    layer = m.module(**dims, seed=1)
    args = {n: x for n, x in random_inputs(m.program, dims, 1, 40, seed=2).items()
            if n in m.program.inputs}
    weights = torch.randn(m(**args, **dict(layer.named_parameters())).shape,
                          generator=torch.Generator().manual_seed(3))
    ops = []
    fast = torch.compile(layer, backend=recording(backend, ops), fullgraph=True)

    want, want_grads = run(layer, args, weights, grad=True)
    got, got_grads = run(fast, args, weights, grad=True)
    assert len(ops) == 1 and ops[0] and all(op.startswith("mixerc." + grad_ops)
                                            for op in ops[0]), ops
    assert rel_err(got, want) < 1e-6
    for n in args:
        assert rel_err(got_grads[n], want_grads[n]) < 1e-5, n

    # the dense interpreter (float64) on the module's params
    dense = mixerc.compile(name, backend="dense")
    params = {n: p.detach().double() for n, p in layer.named_parameters()}
    ref, ref_grads = run(lambda **x: dense(**x, **params),
                         {n: x.double() for n, x in args.items()}, weights.double(), grad=True)
    assert rel_err(got, ref) < 1e-4
    for n in args:
        assert rel_err(got_grads[n], ref_grads[n]) < 1e-4, n

    # a short call without gradients: eagerly the in-place decode kernels, traced the ops
    short = {n: x[:, :8] for n, x in args.items()}
    want, _ = run(layer, short, None, grad=False)
    got, _ = run(fast, short, None, grad=False)
    assert len(ops) == 2, ops
    if short_ops is None:
        assert ops[1] == [], ops
    else:
        assert ops[1] and all(op.startswith("mixerc." + short_ops) for op in ops[1]), ops
    assert rel_err(got, want) < 1e-5


def test_per_channel_and_scan_ops_pass_opcheck():
    """The fake implementations give the real launches' shapes, dtypes and
    strides; the per-channel op's autograd registration is what the
    backward op computes (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, T, H, K, V = 1, 20, 1, 16, 16
    # the hosts' ops: the chunked kernels' (gla's scan beside them is not called here)
    fwd = mixerc.compile("gla", backend="triton")._impl.module.per_channel_op
    bwd = getattr(torch.ops.mixerc, fwd._name.replace("_fwd", "_bwd"))  # its name sans "mixerc::"
    config = (16, 16, 16, 4, 1, 16)  # chunk, sub, block_v, warps, stages, bwd_block_k
    for state in (None, r(B, H, K, V).requires_grad_()):
        q, k, v = (r(B, T, H, d).requires_grad_() for d in (K, K, V))
        a = (-torch.rand(B, T, H, K, generator=g) * 0.2).requires_grad_()
        # the autograd registration once, with a state (the module test above
        # runs the op's autograd under AOT)
        torch.library.opcheck(fwd, (q, k, v, a, state) + config, test_utils=(
            "test_schema", "test_faketensor") + (() if state is None else (
                "test_autograd_registration",)))
        dy, d_final = r(B, T, H, V), r(B, H, K, V)
        torch.library.opcheck(bwd, (q, k, v, a, state, dy, d_final) + config,
                              test_utils=("test_schema", "test_faketensor"))
    # mamba's scan multiplies its log-decay's factors (dt [B, T, H], a [H, K]) on load,
    # or computes dt from its leaves (dt [B, T, H], dt_bias [H]) and adds a skip term
    mod = mixerc.compile("mamba", backend="triton")._impl.module
    scan, _ = mod.per_channel_scan_factored_maps_skip_pair
    q, k, v = r(B, T, 1, K), r(B, T, 1, K), r(B, T, H, 3)
    dt, a = torch.rand(B, T, H, generator=g), -torch.rand(H, K, generator=g)
    leaves, d = [r(B, T, H), r(H)], r(H)
    for state, seg in ((None, 0), (r(B, H, K, 3), 8)):  # seg: checkpoints for a backward
        for extra in (([], False, None), (leaves, True, d)):
            torch.library.opcheck(scan, (q, k, v, None if extra[1] else dt, a, state, 16, 4,
                                         seg, *extra),
                                  test_utils=("test_schema", "test_faketensor"))
