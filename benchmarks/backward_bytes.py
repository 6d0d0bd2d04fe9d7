"""Bytes a bf16 backward of a Triton-backend mixer moves per token and head,
by op, counted on the CPU (Triton's interpreter): for every op the backward
dispatches, the bytes of its tensor inputs and outputs (views and
allocations move nothing and are left out; a kernel's custom op counts its
arguments and results, not what its programs re-read). Not a test, and a
model, not a GPU measurement: it shows the torch passes around the
kernels (casts, flips, folds over groups), which on a GPU are memory-bound
launches.

    python benchmarks/backward_bytes.py [--mixers ssd,retnet,...] [--T 256]
"""

import argparse
import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEWS = {"view", "detach", "alias", "expand", "unsqueeze", "squeeze", "slice", "select", "t",
         "transpose", "permute", "_unsafe_view", "as_strided", "reshape", "unbind", "split",
         "promote_types",
         # allocations: nothing moves until an op writes them (counted there)
         "empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided"}
SIZES = {"H": 2, "G": 1, "K": 128, "V": 128, "N": 128, "P": 64, "D": 128, "E": 256}


class Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes, self.calls = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a kernel's custom op under its namespace (mixerc)
        name = func.overloadpacket.__name__ if func.namespace == "aten" else func.namespace
        if name not in VIEWS:
            outs = out if isinstance(out, (tuple, list)) else [out]
            tensors = [x for x in list(args) + list(outs) if torch.is_tensor(x)]
            tensors += [x for a in args if isinstance(a, (list, tuple)) for x in a
                        if torch.is_tensor(x)]
            self.bytes[name] += sum(x.numel() * x.element_size() for x in tensors)
            self.calls[name] += 1
        return out


def backward_bytes(name: str, T: int):
    import mixerc
    from mixerc.inputs import random_inputs
    from mixerc.runtime.triton.interpreter import bf16_dots_patch
    if os.environ.get("TRITON_INTERPRET"):
        setattr(*bf16_dots_patch())
    m = mixerc.compile(name, backend="triton")
    args = random_inputs(m.program, SIZES, 1, T, seed=0, dtype=torch.float64)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    xs = {n: t.to(torch.bfloat16 if t.dim() >= 3 else torch.float32).to(dev).requires_grad_()
          for n, t in args.items()}
    y = m(**xs)
    dy = torch.randn_like(y)
    with Bytes() as log:
        y.backward(dy)
    return log, T * SIZES["H"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixers", default="retnet,ssd,linear_attention,gla,mamba")
    ap.add_argument("--T", type=int, default=256)
    a = ap.parse_args()
    print(f"bf16 backward, B=1 T={a.T} sizes {SIZES}: bytes per token and head")
    for name in a.mixers.split(","):
        log, per = backward_bytes(name, a.T)
        total = sum(log.bytes.values())
        top = ", ".join(f"{k} {v / per:.0f}" for k, v in log.bytes.most_common(6))
        print(f"{name:18s} {total / per:8.0f}  ({top})")

if __name__ == "__main__":
    main()
