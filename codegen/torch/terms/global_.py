"""Low-rank terms with no mask (strategy `global`): non-causal linear
attention, y_t = q_t . (sum_s k_s v_s^T), O(T). No decode: the matrix reads
the future. Template: codegen/torch/templates/global.py.jinja."""


def emit(tp, mp, w, key, values):
    f = tp.flags
    dim = f["dim"]
    q = w.canon(tp.operands["q"].node, mp.heads, (dim,), hint="q")
    k = w.canon(tp.operands["k"].node, mp.heads, (dim,), hint="k")
    poly = f["features"]
    if poly is not None:  # f(q . k) through the feature map
        c = w.coefficients(poly)
        ones = ", ".join(["1.0"] * (poly.degree + 1))
        q = w.assign(f"poly_features({q}, {c})", hint="q_features")
        k = w.assign(f"poly_features({k}, [{ones}])", hint="k_features")
    fn = w.function("global.py.jinja", base="global_lowrank", title=mp.info.cls)
    return w.assign(f"{fn}({q}, {k}, {values})", hint="y")


def space(tp):
    return {}
