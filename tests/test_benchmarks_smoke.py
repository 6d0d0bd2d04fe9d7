"""benchmarks/cpu.py --smoke runs end to end on tiny sizes, so the benchmark
cannot rot. It checks what the script reports, never a speed."""

import subprocess
import sys
from pathlib import Path

import mixerc

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu.py"


def test_cpu_benchmark_smoke(tmp_path):
    out = tmp_path / "results.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    text = out.read_text()
    for section in ("### 1. Forward", "### 2. Decode step", "### 3. Peers", "### 4. Classes"):
        assert section in text
    classes = text.split("### 4. Classes")[1]
    for variant in ("alibi", "document", "prefix_lm", "window_decay", "noncausal_linear"):
        assert f"| {variant} | " in classes, variant
    assert "not timed" not in classes  # every variant matched dense and had a fast plan
    forward = text.split("### 1. Forward")[1].split("### 2.")[0]
    decode = text.split("### 2. Decode step")[1].split("### 3.")[0]
    for name in mixerc.stdlib_names():
        assert f"| {name} | " in forward, name
        causal = mixerc.compile(name).causal
        assert (f"| {name} | " in decode) == causal, name
    peers = text.split("### 3. Peers")[1]
    assert "| attention | torch SDPA" in peers
    # a peer that computes something else than our mixer is a bug, here or there
    assert "MISMATCH" not in text
    import importlib.util
    if importlib.util.find_spec("fla") is not None:  # fla-core (dev extra): its peers ran
        for peer in ("| ssd | fla", "| retnet | fla", "| gla | fla", "| linear_attention | fla"):
            assert peer in peers, peer
