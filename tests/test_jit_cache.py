"""Generated modules are cached on disk: a second compile in a new process
neither parses nor generates code, and is fast."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, time
    import torch, mixerc
    t0 = time.perf_counter()
    m = mixerc.compile(sys.argv[1], backend="torch")
    ms = (time.perf_counter() - t0) * 1e3
    print(ms, m._program is None)
""")


def run(name, cache_dir):
    env = dict(os.environ, MIXERC_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", SCRIPT, name], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def test_second_compile_in_a_new_process_is_a_cache_hit(tmp_path):
    first, skipped_parse = run("ssd", tmp_path)
    assert not skipped_parse  # cold: parsed and generated
    times = []
    for _ in range(3):
        ms, skipped_parse = run("ssd", tmp_path)
        assert skipped_parse  # warm: straight from the cache
        times.append(ms)
    assert min(times) < 50, times


def test_damaged_cached_module_is_regenerated(tmp_path, monkeypatch):
    import mixerc
    from mixerc import jit

    monkeypatch.setenv("MIXERC_CACHE_DIR", str(tmp_path))
    forget = lambda: [sys.modules.pop(k) for k in list(sys.modules)  # noqa: E731
                      if k.startswith("mixerc_generated_")]
    forget()
    m = mixerc.compile("retnet", backend="torch")
    path = jit.module_path(m._impl.key)
    assert path.exists()
    path.write_text("raise RuntimeError('damaged')\n")
    forget()
    m2 = mixerc.compile("retnet", backend="torch")
    assert "def forward(" in path.read_text()
    assert m2.source("torch") == path.read_text()
