"""The fitness table compiles the chunked kernels' backward runs (dq, dk, dv:
the same kernels on the adjoint problems, with other constexprs, head dims
and dtypes) as ChunkedFn.backward launches them: every launch a bf16
backward of the standard mixers makes, recorded under the interpreter,
equals one run of the module's `<function>_adjoint_meta` in each constexpr
the kernel takes and in the dtypes of the states it writes (SC) and of its
output (Y) (and of the raw input X whose feature map's derivative a run
multiplies in: linear attention's dq and dk runs). The compiles themselves
(0 spills) are test_triton_fitness.py's."""

import pytest
import torch
from conftest import DEVICE, compiled_mixers
from reference import make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("fresh_cache")
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SIZES = {"H": 4, "G": 2, "D": 8, "K": 6, "V": 5, "P": 3, "N": 4, "E": 6}  # make_inputs'


@pytest.fixture(scope="module")
def compiled():
    return compiled_mixers()


def record_launches(monkeypatch, names: set, launches: list):
    """Every launch of a kernel named in `names` (the interpreter's or a GPU's
    JIT functions, patched at their class: a custom op may hold an earlier
    module's launch function) appends (name, its scalar arguments, the
    dtypes of SC, Y and X)."""
    import triton
    classes = [triton.runtime.jit.JITFunction]
    interp = getattr(triton.runtime, "interpreter", None)
    if interp is not None and hasattr(interp, "InterpretedFunction"):
        classes.append(interp.InterpretedFunction)
    for cls in classes:
        def run(fn, *args, _real=cls.run, **kwargs):
            name = getattr(fn, "__name__", None) or fn.fn.__name__
            if name in names:
                given = dict(zip(fn.arg_names, args), **kwargs)
                scalars = {n: x for n, x in given.items() if not torch.is_tensor(x)}
                dtypes = {n: DTYPES[given[n].dtype] for n in ("SC", "Y", "X") if n in given}
                launches.append((name, scalars, dtypes))
            return _real(fn, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)


@pytest.mark.parametrize("name", ["retnet", "ssd", "linear_attention"])
def test_the_adjoint_meta_is_what_the_backward_launches(name, compiled, bf16_dots,
                                                        monkeypatch):
    m = compiled(name)
    mod = m._impl.module
    launches = []
    kernels = {n: k for n, k in vars(mod).items()
               if n.startswith("chunked_kernel") and n.endswith(("_states", "_fwd"))}
    assert len(kernels) == 2, kernels
    record_launches(monkeypatch, set(kernels), launches)
    xs = {n: t.to(torch.bfloat16 if t.dim() >= 3 else torch.float32).to(DEVICE)
          .requires_grad_() for n, t in make_inputs(name, B=2, T=37).items()}
    y = m(**xs)
    forward = len(launches)
    assert forward == 2  # the forward's states and output kernels
    y.backward(torch.randn_like(y))
    backward = launches[forward:]
    # the runs the backward needs: dq, dk and dv, each a states and an output launch
    assert len(backward) == 6, [(n, c.get("REVERSE"), c.get("DK")) for n, c, _ in backward]
    function = next(iter(kernels)).rsplit("_", 1)[0]
    key, D, DV = m._impl.kernel_shapes(SIZES)[function]
    cfg = {k: m._impl.config[f"{key}.{k}"] for k in getattr(mod, f"{function}_compile_meta").knobs}
    runs = getattr(mod, f"{function}_adjoint_meta")(D, DV, cfg, "bf16")
    assert set(runs) == {"dq", "dk", "dv"}
    matched = set()
    for kernel_name, scalars, dtypes in backward:
        arg_names = kernels[kernel_name].arg_names
        found = []
        for label, (constexprs, warps, stages, _, want_dtypes) in runs.items():
            # (the table compiles the states kernel with an initial state, the
            # heavier; these runs have one where the forward had one)
            want = {n: v for n, v in constexprs.items() if n in arg_names and n != "HAS_S0"}
            got = {n: scalars[n] for n in want}
            if got == want and scalars["num_warps"] == warps and \
                    scalars["num_stages"] == stages:
                # the states kernel writes SC, the output kernel reads it and writes Y
                for n in ("SC", "Y"):
                    if n in arg_names:
                        assert dtypes[n] == want_dtypes[n], (label, kernel_name, n, dtypes)
                # and the raw input whose feature map's derivative the run takes
                # (linear attention's dq and dk runs: DMAP) or whose key scale's
                # chain rule it takes (ssd's dk run: DSCALE), or the values whose
                # skip's gradient it sums (ssd's dv run: SKIP 2)
                if "X" in arg_names and (constexprs.get("DMAP") or constexprs.get("DSCALE") == 2
                                         or constexprs.get("SKIP") == 2):
                    assert dtypes["X"] == want_dtypes["X"], (label, kernel_name, dtypes)
                found.append(label)
        assert len(found) == 1, (kernel_name, scalars, found)
        matched.add((kernel_name, found[0]))
    assert matched == {(k, r) for k in kernels for r in runs}
