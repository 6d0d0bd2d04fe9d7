"""Runs generated torch modules: dtype policy, state wrapping, decode steps."""

from __future__ import annotations

import functools

import torch

from . import jit
from .runtime import call

def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and compiler.is_compiling())


class TorchBackend:
    name = "torch"

    def __init__(self, mixer):
        """mixer: the CompiledMixer. The module is rendered from its plan every
        time; the JIT cache only checks it against its file (mixerc/jit.py)."""
        self.mixer = mixer
        self.module = jit.load(self.generate()[0])
        self.key = self.module.__name__.rsplit("_", 1)[-1]
        self.config = dict(self.module.DEFAULT_CONFIG)
        self._configs: dict = {}   # shape bucket -> config (autotune cache or defaults)

    @property
    def program(self):
        return self.mixer.program

    @functools.cached_property
    def plan(self):
        from . import planner  # only for code generation: a JIT cache hit never plans
        return planner.plan(self.program, self.mixer.analysis)

    def generate(self, standalone: bool = False):
        from .codegen.torch_module import generate
        return generate(self.plan, standalone=standalone)

    def source(self) -> str:
        return self.module.__mixerc_source__  # the text that runs

    def forward(self, bound, initial_state=None, return_state=False, config=None):
        cfg = self.config_for(bound) if config is None else config
        return call.run(self.module, bound, initial_state, return_state, cfg)

    def tuning_problem(self, sizes, batch, time, dtype=torch.float32, device="cpu",
                       kernel_len=None):
        from .tuning import TorchTuningProblem
        return TorchTuningProblem(self, sizes, batch, time, dtype, device, kernel_len)

    def config_for(self, bound) -> dict:
        """The config for this shape bucket: the autotune cache's (looked up once
        per bucket and process), else the defaults. Decode steps and calls under
        torch.compile use what is known without touching the cache."""
        from .autotune import bucket_T
        time = next(iter(bound.inputs.values())).shape[1]
        if not self.module.CONFIG_SPACE or time == 1 or _compiling() or \
                bound.device.type == "meta":  # shapes only: nothing to tune
            return self.config
        kernel_len = next((int(k.shape[0]) for k in bound.kernels.values()), None)
        bucket = (tuple(sorted(bound.sizes.items())), bound.batch, bucket_T(time),
                  str(bound.dtype), str(bound.device), kernel_len)
        if bucket not in self._configs:
            from .autotune import config_for
            problem = self.tuning_problem(bound.sizes, bound.batch, time, bound.dtype,
                                          bound.device, kernel_len)
            self._configs[bucket] = config_for(problem)
        return self._configs[bucket]

    def step(self, bound, state):
        bound.inputs = {n: x.unsqueeze(1) for n, x in bound.inputs.items()}
        outs, new = self.forward(bound, state, return_state=True)
        return [o[:, 0] for o in outs], new
