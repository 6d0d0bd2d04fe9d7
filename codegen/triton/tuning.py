"""The Triton backend as an autotune problem: the torch backend's problem
(mixerc/tuning.py) timing forward and backward together (the backward's
blocks are knobs too), checked against the torch backend in float64, and
screening each config by compiling its kernels for this GPU before any
benchmark (codegen/triton/fitness.py): a config that spills registers or
needs more shared memory than the GPU has is dropped, and says so."""

from __future__ import annotations

import functools

import torch

from mixerc.tuning import ModuleTuningProblem

from . import fitness


def target_of(device) -> str | None:
    """The fitness target for a CUDA device (None: not screened)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(dev)
    return {(9, 0): "sm_90a", (8, 9): "sm_89"}.get((major, minor),
                                                    "sm_80" if major == 8 else None)


class TritonTuningProblem(ModuleTuningProblem):
    def runner(self, config: dict):
        bound = self._bound(self._args)
        leaves = [x for x in list(bound.inputs.values()) + list(bound.params.values())
                  if x.is_floating_point()]

        def run():  # forward and backward: training runs both
            for x in leaves:
                x.requires_grad_(True)
            y = self.backend.forward(bound, config=config)[0]
            torch.autograd.grad([o.float().sum() for o in y], leaves, allow_unused=True)
            for x in leaves:
                x.requires_grad_(False)
            return [o.detach() for o in y]
        return run

    @functools.cached_property
    def _reference(self):
        """The torch backend in float64 on the same inputs."""
        from mixerc.codegen.torch.backend import TorchRunner
        args64 = {k: v.to(torch.float64) for k, v in self._args.items()}
        torch_runner = TorchRunner(self.backend.mixer)
        return torch_runner.forward(self._bound(args64), config=torch_runner.config)[0]

    def screen(self, config: dict) -> str | None:
        target = target_of(self.device)
        if target is None:
            return None
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        for fit in _fits(self.backend, tuple(sorted(self.sizes.items())), target, dtype,
                         tuple(sorted(config.items()))):
            if not fit.fits:
                return f"{fit.label} on {target}: {fit.why_not()}"
        return None


@functools.lru_cache(maxsize=4096)
def _fits(runner, sizes: tuple, target: str, dtype: str, config: tuple) -> list:
    return fitness.check(runner, dict(sizes), target, dict(config), mm_dtype=dtype)
