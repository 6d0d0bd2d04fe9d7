"""The module cache (mixerc/jit.py) trusts nothing in MIXERC_CACHE_DIR: a
generated module runs only from the text mixerc renders for the mixer, its
file is checked against that text, and a cache directory that cannot be used
costs one warning, never the job."""

import importlib.util
import marshal
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import mixerc
import pytest
import torch
from conftest import rel_err
from mixerc import jit
from mixerc.errors import CacheWarning

RUN = textwrap.dedent("""
    import sys, warnings
    import torch, mixerc
    warnings.simplefilter("error")      # any cache warning fails the run
    m = mixerc.compile(sys.argv[1], backend="torch")
    print(m._impl.key)
""")


def run(name, cache_dir, check=True):
    env = dict(os.environ, MIXERC_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-c", RUN, name], env=env, capture_output=True,
                          text=True, check=check)


def forget():
    for k in [k for k in sys.modules if k.startswith("mixerc_generated_")]:
        del sys.modules[k]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERC_CACHE_DIR", str(tmp_path))
    jit._warned.clear()
    forget()
    yield tmp_path
    forget()


def test_second_compile_in_a_new_process_reuses_the_file(tmp_path):
    key = run("ssd", tmp_path).stdout.strip()
    path = tmp_path / "modules" / f"mixer_{key}.py"
    before = path.stat()
    assert run("ssd", tmp_path).stdout.strip() == key  # same text, same file, no warning
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_files_are_shareable_by_a_team(cache):
    old = os.umask(0o022)
    try:
        m = mixerc.compile("retnet", backend="torch")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(jit.module_path(m._impl.key).stat().st_mode)
    assert mode == 0o644, oct(mode)


def test_code_appended_to_a_cached_module_never_runs(cache, tmp_path):
    m = mixerc.compile("retnet", backend="torch")
    path = jit.module_path(m._impl.key)
    flag = tmp_path / "PWNED"
    with open(path, "a") as f:
        f.write(f"\nopen({str(flag)!r}, 'w').write('x')\n")
    forget()
    with pytest.warns(CacheWarning, match="not the module mixerc generates"):
        m2 = mixerc.compile("retnet", backend="torch")
    assert not flag.exists()
    assert path.read_text() == m2.source("torch")  # rewritten with the generated text
    assert "PWNED" not in m2.source("torch")


def test_a_planted_pyc_never_runs(tmp_path):
    """importlib would run a .pyc whose header matches the source file; mixerc
    executes the rendered text only."""
    key = run("retnet", tmp_path).stdout.strip()
    path = tmp_path / "modules" / f"mixer_{key}.py"
    flag = tmp_path / "PWNED"
    code = compile(f"open({str(flag)!r}, 'w').write('x')\ndef forward(*a): pass\n",
                   str(path), "exec")
    st = path.stat()
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") \
        + int(st.st_mtime).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    pyc = importlib.util.cache_from_source(str(path))
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(header + marshal.dumps(code))
    run("retnet", tmp_path)
    assert not flag.exists()


def test_a_redirected_index_cannot_swap_mixers(tmp_path):
    """Whatever files map one mixer to another module, compiling mixer A gives
    A's math (the module is named by its own rendered text)."""
    run("retnet", tmp_path)
    key_gla = run("gla", tmp_path).stdout.strip()
    for root, _, files in os.walk(tmp_path):
        for f in files:
            if not f.endswith(".py") and "modules" not in root:
                with open(os.path.join(root, f), "w") as fh:
                    fh.write(key_gla)  # every index-like file now names gla's module
    script = textwrap.dedent("""
        import sys, torch, mixerc
        sys.path.insert(0, sys.argv[1])
        from reference import make_inputs
        args = make_inputs("retnet", B=1, T=9, seed=1)
        fast = mixerc.compile("retnet", backend="torch")(**args)
        dense = mixerc.compile("retnet", backend="dense")(**args)
        print(float((fast - dense).abs().max()))
    """)
    env = dict(os.environ, MIXERC_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert float(out) < 1e-5


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    bad = tmp_path / "not_a_dir"
    bad.write_text("x")
    monkeypatch.setenv("MIXERC_CACHE_DIR", str(bad))
    jit._warned.clear()
    forget()
    with pytest.warns(CacheWarning, match="compiling them in memory"):
        m = mixerc.compile("linear_attention", backend="torch")
    from reference import make_inputs
    args = make_inputs("linear_attention", B=1, T=7, seed=0)
    want = mixerc.compile("linear_attention", backend="dense")(**args)
    assert rel_err(m(**args), want) < 1e-5
    assert "def forward(" in m.source("torch")
    forget()


def test_unwritable_or_full_cache_dir_warns_once(cache, monkeypatch):
    def refuse(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(jit, "atomic_write", refuse)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = mixerc.compile("retnet", backend="torch")
        b = mixerc.compile("gla", backend="torch")
    cache_warnings = [w for w in seen if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1, [str(w.message) for w in cache_warnings]
    assert "No space left" in str(cache_warnings[0].message)
    from reference import make_inputs
    for m, name in ((a, "retnet"), (b, "gla")):
        args = make_inputs(name, B=1, T=5, seed=0)
        assert torch.isfinite(m(**args)).all()


def test_a_fifo_in_the_cache_does_not_hang(cache):
    m = mixerc.compile("retnet", backend="torch")
    path = jit.module_path(m._impl.key)
    path.unlink()
    os.mkfifo(path)
    forget()
    import threading
    done = []
    worker = threading.Thread(target=lambda: done.append(mixerc.compile("retnet")), daemon=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        worker.start()
        worker.join(timeout=30)
    assert done, "compile blocked on a FIFO in the cache"
    assert any("not the module mixerc generates" in str(w.message) for w in seen)
    assert stat.S_ISREG(path.stat().st_mode)
