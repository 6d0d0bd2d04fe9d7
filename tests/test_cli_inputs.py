"""Bad files, paths and options on the command line end in a diagnostic and
exit status 2, never a traceback or a hang; scalar params work end to end."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mixerc
from mixerc.cli import main
from mixerc.errors import MixerError

SCALAR_PARAM = """mixer scalar_gate {
  dims H, K, V
  input q : [H, K]
  input k : [H, K]
  input v : [H, V]
  param g : []
  out y = (decay(g - 1) * (q @ k^T)) @ v
}
"""


def cli(*args, timeout=120):
    """Run `python -m mixerc.cli ARGS` as a user would (a hang fails by timeout)."""
    return subprocess.run([sys.executable, "-m", "mixerc.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_diagnostic(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# ---------------------------------------------------------------- scalar params

def test_scalar_param_mixer_autotunes_to_a_config(tmp_path, fresh_cache):
    path = tmp_path / "scalar.mx"
    path.write_text(SCALAR_PARAM)
    r = CliRunner().invoke(main, ["autotune", str(path), "--shape", "B=1,T=128,H=2,K=4,V=4"])
    assert r.exit_code == 0, r.output
    assert "discarded" not in r.output and "no candidate passed" not in r.output, r.output
    assert "best: y.chunk=" in r.output


def test_scalar_param_mixer_plots(tmp_path):
    path, out = tmp_path / "scalar.mx", tmp_path / "M.png"
    path.write_text(SCALAR_PARAM)
    r = CliRunner().invoke(main, ["plot", str(path), "-o", str(out), "-T", "16"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- source files

GOOD = "mixer m {\n  dims H\n  input x : [H]  # note\n  out y = x\n}\n"


def test_non_utf8_byte_is_a_line_col_error(tmp_path):
    path = tmp_path / "latin1.mx"
    path.write_bytes(GOOD.replace("note", "caf\xe9 ok").encode("latin-1"))
    proc = cli("check", path)
    # line 3, column of the byte: `  input x : [H]  # caf` is 22 characters
    assert_diagnostic(proc, f"{path}:3:23: error:", "UTF-8", "0xe9")
    with pytest.raises(MixerError, match=r"latin1.mx:3:23"):
        mixerc.compile(path, backend="dense")


def test_non_utf8_column_counts_characters_not_bytes(tmp_path):
    path = tmp_path / "mixed.mx"
    text = GOOD.replace("note", "été \xff").encode("utf-8")  # é is 2 bytes, 1 column
    path.write_bytes(text.replace(b"\xc3\xbf", b"\xff"))   # then a lone 0xff
    assert_diagnostic(cli("check", path), f"{path}:3:24: error:", "0xff")


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.mx"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    proc = cli("check", path)
    assert proc.returncode == 0, proc.stderr
    assert "ok: m" in proc.stdout
    assert mixerc.compile(path, backend="dense").name == "m"


def test_a_directory_is_a_clear_error(tmp_path):
    path = tmp_path / "dir.mx"
    path.mkdir()
    assert_diagnostic(cli("check", path), "cannot read", "directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.mx"
    os.mkfifo(path)
    assert_diagnostic(cli("check", path, timeout=60), "cannot read", "named pipe")
    with pytest.raises(MixerError, match="named pipe"):
        mixerc.compile(str(path), backend="dense")


# ---------------------------------------------------------------- options

def test_plot_into_a_missing_folder_is_a_clear_error(tmp_path):
    out = tmp_path / "missing" / "dir" / "x.png"
    r = CliRunner().invoke(main, ["plot", "retnet", "-o", str(out), "-T", "8"])
    assert r.exit_code == 2 and "cannot write" in r.output and str(out) in r.output, r.output


def test_compile_into_a_missing_folder_is_a_clear_error(tmp_path):
    out = tmp_path / "missing" / "x.py"
    r = CliRunner().invoke(main, ["compile", "retnet", "-o", str(out)])
    assert r.exit_code == 2 and "cannot write" in r.output, r.output


@pytest.mark.parametrize("device", ["cuda:99", "gpu", "meta"])
def test_autotune_on_an_unusable_device_is_a_clear_error(device):
    r = CliRunner().invoke(main, ["autotune", "retnet", "--shape", "B=1,T=64,H=2,K=4,V=4",
                                  "--device", device])
    assert r.exit_code == 2, r.output
    assert f"device '{device}'" in r.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a CPU-only torch")
def test_autotune_on_cuda_without_cuda_is_a_clear_error():
    proc = cli("autotune", "retnet", "--shape", "B=1,T=64,H=2,K=4,V=4", "--device", "cuda:0")
    assert_diagnostic(proc, "device 'cuda:0' is not usable")


@pytest.mark.parametrize("args", [["demo", "-T", "0"], ["demo", "--batch", "0"],
                                  ["plot", "retnet", "-T", "0"]])
def test_zero_lengths_on_the_command_line_are_refused(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "Invalid value" in r.output


# ---------------------------------------------------------------- precedence

def test_precedence_error_says_matmul_binds_tighter():
    src = ("mixer m {\n  dims H, K, V\n  input q : [H, K]\n  input k : [H, K]\n"
           "  input v : [H, V]\n  out y = q @ k^T * (s <= t) @ v\n}\n")
    with pytest.raises(MixerError) as info:
        mixerc.compile(src, backend="dense")
    text = info.value.render()
    assert "<string>:6:11: error:" in text
    assert "`@` binds tighter than `*`" in text
    assert "(A * B) @ v" in text
    fixed = src.replace("q @ k^T * (s <= t) @ v", "(q @ k^T * (s <= t)) @ v")
    assert mixerc.compile(fixed, backend="dense").name == "m"
