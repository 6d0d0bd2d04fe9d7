"""Polynomial kernels of degree <= 2 without decay (Based: f(q_t . k_s) for
s <= t, strict or not; strategy `chunked` with flags["features"]) on the
Triton backend: the quadratic form by Triton kernels
(templates/triton_poly.py.jinja: f in registers, the feature map never
written, the normalizer's row sums fused, and with MatrixPlan.divide
(Based's (M @ v) / (M @ 1)) the division in the forward's epilogue;
backward dQ and dK/dV) wherever the cost model's Min picks it, the torch
backend's chunked feature map otherwise (codegen/torch/terms/chunked.py).
The knob `form` overrides the model: "cost" (default), "quadratic" or
"features". Decode steps and the state around a call are the torch code's
feature-map state, so a prefill by either form continues into the same
decode steps; the quadratic form computes the final state only when the
forward's want_state says the caller keeps it (its feature maps of the
keys cost O(T K^2 V) and, with autograd, their memory).

Higher degrees and decays stay on the torch backend (terms/chunked.py's
dispatch does not route them here)."""

import hashlib

from mixerc import ir
from mixerc.codegen.torch.terms import chunked as torch_chunked
from mixerc.plan import value_dims

# defaults from the static fitness table (`mixerc compile examples/based.mx
# --target sm_90a|sm_80 --dims H=16,K=16,V=64`, and K = 16, 64 with V = 64,
# 128; bf16): no spills on both, HGMMA on sm_90a. Value columns in blocks of
# 64 (each block's program recomputes the scores, cheap at Based's K = 16);
# the backward's dK/dV kernel takes 64 keys (its dots' M) per 32 queries.
DEFAULTS = {"form": "cost", "block_m": 64, "block_n": 64, "block_v": 64, "num_warps": 8,
            "num_stages": 2, "bwd_block_m": 64, "bwd_block_n": 32, "bwd_block_v": 64,
            "bwd_warps": 8, "bwd_stages": 2}
CHOICES = {"form": ["cost", "quadratic", "features"], "block_m": [64, 128],
           "block_n": [32, 64], "block_v": [64, 128], "num_warps": [4, 8], "num_stages": [2, 3],
           "bwd_block_m": [64, 128], "bwd_block_n": [16, 32], "bwd_block_v": [32, 64],
           "bwd_warps": [4, 8], "bwd_stages": [1, 2]}  # with the feature map's chunk: 15360
KERNEL_KNOBS = [p for p in DEFAULTS if p != "form"]


def handles(tp) -> bool:
    """A causal polynomial of degree <= 2 in one q . k (no decay)."""
    f = tp.flags
    return (tp.strategy == "chunked" and f["features"] is not None
            and f["features"].degree <= 2 and not f["has_decay"]
            and f["hi"] == float("inf") and f["lo"] in (0, 1))


def _is_one(node) -> bool:
    return isinstance(node, ir.Const) and node.value == 1


def normalizer(mp):
    """("first" | "last" | None, the applies whose values the kernel reads):
    a matrix applied to the constant 1 first or last (Based's M @ 1) has
    that column summed in registers instead of read as a column of ones."""
    ones = [i for i, a in enumerate(mp.applies) if _is_one(a.u)]
    if len(ones) != 1 or len(mp.applies) < 2 or ones[0] not in (0, len(mp.applies) - 1):
        return None, list(mp.applies)
    rest = [a for i, a in enumerate(mp.applies) if i != ones[0]]
    return ("first" if ones[0] == 0 else "last"), rest


def emit(tp, mp, w, key, values):
    from mixerc import cost
    from mixerc.runtime.torch.tokens import MAX_POLY_FEATURES

    f = tp.flags
    dim, poly, g = f["dim"], f["features"], w.program.groups
    q = w.canon_mm(tp.operands["q"].node, mp.heads, (dim,), hint="q")
    k = w.canon_mm(tp.operands["k"].node, mp.heads, (dim,), hint="k")
    c = w.coefficients(poly)
    if isinstance(values, str):  # built by the writer (gates or wrappers applied)
        norm, applies = None, list(mp.applies)
        v = w.assign(f"{values}.to(MM_DTYPE)", hint="values_mm")
    else:  # the inputs as given, the normalizer's ones left to the kernel
        norm, applies = normalizer(mp)
        parts = []
        for a in applies:
            vd = value_dims(a, mp.heads, g)
            x = w.canon_mm(a.u, mp.heads, vd, hint="x")
            parts.append(x if vd else f"{x}[..., None]")
        v = w.assign(parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)",
                     hint="values_mm")
    full = f"{v}.to(DTYPE)" if norm is None else f"with_ones({v}, {norm!r}).to(DTYPE)"
    strict = f["strict"]
    quad = w.function("poly_quadratic.py.jinja", base="poly_quadratic", strict=strict)
    hist = w.function("poly_history.py.jinja", base="poly_history", strict=strict)
    chunks = w.function("chunked.py.jinja", base="chunked", per_channel=False, strict=strict,
                        has_decay=False, title=mp.info.cls + " (feature map)")
    # (M @ v) / (M @ 1) divided by M's code, y = [n / m, m]: in the kernel's
    # epilogue, by torch ops on the other forms (the writer's split_outputs reads n / m)
    divide = w.fuses_divide(mp)
    assert not divide or norm == "last", "a divide needs the normalizer last"
    div = (lambda call: f"divided({call}, True)") if divide else (lambda call: call)
    flags = dict(strict=strict, fallback=quad, title=mp.info.cls, divide=divide)
    digest = hashlib.sha256(repr(sorted(flags.items())).encode()).hexdigest()[:16]
    fn = w.function("triton_poly.py.jinja", base="poly_kernel", op=f"mixerc::poly_{digest}",
                    **flags)
    # the kernels' dims, for compiling them without tensors (fitness.py)
    w.kernel_dims[fn] = (key, (dim,), [value_dims(a, mp.heads, g) for a in applies])
    chunk = w.config_key(key, "chunk", tp)
    form = w.config_key(key, "form", tp)
    knobs = ", ".join(w.config_key(key, p, tp) for p in KERNEL_KNOBS)
    quadratic, features = cost.polynomial_choice(tp, mp, g)
    qf, ff = w.fresh("quadratic_flops"), w.fresh("feature_flops")
    w.line("# cost model (FLOPs per head): the quadratic form or the chunked feature map;")
    w.line(f"# the knob {key}.form overrides it ('quadratic' / 'features'; default 'cost')")
    w.line(f"{qf} = {cost.as_python(quadratic, chunk, w.dim)}")
    w.line(f"{ff} = {cost.as_python(features, chunk, w.dim)}")
    y = w.fresh("y")
    read, write = w.state(key)
    size = f"sum({q}.shape[-1] ** d for d in range({poly.degree + 1}))"
    if divide:
        w.line(f"# ({key} @ v) / ({key} @ 1) divided by each form (the kernels: in their "
               "epilogue): y = [n / m, m]")
    w.line(f"if {size} > {MAX_POLY_FEATURES}:  # feature map too large: the history form")
    history = f"{hist}({q}.to(DTYPE), {k}.to(DTYPE), {full}, {c}, {read})"
    w.line(f"    {y}, {write} = {div(history)}")
    w.line(f"elif {form} == 'quadratic' or ({form} == 'cost' and {qf} <= {ff}):")
    w.line("    # the quadratic form: Triton kernels (decode steps: the feature-state recurrence)")
    w.line(f"    {y}, {write} = {fn}({q}, {k}, {v}, {c}, {read}, {norm!r}, {knobs}, "
           f"want_state={w.want_state})")
    w.line("else:  # the chunked feature map (the torch backend)")
    ones = ", ".join(["1.0"] * (poly.degree + 1))
    w.line(f"    {y}, {write} = " + div(
        f"chunked_apply({chunks}, poly_features({q}.to(DTYPE), {c}), "
        f"poly_features({k}.to(DTYPE), [{ones}]), {full}, None, {read}, {chunk})"))
    return y


def space(tp):
    s = dict(torch_chunked.space(tp))
    s.update({p: (CHOICES[p], DEFAULTS[p]) for p in DEFAULTS})
    return s


def constraints(tp, key):
    out = list(torch_chunked.constraints(tp, key))
    for m, n in (("block_m", "block_n"), ("bwd_block_m", "bwd_block_n")):
        cm, cn = f"cfg[{key + '.' + m!r}]", f"cfg[{key + '.' + n!r}]"
        out.append(f"{cn} <= {cm}")  # whole key blocks per query block
        out.append(f"({cm} < 2 * max(T, 16) or {cm} == {DEFAULTS[m]})")
    return out
