"""The torch backend: renders the kernel plan into a Python module of torch
code (codegen/torch/module.py), loads it through the module cache
(mixerc/jit.py) and runs it with the call layer (runtime/call.py): dtype
policy, states, the autotuned config per shape bucket."""

from __future__ import annotations

import warnings

import torch

from mixerc import jit, plan as planner
from mixerc.errors import MixerPerformanceWarning
from mixerc.runtime import call


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and compiler.is_compiling())


class TorchRunner:
    name = "torch"
    _pinned = False  # pin_config(): the same config for every shape
    check_finite = "params"  # the (small) params and kernels; inputs are left alone

    def __init__(self, mixer):
        self.mixer = mixer
        self.plan = planner.plan(mixer.program, mixer.analysis)
        for _, message in self.plan.warnings:
            warnings.warn(message, MixerPerformanceWarning, stacklevel=5)
        source, _, _ = self.generate()
        self.module = jit.load(source)
        self.key = jit.module_key(source)  # names the module: the autotune key uses it
        self.signature = self.module.SIGNATURE
        self.init_params = self.module.init_params
        self.config = dict(self.module.DEFAULT_CONFIG)
        self._configs: dict = {}   # shape bucket -> config (autotune cache or defaults)

    @property
    def program(self):
        return self.mixer.program

    def generate(self, standalone: bool = False):
        from mixerc.codegen.torch.module import generate
        return generate(self.plan, standalone=standalone)

    def source(self) -> str:
        return self.module.__mixerc_source__  # the text that runs

    def explain(self) -> str:
        return planner.describe(self.plan, "torch", DTYPES)

    def forward(self, bound, initial_state=None, return_state=False, config=None):
        cfg = self.config_for(bound) if config is None else config
        return call.run(self.module, bound, initial_state, return_state, cfg)

    def tuning_problem(self, sizes, batch, time, dtype=torch.float32, device="cpu",
                       kernel_len=None):
        from mixerc.tuning import ModuleTuningProblem
        return ModuleTuningProblem(self, sizes, batch, time, dtype, device, kernel_len)

    def pin_config(self, **knobs) -> dict:
        """Run every shape with the defaults changed by `knobs` (by knob name,
        e.g. block_q=16, for every term that has it), without the autotune
        cache: how tests reach many-block paths on short inputs."""
        for key in self.config:
            self.config[key] = knobs.get(key.rsplit(".", 1)[1], self.config[key])
        self._pinned = True
        return self.config

    def config_for(self, bound) -> dict:
        """The config for this shape bucket: the autotune cache's (looked up once
        per bucket and process), else the defaults. Decode steps and calls under
        torch.compile use what is known without touching the cache."""
        from mixerc.autotune import bucket_T
        if self._pinned:
            return self.config
        time = next(iter(bound.inputs.values())).shape[1]
        if not self.module.CONFIG_SPACE or time == 1 or _compiling() or \
                bound.device.type == "meta":  # shapes only: nothing to tune
            return self.config
        kernel_len = next((int(k.shape[0]) for k in bound.kernels.values()), None)
        bucket = (tuple(sorted(bound.sizes.items())), bound.batch, bucket_T(time),
                  str(bound.dtype), str(bound.device), kernel_len)
        if bucket not in self._configs:
            from mixerc.autotune import config_for
            problem = self.tuning_problem(bound.sizes, bound.batch, time, bound.dtype,
                                          bound.device, kernel_len)
            self._configs[bucket] = config_for(problem)
        return self._configs[bucket]

    def step(self, bound, state):
        bound.inputs = {n: x.unsqueeze(1) for n, x in bound.inputs.items()}
        outs, new = self.forward(bound, state, return_state=True)
        return [o[:, 0] for o in outs], new


# which dtype each stage computes in (explain), for float16/bfloat16 inputs;
# float32 and float64 inputs compute in their own dtype throughout
DTYPES = {
    "flash": "half inputs: through SDPA on a GPU, q, k, v in the inputs' dtype (tensor cores, "
             "float32 accumulation); scores, softmax statistics and the block loop in float32",
    "*": "half inputs: float32 (prologue, matmuls, cumulative log-decays, states); the "
         "Triton backend keeps matmuls in the inputs' dtype",
}


class _Torch:
    name = "torch"

    def compile(self, mixer) -> TorchRunner:
        return TorchRunner(mixer)


BACKEND = _Torch()
