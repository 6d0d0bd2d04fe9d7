"""Gradient precision of SSD on our Triton kernels and on fla's
`chunk_simple_gla` (q = C, k = delta * B, g = -exp(A_log) * delta, plus D x,
as fla's tests map SSD), both against the dense float64 interpreter on the
same inputs, in float32, float16 and bfloat16. Not a test. The floor row is
dense float64 on the inputs rounded to bf16: what rounding them alone costs.

    python benchmarks/precision.py [--T 130]        # CUDA if present, else the interpreter

Without a GPU the kernels run in Triton's CPU interpreter (bf16 dots upcast,
runtime/triton/interpreter.py); fla's then need two test-only patches (a
single autotune config; interpreter scalars for its `range` loops:
../shared/research/triton_without_gpu.md section 4). fla's bf16 backward
gives NaN under the interpreter (its bf16 elementwise math there), so its
bf16 row is only meaningful on a GPU.
"""

import argparse
import importlib
import importlib.util
import os
import sys
import warnings

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
warnings.filterwarnings("ignore")
f64 = torch.float64


def interpreter_patches(fla_ok):
    """Our bf16 dots, and fla's two patches (see the module docstring)."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    from triton.runtime import interpreter as interp

    from mixerc.runtime.triton.interpreter import bf16_dots_patch
    setattr(*bf16_dots_patch())
    if not fla_ok:
        return
    autotuner.Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]

    class ScalarRange:  # fla calls .to() on its loop variables
        def __init__(self, *bounds):
            self.r = range(*(int(b.handle.data.item()) if hasattr(b, "handle") else int(b)
                             for b in bounds))

        def __iter__(self):
            for i in self.r:
                yield tl.core.tensor(interp.TensorHandle(np.array([i], dtype=np.int32),
                                                         tl.int32), tl.int32)
    for name in ("fla.ops.common.chunk_h", "fla.ops.common.chunk_o", "fla.ops.simple_gla.chunk",
                 "fla.ops.utils.cumsum"):
        importlib.import_module(name).range = ScalarRange


def inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=f64)  # noqa: E731
    H, G, P, N = 4, 2, 16, 16
    return dict(x=r(2, T, H, P), dt=r(2, T, H) - 1, B=r(2, T, G, N) / 2, C=r(2, T, G, N) / 2,
                A_log=r(H) * 0.5, dt_bias=r(H) * 0.5, D=r(H))


def fla_ssd(x, dt, B, C, A_log, dt_bias, D):
    from fla.ops.simple_gla import chunk_simple_gla
    H, G = x.shape[2], B.shape[2]
    delta = torch.nn.functional.softplus(dt.float() + dt_bias.float())
    g = -torch.exp(A_log.float()) * delta
    k = (B.repeat_interleave(H // G, 2).float() * delta[..., None]).to(x.dtype)
    y = chunk_simple_gla(C.repeat_interleave(H // G, 2), k, x, g=g, scale=1.0)[0]
    return y + D.to(y.dtype)[:, None] * x


def grads(f, args, dtype):
    dev = "cuda" if CUDA else "cpu"
    xs = {n: t.detach().to(dtype).to(dev).requires_grad_(True) for n, t in args.items()}
    y = f(**xs)
    dy = torch.randn(y.shape, dtype=f64, generator=torch.Generator().manual_seed(5))
    (y.double() * dy.to(y.device)).sum().backward()
    return {"y": y.detach().double().cpu(), **{n: t.grad.double().cpu() for n, t in xs.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=130)
    T = ap.parse_args().T
    import mixerc
    fla_ok = importlib.util.find_spec("fla") is not None
    if not CUDA:
        interpreter_patches(fla_ok)
    args = inputs(T)
    dense = mixerc.compile("ssd", backend="dense")
    want = grads(dense, args, f64)
    rows = [("floor (dense on bf16 inputs)", grads(dense, {n: t.to(torch.bfloat16).double()
                                                          for n, t in args.items()}, f64))]
    ours = mixerc.compile("ssd", backend="triton")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows.append((f"mixerc {str(dtype)[6:]}", grads(ours, args, dtype)))
        if fla_ok:
            try:
                rows.append((f"fla {str(dtype)[6:]}", grads(fla_ssd, args, dtype)))
            except Exception as e:  # noqa: BLE001
                print(f"fla {dtype}: {type(e).__name__}: {e}"[:200])
    names = list(want)
    where = torch.cuda.get_device_name() if CUDA else "CPU, Triton interpreter"
    print(f"SSD B=2 T={T} H=4 G=2 P=N=16, {where}; relative error against dense float64")
    print(f"{'':30s}" + "".join(f"{n:>9s}" for n in names))
    for label, g in rows:
        errs = [float((g[n] - want[n]).norm() / want[n].norm()) for n in names]
        print(f"{label:30s}" + "".join(f"{e:9.1e}" for e in errs))


if __name__ == "__main__":
    sys.exit(main())
