"""The test suite itself never writes into the user's real cache dir."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TINY_TEST = '''
import mixerc
import torch
from mixerc import jit


def test_compiles_into_some_cache():
    m = mixerc.compile("retnet", backend="torch")
    x = torch.randn(1, 3, 2, 4)
    m(q=x, k=x, v=x, log_gamma=-torch.ones(2))
    assert list(jit.cache_root().rglob("mixer_*.py"))  # it did write a module somewhere
'''


def test_pytest_leaves_the_platform_cache_dir_untouched(tmp_path):
    """A test that compiles, run by pytest with this conftest in a fresh HOME:
    nothing may land under HOME or XDG_CACHE_HOME (platformdirs' cache dir)."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_tiny.py").write_text(TINY_TEST)
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    xdg.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MIXERC_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(xdg))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(suite)], cwd=suite, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = [str(p) for p in list(home.rglob("*")) + list(xdg.rglob("*"))]
    assert not written, written
