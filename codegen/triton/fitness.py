"""GPU fitness without a GPU: compile a mixer's Triton kernels for a target
architecture on any machine (Triton's compiler, the ptxas and cuobjdump its
wheel ships) and read what decides their speed: registers per thread,
spilled (local) bytes, shared memory against the target's per-block limit,
the matrix instructions the dots became (HGMMA on sm_90a, HMMA otherwise),
TMA loads; plus a roofline time for the mixer's FLOPs and bytes.

No driver, no libcuda: only `triton.compile(ASTSource, target=GPUTarget)`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# per target: (arch, shared memory per block in bytes, matrix instruction, the
# reference GPU of its roofline, dense bf16 FLOP/s with float32 accumulation,
# HBM bytes/s). Triton builds sm_90a for any arch-90 target.
TARGETS = {
    "sm_90a": (90, 227 * 1024, "HGMMA", "H100 SXM", 989e12, 3.35e12),
    "sm_90": (90, 227 * 1024, "HGMMA", "H100 SXM", 989e12, 3.35e12),
    "sm_89": (89, 99 * 1024, "HMMA", "L40S", 181e12, 0.864e12),
    "sm_80": (80, 163 * 1024, "HMMA", "A100 SXM", 312e12, 2.04e12),
}
MAX_REGISTERS = 255

# kernel parameters by role (the templates' naming convention): the dots'
# operands in the matmul dtype (QK, QG, KD: operands one kernel writes for
# another; SC: the chunked kernels' states entering each chunk, written in it
# for a forward's output kernel), block lists int32, every other pointer float32
MM_POINTERS = {"Q", "K", "V", "DO", "QK", "QG", "KD", "SC"}
INT_POINTERS = {"BIDX", "BKIND", "BCNT", "QIDX", "QKIND", "QCNT"}
FLOAT_SCALARS = {"lo", "hi"}


@dataclass
class KernelFit:
    function: str       # the generated host function (e.g. flash_exact)
    kernel: str         # the @triton.jit kernel
    config: dict
    run: str = ""       # which launch of it: "" the forward's, else a backward run's (dq, dk, dv)
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread (spills and stack)
    shared: int = 0
    shared_limit: int = 0
    mma: int = 0        # matrix instructions in the SASS (HGMMA or HMMA)
    hmma: int = 0       # warp-level HMMA (sm_90a's fallback for tiles under 64 rows)
    mma_kind: str = ""
    tma: int = 0
    error: str = ""
    files: dict = field(default_factory=dict)  # asm kind -> text (ptx, sass)

    @property
    def label(self) -> str:
        """The kernel, and the backward's run that launches it so where one does."""
        return f"{self.kernel} [{self.run}]" if self.run else self.kernel

    @property
    def fits(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared <= self.shared_limit

    def why_not(self) -> str:
        if self.error:
            return self.error
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.shared > self.shared_limit:
            out.append(f"shared {self.shared // 1024} KB > {self.shared_limit // 1024} KB")
        return ", ".join(out)


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def stores_y_in_mm_dtype(name: str) -> bool:
    """Whether kernel `name` is a decode step's, whose y (Y) a half-precision
    step stores in the inputs' dtype where y is the mixer's output as is
    (accumulated in float32: codegen/triton/terms/output.py):
    the chunked family's decode kernel, the scan's forward as a decode step
    launches it (`_fwd_decode`) and the recurrence kernel. The table compiles
    them so; a float32 Y (y combined after the kernel) converts nothing."""
    return name.endswith(("_decode_kernel", "_fwd_decode")) or name == "_mx_recurrent_step"


def signature(kernel, constexprs: dict, mm_dtype: str, dtypes: dict | None = None) -> dict:
    """The kernel's argument types: q, k, v and the like in the matmuls'
    dtype, other pointers float32, but pointers named in dtypes (e.g. the
    output Y: "bf16") in theirs."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in (dtypes or {}):
            sig[name] = "*" + dtypes[name]
        elif name in MM_POINTERS:
            sig[name] = "*" + mm_dtype
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name == "SEEN":  # a cache's tokens per sequence (int64, as torch keeps them)
            sig[name] = "*i64"
        elif name[:1].isupper() and name not in ("B", "T", "S", "H", "R", "MAXN", "MAXQ",
                                                 "LB", "LH", "C", "W", "PER_SPLIT"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# int arguments a launch at a typical shape passes as multiples of 16 (Triton
# specializes on that, as it does on 16-byte aligned pointers), and per kernel:
# the chunk-local cumsum's (runtime/triton/per_channel.py) K and strides (K a
# multiple of 16: its loads and stores vectorized, half the registers), and
# the same of a per-mixer cumsum that computes a map on load (`*_fwd_cumsum`)
DIVISIBLE_INTS = {"T", "S"}
KERNEL_DIVISIBLE_INTS = {"_mx_chunk_cumsum": {"n_k", "stride_b", "stride_t", "stride_h",
                                              "stride_cs"}}


def aligned(kernel, sig: dict) -> dict:
    """The attributes a launch at a typical shape gets: every pointer 16-byte
    aligned (torch allocations are), T and S multiples of 16. Without them
    the compiler can neither vectorize loads nor pipeline them."""
    ints = DIVISIBLE_INTS | KERNEL_DIVISIBLE_INTS.get(kernel.fn.__name__, set())
    if kernel.fn.__name__.endswith("_fwd_cumsum"):  # the cumsum computing a map on load
        ints = ints | {n for n in kernel.arg_names
                       if re.fullmatch(r"n_k|stride_cs|s[bth]\d+", n)}  # its leaves' strides
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or name in ints}


def compile_kernel(kernel, constexprs: dict, target: str, num_warps: int, num_stages: int,
                   mm_dtype: str = "bf16", options: dict | None = None,
                   dtypes: dict | None = None):
    """Triton's compiled kernel for `target` (no GPU needed); options: more
    of Triton's compile options, as the launch passes them (e.g. maxnreg);
    dtypes: pointers' dtypes other than the signature's defaults."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    arch = TARGETS[target][0]
    sig = signature(kernel, constexprs, mm_dtype, dtypes)
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                    attrs=aligned(kernel, sig))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **(options or {})})


def inspect(compiled, target: str, fit: KernelFit, keep_asm: bool = False) -> KernelFit:
    """Fill fit from a compiled kernel: cuobjdump -res-usage and -sass."""
    arch, limit, mma, *_ = TARGETS[target]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, timeout=120).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True, timeout=120).stdout
    values = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    fit.registers = int(values.get("REG", 0))
    fit.spill_bytes = int(values.get("LOCAL", 0)) + int(values.get("STACK", 0))
    fit.shared = int(values.get("SHARED", 0)) + int(compiled.metadata.shared)
    fit.shared_limit = limit
    fit.mma_kind = mma
    fit.mma = len(re.findall(rf"\b{mma}\b", sass))
    fit.hmma = len(re.findall(r"\bHMMA\b", sass))
    fit.tma = len(re.findall(r"\bUTMALDG\b", sass))
    if keep_asm:
        fit.files = {"ptx": compiled.asm["ptx"], "sass": sass}
    return fit


def kernels_of(module) -> list:
    """(host function, kernel name, JITFunction) of the kernels a generated
    module launches (its own @triton.jit functions, not the runtime's helpers)."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    if any(isinstance(obj, InterpretedFunction) for obj in vars(module).values()):
        from mixerc.errors import MixerUnsupportedError
        raise MixerUnsupportedError(
            "the kernels were defined under TRITON_INTERPRET=1 (Triton's CPU interpreter); "
            "compiling them for a GPU needs a process without it (`mixerc compile --target` "
            "starts clean)")
    out = []
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.jit.JITFunction) and \
                obj.fn.__module__ == module.__name__:
            function = re.sub(r"_(fwd|bwd|bwd_[a-z]+|decode_kernel|states|fwd_[a-z]+)$", "",
                              name)
            out.append((function, name, obj))
    return out


def check(runner, sizes: dict, target: str, configs: str = "default", mm_dtype: str = "bf16",
          keep_asm: bool = False, runs: bool = True) -> list:
    """KernelFit per kernel and config of a triton-backend runner.

    configs: "default" (the module's default config), "all" (every config
    of its space, the tuner's candidates) or one config of the module.
    runs: also the backward's launches of a kernel with other constexprs
    (KernelFit.run: the chunked family's dq, dk and dv runs)."""
    if target not in TARGETS:
        from mixerc.errors import MixerValueError
        raise MixerValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    mod = runner.module
    shapes = runner.kernel_shapes(sizes)  # host function -> (config key prefix, D, DV)
    out = []
    for function, name, kernel in kernels_of(mod):
        key, D, DV = shapes[function]
        # the kernel (or its family) says its own constexprs and knobs
        meta = getattr(mod, f"{name}_compile_meta", None) or \
            getattr(mod, f"{function}_compile_meta", None)
        if meta is None:
            out.append(KernelFit(function, name, {}, error=f"no {name}_compile_meta or "
                                 f"{function}_compile_meta in the module"))
            continue
        out.extend(_check_meta(kernel, function, name, meta, key, D, DV, mod, configs,
                               target, mm_dtype, keep_asm, runs))
    out += _runtime_kernels(mod, shapes, target, mm_dtype, keep_asm)
    return out


def _runtime_kernels(mod, shapes: dict, target: str, mm_dtype: str, keep_asm: bool) -> list:
    """The runtime's kernels the module launches (runtime/triton): the
    recurrence of a per-channel term's decode step (at its K and V, with a
    decay per channel), the chunk-local cumulative log-decays of its chunked
    kernels (at its K and default chunk, float32 log-decays as the module
    passes them) and the split combine of a softmax's decode step (at its
    V), and the log-decay gradient of a chunked scalar-decay term's backward
    (at its K and V and default chunk). The chunked scalar-decay family's
    decode kernel is rendered per mixer, with its own compile meta."""
    from mixerc.runtime.triton import cache, chunked, per_channel, recurrent
    out = []
    for host, kernel, kind in (("recurrent_step", recurrent._mx_recurrent_step,
                                ("per_channel",)),
                               ("chunk_cumsum", per_channel._mx_chunk_cumsum,
                                ("per_channel",)),
                               ("combine_splits", cache._mx_combine, ("flash",)),
                               ("chunked_kernels_apply", chunked._mx_decay_grad,
                                ("chunked_kernel_has_decay",))):
        dims = [(fn, *d) for fn, d in shapes.items() if fn.startswith(kind)]
        if host not in vars(mod) or not dims:
            continue
        fn, key, D, DV = dims[0]
        if host == "chunk_cumsum":
            # the chunk as chunk_cumsum launches it (float32's capped: per_channel_apply)
            chunk = per_channel.per_channel_chunk(mod.DEFAULT_CONFIG[f"{key}.tri_chunk"],
                                                  mm_dtype == "fp32")
            cfg = {"chunk": chunk,
                   "block_k": max(16, min(_pow2(D), per_channel.CUMSUM_BLOCK_K)),
                   "num_warps": 4, "num_stages": 1}
            # a contiguous a's channel stride: 1, which a launch specializes on
            constexprs = {"stride_k": 1, "BLOCK_T": cfg["chunk"], "BLOCK_K": cfg["block_k"]}
        elif host == "chunked_kernels_apply":  # the backward's decay gradient
            block = max(16, min(chunked.DECAY_GRAD_BLOCK, _pow2(max(D, DV))))
            cfg = {"chunk": mod.DEFAULT_CONFIG[f"{key}.chunk"], "block_k": block,
                   "block_v": block, "num_warps": chunked.DECAY_GRAD_WARPS, "num_stages": 1}
            constexprs = {"SCALED": "key_scale" in fn, "BT": cfg["chunk"], "BK": block,
                          "BV": block, "PRECISION": "ieee" if mm_dtype == "fp32" else "tf32"}
        elif kind[0] == "per_channel":
            bk = max(16, _pow2(D))
            bv = max(16, min(_pow2(DV), 4096 // bk))  # as recurrent_step launches it
            cfg = {"block_k": bk, "block_v": bv, "num_warps": 4 if bk * bv <= 4096 else 8,
                   "num_stages": 1}
            constexprs = {"DECAY": True, "PER_CHANNEL": True, "STRICT": False,
                          "BLOCK_K": cfg["block_k"], "BLOCK_V": cfg["block_v"]}
        else:
            cfg = {"block_k": 16, "block_v": max(16, _pow2(DV)), "num_warps": 4,
                   "num_stages": 1}
            constexprs = {"BLOCK_M": 16, "DV": cfg["block_v"]}
        out.append(_fit(kernel, host, kernel.fn.__name__, cfg, target, mm_dtype, keep_asm,
                        lambda: (constexprs, cfg["num_warps"], 1)))
    return out


def _check_meta(kernel, function, name, meta, key, D, DV, mod, which, target, mm_dtype,
                keep_asm, runs=True) -> list:
    """KernelFit per config of a kernel whose module has `<kernel>_compile_meta`
    or `<function>_compile_meta`: meta(D, DV, cfg, mm_dtype) -> (constexprs,
    num_warps, num_stages[, more compile options]), its knobs (config key
    suffixes) in `.knobs`, and optionally `.shown(cfg)`: the config as the
    table names it."""
    import itertools
    if isinstance(which, dict):
        cfgs = [{k: which[f"{key}.{k}"] for k in meta.knobs}]
    elif which == "default":
        cfgs = [{k: mod.DEFAULT_CONFIG[f"{key}.{k}"] for k in meta.knobs}]
    else:
        choices = [mod.CONFIG_SPACE[f"{key}.{k}"] for k in meta.knobs]
        cfgs = [dict(zip(meta.knobs, c)) for c in itertools.product(*choices)]
    shown = getattr(meta, "shown", dict)  # the config as the table shows it
    # the backward's runs of the kernel, where they launch it otherwise
    # (other constexprs, dims, dtypes): meta.adjoints(D, DV, cfg, mm_dtype)
    # -> label -> settings
    adjoints = getattr(meta, "adjoints", None) if runs else None
    out = []
    for cfg in cfgs:
        out.append(_fit(kernel, function, name, shown(cfg), target, mm_dtype, keep_asm,
                        lambda: meta(D, DV, cfg, mm_dtype)))
        for run, settings in (adjoints(D, DV, cfg, mm_dtype) if adjoints else {}).items():
            out.append(_fit(kernel, function, name, shown(cfg), target, mm_dtype, keep_asm,
                            lambda: settings, run=run))
    return out


def _fit(kernel, function: str, name: str, cfg: dict, target: str, mm_dtype: str,
         keep_asm: bool, settings, run: str = "") -> KernelFit:
    """The KernelFit of one kernel at one config: settings() -> (constexprs,
    num_warps, num_stages) and optionally a dict of more compile options the
    launch passes (maxnreg) and one of pointers' dtypes (signature); a config
    the compiler rejects (e.g. out of resources) is a fit with an error,
    reported in the table. run: which launch (a backward run's label)."""
    fit = KernelFit(function, name, cfg, run)
    try:
        constexprs, warps, stages, *more = settings()
        constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
        options, dtypes = (list(more) + [None, None])[:2]
        if dtypes is None and stores_y_in_mm_dtype(name):
            dtypes = {"Y": mm_dtype}
        inspect(compile_kernel(kernel, constexprs, target, warps, stages, mm_dtype,
                               options or None, dtypes), target, fit, keep_asm)
    except Exception as e:  # noqa: BLE001
        fit.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return fit


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def roofline(runner, sizes: dict, batch: int, time: int, target: str,
             bytes_per_element: int = 2) -> list:
    """(matrix, forward seconds, forward + backward seconds) at the target's
    peak rates: max(FLOPs / peak, bytes / bandwidth), the backward counted as
    2.5x the forward's FLOPs (FlashAttention's ratio: five matmuls to two)."""
    from mixerc import cost
    *_, peak, bandwidth = TARGETS[target]
    out = []
    p = runner.plan
    for mp in p.matrices:
        c = cost.matrix_cost(mp, p.program.groups)
        chunks = [v for k, v in runner.config.items()
                  if k.startswith(mp.key + ".") and k.endswith(".chunk")]
        at = dict(sizes, T=time, chunk=chunks[0] if chunks else 64)  # the default chunk
        flops = cost.evaluate(c.prefill_flops, at) * batch
        nbytes = cost.evaluate(c.prefill_bytes, at) * batch * bytes_per_element / cost.WORD
        fwd = max(flops / peak, nbytes / bandwidth)
        out.append((mp.name, flops, nbytes, fwd, fwd + max(2.5 * flops / peak,
                                                            2 * nbytes / bandwidth)))
    return out


def _config_text(config: dict) -> str:
    """A config as blocks by their last letter or word (block_q -> q=, chunk -> c=,
    tri_sub -> sub=), then warps and stages as numbers."""
    out = []
    for k, v in config.items():
        last = k.split("_")[-1]
        out.append(str(v) if k in ("num_warps", "num_stages") else
                   f"{'c' if last == 'chunk' else last}={v}")
    return ", ".join(out)


def table(fits: list, target: str) -> str:
    """The fitness table, one line per kernel and config."""
    w = max([32] + [len(f.label) for f in fits])
    # sm_90a's warp-level HMMA (tiles under 64 rows) next to its HGMMA
    hm = (lambda x: f" {x:>5}") if TARGETS[target][2] != "HMMA" else (lambda x: "")
    cfgs = [_config_text(f.config) for f in fits]
    cw = max([31] + [len(c) for c in cfgs])
    head = (f"{'kernel':<{w}} {'config (blocks, warps, stages)':<{cw}} {'regs':>4} {'spill':>6} "
            f"{'shared':>13} {TARGETS[target][2]:>6}{hm('HMMA')} {'TMA':>4}  verdict")
    lines = [head, "-" * len(head)]
    for f, cfg in zip(fits, cfgs):
        if f.error:
            lines.append(f"{f.label:<{w}} {cfg:<{cw}} {'-':>4} {'-':>6} {'-':>13} {'-':>6}"
                         f"{hm('-')} {'-':>4}  does not compile: {f.error}")
            continue
        shared = f"{f.shared // 1024}/{f.shared_limit // 1024} KB"
        verdict = "ok" if f.fits else "dropped: " + f.why_not()
        lines.append(f"{f.label:<{w}} {cfg:<{cw}} {f.registers:>4} {f.spill_bytes:>5}B "
                     f"{shared:>13} {f.mma:>6}{hm(f.hmma)} {f.tma:>4}  {verdict}")
    return "\n".join(lines)
