"""The mixerc command line: check, explain, plot, demo."""

import subprocess
import sys

import mixerc
import pytest
from click.testing import CliRunner
from conftest import STDLIB
from mixerc.cli import main

EXPECTED_CLASS = {
    "attention": "softmax", "sliding_window": "softmax", "linear_attention": "masked low-rank",
    "based": "polynomial kernel", "retnet": "semiseparable", "gla": "per-channel decay",
    "ssd": "semiseparable", "mamba": "per-channel decay", "hydra": "quasiseparable",
    "h3": "toeplitz", "gated_conv": "toeplitz",
}


@pytest.mark.parametrize("name", STDLIB)
def test_explain_every_stdlib_mixer(name):
    r = CliRunner().invoke(main, ["explain", f"examples/{name}.mx"])
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[0]
    assert first == f"mixer {name}: {EXPECTED_CLASS[name]}"
    assert ("causal: no" in r.output) == (name == "hydra")
    assert "decode state:" in r.output


def test_check_all(tmp_path):
    r = CliRunner().invoke(main, ["check"] + [f"examples/{n}.mx" for n in STDLIB])
    assert r.exit_code == 0 and r.output.count("ok:") == len(STDLIB)


def test_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.mx"
    bad.write_text("mixer m {\n  dims H\n  input x : [H]\n  out y = exp(xx)\n}\n")
    proc = subprocess.run([sys.executable, "-m", "mixerc.cli", "check", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:4:15: error: unknown name 'xx'" in proc.stderr
    assert "did you mean 'x'" in proc.stderr
    r = CliRunner().invoke(main, ["explain", str(tmp_path / "missing.mx")])
    assert r.exit_code == 2 and "cannot read" in r.output


def test_plot_writes_png(tmp_path):
    out = tmp_path / "M.png"
    r = CliRunner().invoke(main, ["plot", "examples/ssd.mx", "-o", str(out), "-T", "48"])
    assert r.exit_code == 0, r.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    r = CliRunner().invoke(main, ["plot", "hydra", "-o", str(out), "--matrix", "nope"])
    assert r.exit_code == 2 and "no matrix named 'nope'" in r.output


def test_demo_runs_every_mixer():
    from mixerc.demo import run_demo
    from rich.console import Console

    rows = run_demo(T=24, batch=1, console=Console(file=open("/dev/null", "w")))
    assert [r[0] for r in rows] == mixerc.stdlib_names()
    for r in rows:
        assert r[-1].startswith("yes") or r[0] == "hydra", r
        assert float(r[6]) < 1e-4, r  # torch float32 vs dense float64
