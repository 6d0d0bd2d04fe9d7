"""Every mistake is a MixerError that names file:line:col, shows the line with
a caret and says what was expected."""

import mixerc
import pytest
from mixerc.checker import check_source
from mixerc.errors import (MixerError, MixerNameError, MixerSyntaxError, MixerTypeError)

HEAD = """mixer m {
  dims H, G divides H, D, V
  input q : [H, D]
  input k : [G, D]
  input v : [G, V]
  input x : [H, V]
  param w : [H]
"""


def err(body: str, cls=MixerError):
    with pytest.raises(cls) as info:
        check_source(HEAD + body + "\n}\n", "m.mx")
    e = info.value
    assert e.loc is not None and e.loc.file == "m.mx"
    text = str(e)
    assert text.startswith(f"m.mx:{e.loc.line}:{e.loc.col}: error: ")
    assert "^" in text  # the caret under the offending span
    return e


def where(text: str, anchor: str, first_line: int = 1):
    """(line, col) of the first occurrence of anchor in text."""
    for n, line in enumerate(text.splitlines()):
        if anchor in line:
            return first_line + n, line.index(anchor) + 1
    raise AssertionError(anchor)


BODY_LINE = HEAD.count("\n") + 1

CASES = [
    # (body, error class, message fragment, text at the reported position)
    ("  out y = softmax(q @ kk^T) @ v", MixerNameError, "unknown name 'kk'", "kk^T"),
    ("  out y = softmx(q @ k^T) @ v", MixerNameError, "unknown function 'softmx'", "softmx"),
    ("  out y = (q @ v^T) @ x", MixerTypeError, "cannot contract", "q @ v^T"),
    ("  out y = q @ k^T", MixerTypeError, "is a sequence matrix", "q @ k^T"),
    ("  out y = decay(q @ k^T) @ v", MixerTypeError, "must be a token tensor or a static",
     "q @ k^T"),
    ("  out y = q @ v", MixerTypeError, "left side of @ must be a sequence matrix", "q @"),
    ("  out y = x + q", MixerTypeError, "dims do not match", "x + q"),
    ("  let a = x\n  let a = q\n  out y = a", MixerNameError, "duplicate definition",
     "let a = q"),
    ("  let M = decay(w)\n  out y = M + x", MixerTypeError, "cannot combine", "M + x"),
    ("  out y = w * 2", MixerTypeError, "static tensor", "w * 2"),
    ("  out y = softmax(q @ k^T, mask = t + s) @ v", MixerTypeError, "predicate", "t + s"),
    ("  out y = shift(x, k = 1.5)", MixerTypeError, "integer literal", "1.5"),
    ("  out y = sum(x, Q)", MixerTypeError, "dim name", "Q)"),
    ("  out y = q^T", MixerTypeError, "right of `u @ w^T`", "q^T"),
    ("  out y = (decay(w) @ x) * (decay(w) @ x)", None, None, None),  # fine
    ("  out y = x + later\n  let later = x", MixerNameError, "before it is defined", "later"),
    ("  out y = (decay(w) @ decay(w)) @ x", MixerTypeError, "two sequence matrices",
     "decay(w) @ decay(w)"),
    # `@` binds tighter than `*`: this is M * (M @ v), a matrix times a token tensor
    ("  out y = (q @ k^T) * (q @ k^T) @ v", MixerTypeError, "cannot combine a sequence matrix",
     "(q @ k^T) * (q"),
    ("  out y : [V, D] = x", MixerTypeError, "declared [V, D]", "out y"),
    ("  let t = x\n  out y = t", MixerNameError, "reserved", "let t"),
    ("  out y = exp(x, x)", MixerTypeError, "takes 1 argument", "exp("),
    ("  out y = softmax(q @ k^T, musk = s <= t) @ v", MixerTypeError,
     "unexpected keyword argument 'musk'", "musk"),
]


@pytest.mark.parametrize("body,cls,fragment,anchor", CASES)
def test_checker_errors(body, cls, fragment, anchor):
    if cls is None:
        check_source(HEAD + body + "\n}\n", "m.mx")
        return
    e = err(body, cls)
    assert fragment in e.message, e.message
    assert (e.loc.line, e.loc.col) == where(body, anchor, BODY_LINE), str(e)


def test_unknown_name_suggests():
    e = err("  out y = softmax(q @ kk^T) @ v", MixerNameError)
    assert "did you mean 'k'" in str(e)


def test_no_out():
    with pytest.raises(MixerTypeError, match="has no `out`") as info:
        check_source("mixer m {\n  dims H\n  input x : [H]\n}\n", "m.mx")
    assert info.value.loc.line == 1


def test_group_must_divide_fixed_sizes():
    with pytest.raises(MixerTypeError, match="does not divide") as info:
        check_source("mixer m {\n  dims H = 6, G = 4 divides H\n  input x : [H]\n"
                     "  out y = x\n}\n", "m.mx")
    assert (info.value.loc.line, info.value.loc.col) == (2, 15)


def test_undeclared_dim_in_shape():
    with pytest.raises(MixerNameError, match="unknown dim 'Q'") as info:
        check_source("mixer m {\n  dims H\n  input x : [H, Q]\n  out y = x\n}\n", "m.mx")
    assert (info.value.loc.line, info.value.loc.col) == (3, 17)


@pytest.mark.parametrize("src,fragment,line,col", [
    ("mixer m {\n  dims H\n  input x : [H]\n  out y = x +\n}\n", "unexpected '}'", 5, 1),
    ("mixer m {\n  dims H\n  input x : [H]\n  out y = x $ x\n}\n", "unexpected character '$'",
     4, 13),
    ("mixer m {\n  dims H\n  input x : [H\n  out y = x\n}\n", "unexpected 'out'", 4, 3),
    ("mixer m {\n  dims H\n  input x : [H]\n  out y = x\n", "unexpected end of file", 5, 1),
    ("mixer let {\n}\n", "'let' is a keyword", 1, 7),
    ("mixer m {\n  dims H\n  input out : [H]\n}\n", "'out' is a keyword", 3, 9),
])
def test_syntax_errors(src, fragment, line, col):
    with pytest.raises(MixerSyntaxError) as info:
        check_source(src, "bad.mx")
    e = info.value
    assert fragment in e.message, e.message
    assert (e.loc.line, e.loc.col) == (line, col), str(e)
    assert "hint: expected" in str(e) or "keyword" in e.message


def test_runtime_shape_errors_name_the_tensor():
    m = mixerc.compile("ssd", backend="dense")
    import torch
    from reference import make_inputs
    args = make_inputs("ssd", B=2, T=7)
    bad = dict(args, C=args["C"][:, :, :1])
    with pytest.raises(mixerc.MixerShapeError, match=r"input C has shape \[2, 7, 1, 4\]"):
        m(**bad)
    bad = dict(args, B=torch.randn(2, 7, 3, 4, dtype=torch.float64),
               C=torch.randn(2, 7, 3, 4, dtype=torch.float64))
    with pytest.raises(mixerc.MixerShapeError, match="G = 3 .* does not divide H = 4"):
        m(**bad)
    with pytest.raises(mixerc.MixerValueError, match="missing argument D"):
        m(**{k: v for k, v in args.items() if k != "D"})
    with pytest.raises(mixerc.MixerValueError, match="unknown argument z"):
        m(**args, z=args["D"])
    bad = dict(args, x=args["x"].clone())
    bad["x"][0, 3, 1, 0] = float("nan")
    with pytest.raises(mixerc.MixerValueError, match="input x holds 1 NaN/Inf"):
        m(**bad)
    with pytest.raises(mixerc.MixerShapeError, match="param A_log"):
        m(**dict(args, A_log=args["A_log"][:2]))
    with pytest.raises(mixerc.MixerShapeError, match="input dt .* time is 7"):
        m(**dict(args, dt=args["dt"][:, :5]))
