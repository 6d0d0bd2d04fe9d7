"""The `mixerc` command line. MixerErrors print as diagnostics (no traceback)
and exit with status 2."""

from __future__ import annotations


import click

from .errors import exit_on_error




def _load(path):
    from .api import load_source
    from .checker import check
    from .syntax import parse

    source, file = load_source(path)
    return check(parse(source, file))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixerc")
def main():
    """mixerc: compile sequence mixers written as structured-matrix expressions."""


@main.command()
@click.argument("files", nargs=-1, required=True)
@exit_on_error
def check(files):
    """Parse and type-check FILES (paths or standard-library names)."""
    for f in files:
        p = _load(f)
        click.echo(f"ok: {p.name} ({p.file}): outputs {', '.join(p.outs)}")


@main.command()
@click.argument("file")
@click.option("--ir", "show_ir", is_flag=True, help="also print the typed IR")
@click.option("--backend", type=click.Choice(["torch", "triton"]), default="torch",
              show_default=True, help="whose plan: the triton backend's says which terms run "
              "on kernels and which algorithm (scan or chunks) a per-channel decay takes")
@exit_on_error
def explain(file, show_ir, backend):
    """Matrix class, causality and decode state of FILE."""
    import warnings

    from .api import CompiledMixer
    from .errors import MixerPerformanceWarning

    p = _load(file)
    with warnings.catch_warnings():  # explain prints them itself
        warnings.simplefilter("ignore", MixerPerformanceWarning)
        m = CompiledMixer(p, backend)
    click.echo(m.explain())
    if show_ir:
        click.echo("\n" + p.text())


@main.command()
@click.argument("file")
@click.option("-o", "--output", default="M.png", show_default=True, help="image to write")
@click.option("--matrix", "which", default=None, help="which matrix (default: M, else the first)")
@click.option("-T", "--time", "T", default=64, show_default=True, type=click.IntRange(min=1),
              help="sequence length")
@click.option("--dims", default="", help="dim sizes, e.g. H=4,N=8")
@click.option("--seed", default=0, show_default=True)
@exit_on_error
def plot(file, output, which, T, dims, seed):
    """Heat map of the mixing matrix of FILE for one head, on random inputs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.colors import SymLogNorm

    from .api import CompiledMixer
    from .errors import MixerValueError
    from .inputs import default_sizes, parse_dims, random_inputs

    p = _load(file)
    m = CompiledMixer(p, "dense")
    try:
        sizes = default_sizes(p, parse_dims(dims))
    except ValueError as e:
        raise MixerValueError(f"--dims: {e}") from None
    args = random_inputs(p, sizes, 1, T, seed=seed, dtype=torch.float64)
    mats = m.materialize(**args)
    if which is None:
        which = "M" if "M" in mats else next(iter(mats))
    if which not in mats:
        raise MixerValueError(f"no matrix named {which!r}; {p.name} has {', '.join(mats)}")
    M = mats[which][0]
    while M.dim() > 2:
        M = M[0]  # first head / channel
    M = M.numpy()
    info = next(x for x in m.analysis.matrices if x.name == which)
    lim = float(abs(M).max()) or 1.0
    fig, ax = plt.subplots(figsize=(6, 5.2))
    # symmetric log scale: decays make entries span many orders of magnitude
    norm = SymLogNorm(linthresh=lim * 1e-4, vmin=-lim, vmax=lim)
    im = ax.imshow(M, cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_title(f"{p.name}: {which} ({info.cls}), T={T}, first head")
    ax.set_xlabel("s (source position)")
    ax.set_ylabel("t (target position)")
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=120)
    except (OSError, ValueError) as e:  # a missing folder, no permission, an unknown suffix
        raise MixerValueError(f"cannot write {output}: {getattr(e, 'strerror', None) or e}") \
            from None
    finally:
        plt.close(fig)
    click.echo(f"wrote {output}: {which} of {p.name}, {T}x{T}")


TARGETS = ("sm_90a", "sm_90", "sm_89", "sm_80")  # codegen/triton/fitness.py


@main.command(name="compile")
@click.argument("file")
@click.option("-o", "--output", default=None,
              help="the Python module to write (with --target: a folder for the module and "
                   "each kernel's PTX and SASS)")
@click.option("--backend", type=click.Choice(["torch", "triton"]), default="torch",
              show_default=True)
@click.option("--target", type=click.Choice(TARGETS), default=None,
              help="compile every Triton kernel for this GPU (no GPU needed) and print its "
                   "registers, spills, shared memory and matrix instructions")
@click.option("--configs", type=click.Choice(["default", "all"]), default="default",
              show_default=True, help="with --target: the default config or every config of "
                                      "the tuner's space")
@click.option("--dims", default="", help="with --target: dim sizes, e.g. H=16,D=128 "
                                         "(default: D=V=128, the rest 16)")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
              show_default=True, help="with --target: the inputs' dtype")
@exit_on_error
def compile_command(file, output, backend, target, configs, dims, dtype):
    """Write FILE as a standalone Python module (torch: needs only torch;
    triton: torch and triton), or with --target check its Triton kernels
    for a GPU architecture without one.

    The module exposes mixer(**inputs, **params), step(state, **inputs_t) and
    module(**dims) (an nn.Module owning the params)."""
    from pathlib import Path

    from .api import CompiledMixer
    from .errors import MixerValueError

    if target is not None:
        return _fitness(file, output, target, configs, dims, dtype)
    if output is None:
        raise MixerValueError("compile needs -o FILE (the module to write), or --target")
    m = CompiledMixer(_load(file), backend)
    source = m._impl.generate(standalone=True)[0]
    try:
        Path(output).write_text(source)
    except OSError as e:
        raise MixerValueError(f"cannot write {output}: {e.strerror or e}") from None
    plan = "; ".join(f"{x.name}: {', '.join(x.strategies)}" for x in m._impl.plan.matrices)
    click.echo(f"wrote {output}: {m.name} ({plan})")


def _fitness(file, output, target, configs, dims, dtype):
    import os
    from pathlib import Path

    # real kernels, not the interpreter's (triton.jit reads this when a kernel is defined)
    os.environ.pop("TRITON_INTERPRET", None)
    from .api import CompiledMixer
    from .errors import MixerValueError
    from .inputs import parse_dims

    p = _load(file)
    m = CompiledMixer(p, "triton")
    from mixerc.codegen.triton import fitness
    try:
        overrides = parse_dims(dims)
    except ValueError as e:
        raise MixerValueError(f"--dims: {e}") from None
    sizes = {d.name: d.size for d in p.dims.values() if d.size is not None}
    for d in p.dims.values():
        sizes.setdefault(d.name, 128 if d.name in ("D", "V", "K") else 16)
    sizes.update(overrides)
    fits = fitness.check(m._impl, sizes, target, configs, mm_dtype=dtype,
                         keep_asm=output is not None)
    shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
    click.echo(f"{p.name}: Triton kernels for {target} ({shown}, {dtype} inputs)")
    if not fits:
        click.echo("  no Triton kernels: every term runs on the torch backend")
    else:
        click.echo(fitness.table(fits, target))
        bad = [f for f in fits if not f.fits]
        click.echo(f"{len(fits) - len(bad)} of {len(fits)} kernel configs fit {target}"
                   + (f"; the tuner drops the other {len(bad)}" if bad else ""))
    gpu = fitness.TARGETS[target][3]
    click.echo(f"roofline on an {gpu} (B=1 per head group, T=4096):")
    for name, flops, nbytes, fwd, both in fitness.roofline(
            m._impl, sizes, 1, 4096, target, 4 if dtype == "fp32" else 2):
        click.echo(f"  {name}: {flops / 1e9:.2f} GFLOP, {nbytes / 1e6:.1f} MB -> forward "
                   f"{fwd * 1e6:.1f} us, forward + backward {both * 1e6:.1f} us")
    if output is not None:
        out = Path(output)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{p.name}_triton.py").write_text(m._impl.generate(standalone=True)[0])
            for f in fits:
                cfg = "_".join(str(v) for v in f.config.values())
                run = f"_{f.run}" if f.run else ""  # a backward run's launch of the kernel
                for kind, text in f.files.items():
                    (out / f"{f.kernel}{run}_{cfg}.{kind}").write_text(text)
        except OSError as e:
            raise MixerValueError(f"cannot write {output}: {e.strerror or e}") from None
        click.echo(f"wrote {out}/: the module and each kernel's PTX and SASS")


@main.command()
@click.option("-T", "--time", "T", default=256, show_default=True, type=click.IntRange(min=1),
              help="sequence length")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1))
@exit_on_error
def demo(T, batch):
    """Run the standard library on random CPU inputs: torch backend vs dense."""
    from .demo import run_demo

    run_demo(T=T, batch=batch)


def _add_subsystem_commands():
    """Commands that live with their subsystem (autotune/cli.py, ...)."""
    from .autotune import cli as autotune_cli

    for command in autotune_cli.COMMANDS:
        main.add_command(command)


_add_subsystem_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
