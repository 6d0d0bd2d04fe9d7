"""Low-rank terms on a finite band lo <= t - s <= hi (strategy `banded`): a
decay inside a window, local linear attention, a two-sided band. Only the
chunk pairs the band reaches are computed; decode keeps the last hi tokens'
keys, values (and log-decays). Template: codegen/torch/templates/banded.py.jinja.
"""


def emit(tp, mp, w, key, values):
    f = tp.flags
    dim = f["dim"]
    q = w.canon(tp.operands["q"].node, mp.heads, (dim,), hint="q")
    k = w.canon(tp.operands["k"].node, mp.heads, (dim,), hint="k")
    args = [q, k, str(values)]
    if f["has_decay"]:
        args.append(w.canon(tp.operands["log_decay"].node, mp.heads, (), hint="log_decay"))
    cached = f["lo"] >= 0  # causal: a window of keys and values carries over
    names = ["k", "v"] + (["a"] if f["has_decay"] else []) + ["pos"]
    cache = "None"
    if cached:
        reads = {n: w.state(f"{key}.{n}") for n in names}
        cache = w.assign(f"None if {reads['k'][0]} is None else "
                         f"({', '.join(reads[n][0] for n in names)})", hint="cache")
    args += [cache, f"lo={int(f['lo'])}", f"hi={int(f['hi'])}",
             f"chunk={w.config_key(key, 'chunk', tp)}"]
    poly = f["features"]
    if poly is not None:
        args.append(f"coeffs={w.coefficients(poly)}")
    fn = w.function("banded.py.jinja", base="banded", has_decay=f["has_decay"],
                    poly=poly is not None, cache=cached, window=int(f["hi"]),
                    title=mp.info.cls + " on a band")
    y, new_cache = w.fresh("y"), w.fresh("new_cache")
    w.line(f"{y}, {new_cache} = {fn}({', '.join(args)})")
    if cached:
        w.line(f"{', '.join(reads[n][1] for n in names)} = {new_cache}")
    return y


CHUNK = 64


def space(tp):
    return {"chunk": ([16, 32, 64, 128, 256], CHUNK)}


def constraints(tp, key):
    chunk = f"cfg[{key + '.chunk'!r}]"
    return [f"({chunk} < 2 * max(T, 16) or {chunk} == {CHUNK})"]
