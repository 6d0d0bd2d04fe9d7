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
    equal to SDPA's (and FlexAttention's forward where it runs on the CPU);
    then the linear family (triton_linear.py) against fla's PyTorch references
    standing in for its kernels."""
    import pytest
    pytest.importorskip("triton")
    out = tmp_path / "triton.md"
    out.write_text("# earlier results\n")
    r = subprocess.run([sys.executable, str(GPU_SCRIPT), "--backend", "triton", "--dry-run",
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "dry run OK" in r.stdout and "linear dry run OK" in r.stdout
    text = out.read_text()
    assert text.startswith("# earlier results\n")  # --out appends
    for section in ("### 1. Plain attention vs torch SDPA", "### 2. Score modifications",
                    "### 3. Decode step", "### Targets (issue 10)",
                    "## Triton backend: linear / state-space family",
                    "### 1. Chunked linear / state-space mixers", "### 2. Decode step (fixed",
                    "### Targets (issue 11)"):
        assert text.count(section) == 1, section
    linear = text.split("## Triton backend: linear")[1]
    text = text.split("## Triton backend: linear")[0]
    check_linear_dry_run(linear, fla=True)
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


LINEAR = ("retnet", "ssd", "gla", "linear_attention", "based", "mamba")
NO_PEER = ("mamba",)  # ours alone: fla ships no Mamba-1 kernel


def check_linear_dry_run(text, fla):
    assert "MISMATCH" not in text and "error:" not in text
    fwd = text.split("### 1. Chunked")[1].split("### 2.")[0]
    decode = text.split("### 2. Decode step")[1].split("### Targets")[0]
    for name in LINEAR:
        rows = [x for x in fwd.splitlines() if x.startswith(f"| {name} | ")]
        if not rows:
            continue  # not in --linear-mixers
        cells = [c.strip() for c in rows[0].split("|")[1:-1]]
        assert cells[2] == "40" and cells[3] == "2", rows[0]  # T, B
        assert cells[4][0].isdigit() and cells[8][0].isdigit(), rows[0]  # ours timed
        if fla and name in NO_PEER:
            assert cells[5].startswith("fla ships no kernel"), rows[0]
        elif fla:
            assert float(cells[7]) < 2e-2 and float(cells[11]) < 5e-2, rows[0]  # fwd, grad err
            assert cells[6].startswith("**") and cells[10].startswith("**"), rows[0]  # ratios
        else:
            assert cells[5].startswith("fla not installed"), rows[0]
            assert cells[6] == "—" and cells[9].startswith("fla not installed"), rows[0]
        for B in (1, 2):
            row = next(x for x in decode.splitlines() if x.startswith(f"| {name} | {B} | 24 |"))
            cells = [c.strip() for c in row.split("|")[1:-1]]
            assert cells[5][0].isdigit(), row  # our step timed
            if not fla:
                assert cells[9].startswith("fla not installed"), row
            elif name in ("based",) + NO_PEER:
                assert f"fla ships no recurrent step for {name.capitalize()}" in row, row
            else:
                assert cells[11].startswith("**") and float(cells[12]) < 2e-2, row


def test_triton_linear_dry_run_without_fla(tmp_path):
    """--family linear with fla unavailable: ours are still timed and every
    peer cell says why there is no peer."""
    import pytest
    pytest.importorskip("triton")
    out = tmp_path / "linear.md"
    r = subprocess.run([sys.executable, str(GPU_SCRIPT), "--backend", "triton", "--family",
                        "linear", "--dry-run", "--linear-no-fla", "--linear-mixers",
                        "retnet,ssd,based,mamba", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "linear dry run OK" in r.stdout and "Plain attention" not in r.stdout
    text = out.read_text()
    assert text.startswith("## Triton backend: linear / state-space family")
    check_linear_dry_run(text, fla=False)
    assert "| gla | " not in text


def test_triton_linear_report_of_measured_rows():
    """The linear tables and issue 11's targets from rows as a GPU run fills them."""
    sys.path.insert(0, str(SCRIPT.parent))
    import triton_linear as tl

    def r(ours, peer):
        return {"ours": ours, "peer": peer, "err": 3e-3, "status": "ok"}
    S = tl.SIZES
    fwd = [dict(mixer="retnet", T=4096, B=16, H=16, sizes=S["retnet"], bytes_fwd=10**9,
                bytes_bwd=2 * 10**9, fwd=r(1.0, 1.5), bwd=r(3.0, 3.3)),
           dict(mixer="retnet", T=16384, B=4, H=16, sizes=S["retnet"], bytes_fwd=10**9,
                bytes_bwd=2 * 10**9, fwd=r(1.0, 1.1), bwd=r(3.0, 1.5)),
           dict(mixer="ssd", T=4096, B=16, H=32, sizes=S["ssd"],
                fwd={"ours": 1.0, "peer": None, "err": 0.5, "status": "MISMATCH"},
                bwd={"ours": 2.0, "peer": None, "err": None, "status": None,
                     "peer_error": "fla not installed"}),
           dict(mixer="gla", T=65536, B=1, H=16, sizes=S["gla"], skipped="time budget"),
           dict(mixer="based", T=1024, B=64, H=16, sizes=S["based"],
                error="OutOfMemoryError: out of memory")]
    for row in fwd:
        row["flops"] = tl.flops(row["mixer"], row["sizes"], row["B"], row["T"])
    dec = [dict(mixer="retnet", B=64, ctx=1024, sizes=S["retnet"], bytes=2 * 64 * 16 * 128 * 128 * 4,
                peer_bytes=2 * 64 * 16 * 128 * 128 * 4, prefill_s=0.01, r=r(0.02, 0.03)),
           dict(mixer="based", B=1, ctx=1024, sizes=S["based"], skipped="time budget")]
    text = "\n".join(tl.table_forward(fwd) + tl.table_decode(dec, 3000.0)
                     + tl.targets(fwd, dec, 3000.0))
    assert "- retnet forward >= 1.0x fla at T >= 4k: met (lowest 1.10x at T=16k" in text
    assert "- retnet forward+backward >= 1.0x fla at T >= 4k: missed (lowest 0.50x" in text
    assert "- ssd forward >= 1.0x fla at T >= 4k: not measured" in text
    assert "- gla forward >= 1.0x fla at T >= 4k: not measured" in text
    assert "MISMATCH 5.0e-01" in text and "skipped (time budget)" in text
    assert "| fla not installed |" in text
    assert "error: OutOfMemoryError: out of memory" in text
    # 2 x 64 x 16 x 128 x 128 x 4 bytes in 0.02 ms: 6,711 GB/s, 224% of 3000
    assert "decode step at batch 64 >= 70% of the measured bandwidth: met (retnet: 224%)" in text
    assert tl.flops("retnet", S["retnet"], 1, 1) == 16 * (2 * 64 * 256 + 4 * 128 * 128)
    # rows listed by mixer, then T
    lines = [x for x in text.splitlines() if x.startswith("| retnet | H=16")]
    assert "| 4k |" in lines[0] and "| 16k |" in lines[1]
