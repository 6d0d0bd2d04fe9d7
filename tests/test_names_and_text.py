"""Any name the language accepts works on every backend, and no text in a mixer
file (comments, file names) can become code in a generated module."""

import subprocess
import sys

import mixerc
import pytest
import torch
from click.testing import CliRunner
from conftest import rel_err
from mixerc.cli import main
from mixerc.errors import MixerNameError
from mixerc.inputs import default_sizes, random_inputs

# Python keywords and builtins, names the generated module uses itself (locals,
# imports, runtime helpers, template functions), and names like its temporaries
HOSTILE = ["lambda", "None", "def", "class", "True", "import", "print", "len", "float",
           "state", "sizes", "cfg", "batch", "time", "DTYPE", "DEVICE", "torch",
           "F", "math", "sys", "new_state", "forward", "init_params", "chunked_apply",
           "to_chunks", "select", "number", "outs", "generator", "chunked_has_decay",
           "v", "v1", "v0", "y", "u", "q", "k", "SIGNATURE", "NAME", "match", "training",
           "Signature", "bind", "run", "scan_cost"]

ROLES = ["dim", "a", "b", "c", "p", "let", "out"]
TEMPLATE = """mixer f {{
  dims H, {dim}
  input {a} : [H, {dim}]
  input {b} : [H, {dim}]
  input {c} : [H]
  param {p} : [H]
  let {let} = decay(-softplus({c} + {p})) * ({a} @ {b}^T)
  out {out} = {let} @ {c} + {p} * exp({c}) + {dim} * sum({a}, {dim})
  out check = {c}
}}
"""


def programs():
    n = len(HOSTILE)
    for i in range(n):
        yield {r: HOSTILE[(i + j * 7) % n] for j, r in enumerate(ROLES)}


@pytest.mark.parametrize("names", list(programs()), ids=lambda d: "-".join(d.values()))
def test_hostile_names_give_the_dense_answer(names, fresh_cache):
    if len(set(names.values())) < len(names):
        pytest.skip("a name repeated across roles")  # not a valid program
    src = TEMPLATE.format(**names)
    dense = mixerc.compile(src, backend="dense")
    fast = mixerc.compile(src, backend="torch")
    sizes = default_sizes(dense.program)
    args = random_inputs(dense.program, sizes, 2, 9, seed=3, dtype=torch.float64)
    want, got = dense(**args), fast(**args)
    for w, g in zip(want, got):
        assert rel_err(g, w) < 1e-10
    assert torch.equal(got[1], args[names["c"]])  # `check` is the input, not a neighbour
    head = {k: (v[:, :5] if v.dim() > 2 else v) for k, v in args.items()}
    _, state = fast(**head, return_state=True)
    tok = {k: (v[:, 5] if v.dim() > 2 else v) for k, v in args.items()}
    y5, _ = fast.step(state, **tok)
    assert rel_err(y5[0], want[0][:, 5]) < 1e-10
    layer = fast.module(**{"H": sizes["H"], names["dim"]: sizes[names["dim"]]},
                        dtype=torch.float64)
    params = dict(layer.named_parameters())
    assert set(params) == {names["p"]}
    inputs = {k: v for k, v in args.items() if k != names["p"]}
    assert rel_err(layer(**inputs)[0], dense(**inputs, **{names["p"]: params[names["p"]]})[0]) \
        < 1e-10


def test_two_inputs_named_like_temporaries_stay_apart(fresh_cache):
    src = "mixer f { dims H  input v0 : [H]  input v1 : [H]  out a = exp(v0)  out b = v1 }"
    x0, x1 = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    a, b = mixerc.compile(src, backend="torch")(v0=x0, v1=x1)
    assert torch.equal(b, x1) and torch.allclose(a, x0.exp())


@pytest.mark.parametrize("name", ["self", "initial_state", "return_state", "cu_seqlens", "dtype",
                                  "device", "seed", "config"])
def test_api_keywords_are_reserved_with_a_clear_error(name):
    with pytest.raises(MixerNameError, match=f"'{name}' is reserved"):
        mixerc.compile(f"mixer f {{ dims H  input {name} : [H]  out y = {name} }}")


# --------------------------------------------------------------- text in the source

INJECTION = 'mixer f {{  # """; open({flag!r}, "w").write("x"); """\n  dims H\n  input x : [H]\n' \
            '  out y = x\n}}\n'
ODD_COMMENTS = ["# a\x00b", "# \\xi", "# C:\\Users", "# '''", '# """', "# \\", "# \r", "# \x0c\x0b",
                "# \u2028 \u2029 \x85", "# é ü 漢字", "# \ud800"]


def test_a_comment_cannot_run_code(tmp_path, fresh_cache):
    flag = tmp_path / "PWNED"
    src = INJECTION.format(flag=str(flag))
    m = mixerc.compile(src)
    x = torch.randn(1, 4, 2)
    assert torch.equal(m(x=x), x)
    assert not flag.exists()
    mx = tmp_path / "evil.mx"
    mx.write_text(src)
    out = tmp_path / "evil_mixer.py"
    r = CliRunner().invoke(main, ["compile", str(mx), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert not flag.exists()
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "import evil_mixer", str(tmp_path)], check=True)
    assert not flag.exists()


@pytest.mark.parametrize("text", ODD_COMMENTS, ids=repr)
def test_odd_characters_in_comments(text, tmp_path, fresh_cache):
    src = f"mixer f {{ {text}\n  dims H\n  input x : [H]\n  out y = 2 * x\n}}\n"
    x = torch.randn(1, 3, 2)
    m = mixerc.compile(src)
    assert torch.equal(m(x=x), 2 * x)
    assert m.source("torch").count("\ndef forward(") == 1
    compile(m.source("torch"), "generated.py", "exec")  # valid Python, whatever the comment


def test_odd_file_names_stay_in_comments(tmp_path, fresh_cache):
    d = tmp_path / 'we"""ird\\dir'
    d.mkdir()
    path = d / "mix.mx"
    path.write_text("mixer f {\n  dims H\n  input x : [H]\n  out y = x + 1\n}\n")
    m = mixerc.compile(path)
    x = torch.randn(1, 3, 2)
    assert torch.equal(m(x=x), x + 1)


def test_the_parser_never_unpickles(monkeypatch, tmp_path):
    """lark's `cache=True` loads a pickle from the shared temp dir (any local
    user can plant one there); building the parser twice must unpickle nothing."""
    import pickle
    import tempfile

    from mixerc import syntax

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    loads = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: loads.append(a))
    for _ in range(2):
        syntax._parser.cache_clear()
        syntax.parse("mixer f { dims H  input x : [H]  out y = x }")
    syntax._parser.cache_clear()
    assert loads == [] and not list(tmp_path.glob(".lark_cache*"))
