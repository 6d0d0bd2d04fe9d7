"""Chunked semiseparable algorithm (strategy `chunked`): masked low rank with a
scalar decay (linear attention, RetNet, SSD), a per-channel decay inside the
contraction (GLA, Mamba-1; a recurrence when the cost model says so), a
time-invariant modal kernel (H3's SSM), and a polynomial of a low-rank
product expanded into a feature map (Based).

Templates: codegen/torch/templates/chunked.py.jinja, scan.py.jinja,
poly_quadratic.py.jinja, poly_history.py.jinja.

Backward: for a scalar decay (or none) the generated code calls the rendered
forward through runtime/torch/autograd.py `chunked_apply`, whose backward runs
that same forward on the adjoint problems. A per-channel decay differentiates
by autograd through the chunked code.
"""

from mixerc.plan.lowrank import full_key


def emit(tp, mp, w, key, values):
    f = tp.flags
    dim = f["dim"]
    q = w.canon(tp.operands["q"].node, mp.heads, (dim,), hint="q")
    k = w.canon(full_key(tp, w.program.groups), mp.heads, (dim,), hint="k")
    if f["features"] is not None:
        poly = f["features"]
        c = w.coefficients(poly)
        ones = ", ".join(["1.0"] * (poly.degree + 1))
        if not f["has_decay"]:
            return _emit_polynomial(tp, mp, w, key, values, q, k, c, ones)
        what = repr(_term_name(w, mp, key))  # named in the error for a too large feature map
        q = w.assign(f"poly_features({q}, {c}, {what})", hint="q_features")
        k = w.assign(f"poly_features({k}, [{ones}], {what})", hint="k_features")
    a = "None"
    if f["has_decay"]:
        a = w.canon(tp.operands["log_decay"].node, mp.heads,
                    (dim,) if f["per_channel"] else (), hint="log_decay")
    fn = w.function("chunked.py.jinja", base="chunked", per_channel=f["per_channel"],
                    strict=f["strict"], has_decay=f["has_decay"],
                    title=mp.info.cls + (" (feature map)" if f["features"] is not None else ""))
    chunk = w.config_key(key, "chunk", tp)
    extra = f", sub={w.config_key(key, 'sub', tp)}" if f["per_channel"] else ""
    y = w.fresh("y")
    read, write = w.state(key)
    if f["per_channel"]:
        # No adjoint template for a decay inside the contraction yet (dq would
        # need the decay along the value dim): autograd records the steps.
        from mixerc import cost

        scan = w.function("scan.py.jinja", base="recurrent", strict=f["strict"],
                          title=mp.info.cls)
        scan_cost, chunked_cost = cost.per_channel_choice(tp, mp, w.program.groups)
        sc, cc = w.fresh("scan_cost"), w.fresh("chunked_cost")
        w.line("# cost model (per head, elementwise ops weighted): a recurrence or chunks")
        w.line(f"{sc} = {cost.as_python(scan_cost, chunk, w.dim)}")
        w.line(f"{cc} = {cost.as_python(chunked_cost, chunk, w.dim)}")
        w.line("# backward: autograd through the chunks or the steps (per-channel decay)")
        w.line(f"if {sc} <= {cc} or time == 1:")
        w.line(f"    {y}, {write} = {scan}({q}, {k}, {values}, {a}, {read}, {chunk})")
        w.line("else:")
        w.line(f"    {y}, {write} = {fn}({q}, {k}, {values}, {a}, {read}, {chunk}{extra})")
    else:
        # Scalar decay: the backward is three more runs of `fn` on adjoint
        # problems (runtime/torch/autograd.py), saving only the inputs.
        w.line("# backward: the same chunked mixer on the adjoint problems "
               "(runtime/torch/autograd.py)")
        w.line(f"{y}, {write} = chunked_apply({fn}, {q}, {k}, {values}, {a}, {read}, {chunk})")
    return y


def _term_name(w, mp, key) -> str:
    term = f", term {int(key.rsplit('.term', 1)[1]) + 1}" if ".term" in key else ""
    return f"mixer {w.program.name}, matrix {mp.name}{term}"


def _emit_polynomial(tp, mp, w, key, values, q, k, c, ones):
    """A polynomial kernel without decay: the quadratic form below the cost
    model's crossover length, the chunked feature map above it (per call).
    Where the feature map would be too large (runtime/torch/tokens.py
    MAX_POLY_FEATURES, decided by K and the degree, so the same for every
    call and the state keeps one form), the quadratic form over the keys and
    values so far."""
    from mixerc import cost
    from mixerc.runtime.torch.tokens import MAX_POLY_FEATURES

    f = tp.flags
    quadratic, features = cost.polynomial_choice(tp, mp, w.program.groups)
    chunk = w.config_key(key, "chunk", tp)
    quad = w.function("poly_quadratic.py.jinja", base="poly_quadratic", strict=f["strict"])
    fn = w.function("chunked.py.jinja", base="chunked", per_channel=False,
                    strict=f["strict"], has_decay=False, title=mp.info.cls + " (feature map)")
    qf, ff = w.fresh("quadratic_flops"), w.fresh("feature_flops")
    w.line("# cost model (FLOPs per head): the quadratic form or the chunked feature map")
    w.line(f"{qf} = {cost.as_python(quadratic, chunk, w.dim)}")
    w.line(f"{ff} = {cost.as_python(features, chunk, w.dim)}")
    y = w.fresh("y")
    hist = w.function("poly_history.py.jinja", base="poly_history", strict=f["strict"])
    size = f"sum({q}.shape[-1] ** d for d in range({tp.flags['features'].degree + 1}))"
    w.line(f"if {size} > {MAX_POLY_FEATURES}:  # feature map too large: keep k, v")
    read, write = w.state(key)
    w.line(f"    {y}, {write} = {hist}({q}, {k}, {values}, {c}, {read})")
    w.line(f"elif {qf} <= {ff}:")
    w.line(f"    {y}, {write} = {quad}({q}, {k}, {values}, {c}, {read})")
    w.line("else:")
    w.line(f"    {y}, {write} = chunked_apply({fn}, poly_features({q}, {c}), "
           f"poly_features({k}, [{ones}]), {values}, None, {read}, {chunk})")
    return y


CHUNK, SUB = 64, 16  # defaults: always allowed, so no search is needed to run


def space(tp):
    s = {"chunk": ([16, 32, 64, 128, 256], CHUNK)}
    if tp.flags["per_channel"]:
        s["sub"] = ([8, 16, 32], SUB)
    return s


def constraints(tp, key):
    """Python expressions over `cfg` and `T` that a config must satisfy (rendered
    into the generated module's `config_allowed`); the defaults satisfy them for
    every T."""
    chunk = f"cfg[{key + '.chunk'!r}]"
    out = [f"({chunk} < 2 * max(T, 16) or {chunk} == {CHUNK})"]  # no chunk far longer than T
    if tp.flags["per_channel"]:
        out.append(f"cfg[{key + '.sub'!r}] <= {chunk}")
    return out
