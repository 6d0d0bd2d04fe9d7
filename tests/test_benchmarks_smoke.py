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


GPU_SCRIPT = SCRIPT.parent / "gpu.py"


def test_triton_benchmark_dry_run(tmp_path):
    """`gpu.py --backend triton --dry-run`: every mixer source of the Triton
    benchmark compiles with backend="triton" and every row's code path runs
    once on tiny shapes in Triton's interpreter, our outputs and gradients
    equal to SDPA's (and FlexAttention's forward where it runs on the CPU)."""
    import pytest
    pytest.importorskip("triton")
    out = tmp_path / "triton.md"
    out.write_text("# earlier results\n")
    r = subprocess.run([sys.executable, str(GPU_SCRIPT), "--backend", "triton", "--dry-run",
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "dry run OK" in r.stdout
    text = out.read_text()
    assert text.startswith("# earlier results\n")  # --out appends
    for section in ("### 1. Plain attention vs torch SDPA", "### 2. Score modifications",
                    "### 3. Decode step", "### Targets"):
        assert text.count(section) == 1, section
    assert "MISMATCH" not in text and "error:" not in text.replace("bwd peer", "")
    sdpa = text.split("### 1.")[1].split("### 2.")[0]
    for D in (64, 128):
        for mask in ("causal", "none"):
            row = next(x for x in sdpa.splitlines() if x.startswith(f"| {D} | {mask} | 40 |"))
            cells = [c.strip() for c in row.split("|")[1:-1]]
            assert float(cells[7]) < 2e-2 and float(cells[11]) < 5e-2, row  # fwd, grad err
            assert cells[6].startswith("**") and cells[10].startswith("**"), row  # ratios
    flex = text.split("### 2.")[1].split("### 3.")[0]
    for variant in ("alibi", "softcap", "document"):
        assert f"| {variant} | 64 | 40 |" in flex, variant
    decode = text.split("### 3.")[1].split("### Targets")[0]
    for ctx in (24, 40):
        row = next(x for x in decode.splitlines() if x.startswith(f"| {ctx} |"))
        assert "SDPA" in row and float(row.split("|")[-3]) < 2e-2, row


def test_triton_benchmark_report_of_measured_rows():
    """The tables and the targets from rows as a GPU run fills them (the dry
    run measures no T = 4k or 16k+ context, so these branches run here)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import triton_attention as ta

    def r(ours, peer):
        return {"ours": ours, "peer": peer, "err": 3e-3, "status": "ok"}
    sdpa = [dict(D=128, causal=True, T=4096, B=4, H=16, fwd=r(1.0, 0.95), bwd=r(3.0, 2.4)),
            dict(D=64, causal=False, T=16384, B=1, H=32, skipped="time budget"),
            dict(D=64, causal=False, T=1024, B=16, H=32, error="RuntimeError: boom")]
    flex = [dict(variant="alibi", D=128, T=4096, B=4, H=16, fwd=r(1.0, 1.2), bwd=r(2.0, 2.5)),
            dict(variant="document", D=128, T=4096, B=4, H=16,
                 fwd={"ours": 1.0, "peer": None, "err": 0.5, "status": "MISMATCH"},
                 bwd={"ours": 2.0, "peer": None, "peer_error": "x"})]
    dec = [dict(ctx=16384, B=8, H=16, G=4, D=128, bytes=2 * 8 * 16385 * 4 * 128 * 2,
                prefill_s=0.1, peer_label="SDPA enable_gqa", r=r(0.05, 0.04)),
           dict(ctx=65536, B=8, H=16, G=4, D=128, skipped="time budget")]
    text = "\n".join(ta.table_sdpa(sdpa) + ta.table_flex(flex) + ta.table_decode(dec, 3000.0)
                     + ta.targets(sdpa, flex, dec, 3000.0))
    assert "0.95x, met" in text
    assert "forward, >= 1.0x FlexAttention: met on the 1 rows measured" in text
    assert "1 rows not measured" in text
    assert "MISMATCH 5.0e-01" in text and "skipped (time budget)" in text
    assert "error: RuntimeError: boom" in text
    assert "decode >= 70% of the measured bandwidth at 16k+: met (16k: 179%)" in text
