"""The torch backend as an autotune problem (see autotune/problem.py):
one generated module at one shape on one device, its knobs from the module's
CONFIG_SPACE and constraints from its `config_allowed`."""

from __future__ import annotations

import functools

import torch

from .autotune.space import Choice, ConfigSpace
from .errors import MixerValueError
from .inputs import random_inputs
from .runtime.bind import bind

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 3e-2,
             torch.bfloat16: 5e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def space_of(module) -> ConfigSpace:
    params = {k: Choice(v, default=module.DEFAULT_CONFIG[k]) for k, v in
              module.CONFIG_SPACE.items()}
    return ConfigSpace(params, constraints=[lambda cfg, shape: module.config_allowed(cfg,
                                                                                   shape["T"])])


def usable_device(device) -> str:
    """The device as a string, or a MixerValueError when this torch cannot put a
    tensor there (cuda:0 on a CPU build, a missing GPU index, a typo)."""
    try:
        dev = torch.device(device)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        cuda = "this torch has CUDA" if torch.cuda.is_available() else \
            "this torch build sees no CUDA device"
        raise MixerValueError(f"device {str(device)!r} is not usable: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                              hint=f"{cuda}; use cpu or cuda:N") from None
    if dev.type == "meta":
        raise MixerValueError("device 'meta' holds no data: nothing can be timed there",
                              hint="use cpu or cuda:N")
    return str(dev)


class ModuleTuningProblem:
    """Inputs are built lazily: a problem used only for a cache lookup is cheap."""

    def __init__(self, backend, sizes: dict, batch: int, time: int, dtype=torch.float32,
                 device="cpu", kernel_len: int | None = None):
        self.backend = backend
        module = backend.module
        self.name = backend.program.name
        # the kernel's identity is the text of the module that runs: any change to
        # the plan, the templates or the runtime it renders is a new key
        self.key = {"module": backend.key, "backend": backend.name}
        self.sizes = {k: int(v) for k, v in sizes.items()}
        self.shape = dict(self.sizes, B=int(batch), T=int(time), dtype=dtype_name(dtype))
        if backend.program.kernels:
            self.shape["L"] = int(kernel_len or time)
        self.dtype = dtype
        self.device = usable_device(device)
        self.space = space_of(module)

    @functools.cached_property
    def _args(self) -> dict:
        return random_inputs(self.backend.program, self.sizes, self.shape["B"], self.shape["T"],
                             seed=0, dtype=self.dtype, device=self.device,
                             kernel_len=self.shape.get("L", 16))

    def _bound(self, args):
        return bind(self.backend.signature, args)

    def runner(self, config: dict):
        bound = self._bound(self._args)

        def run():
            return self.backend.forward(bound, config=config)[0]
        return run

    @functools.cached_property
    def _reference(self):
        """The default config in float64 on the same inputs."""
        args64 = {k: v.to(torch.float64) for k, v in self._args.items()}
        cfg = self.space.default(self.shape)
        return self.backend.forward(self._bound(args64), config=cfg)[0]

    def check(self, output) -> str | None:
        ref = self._reference
        outs = output if isinstance(output, (list, tuple)) else [output]
        for got, want in zip(outs, ref):
            if not torch.isfinite(got).all():
                return "output has NaN/Inf"
            err = float((got.double() - want).norm() / want.norm().clamp_min(1e-30))
            if err > TOLERANCE.get(self.dtype, 1e-3):
                return f"relative error {err:.2e} vs the float64 reference"
        return None
