"""`mixerc autotune` and `mixerc cache` (registered by mixerc/cli.py)."""

from __future__ import annotations

import json

import click

from ..errors import MixerUnsupportedError, MixerValueError, exit_on_error

COMMANDS: list = []  # click commands added to the `mixerc` group




def _console(stderr: bool = False, width: int = 100):
    from rich.console import Console
    return Console(stderr=stderr, width=max(width, Console().width), highlight=False)


def parse_shape(text: str) -> dict:
    from ..inputs import parse_dims
    try:
        shape = parse_dims(text)
    except ValueError as e:
        raise MixerValueError(f"--shape: {e}", hint="e.g. --shape 'B=1,T=8192,H=8,P=64,G=1,N=64'") \
            from None
    missing = [d for d in ("B", "T") if d not in shape]
    if missing:
        raise MixerValueError(f"--shape needs {' and '.join(missing)} (batch and sequence length)")
    bad = [k for k, v in shape.items() if v <= 0]
    if bad:
        raise MixerValueError(f"--shape: sizes must be positive ({', '.join(bad)})")
    return shape


def make_problem(file: str, backend: str, shape: dict, dtype: str, device: str):
    """The backend's TuningProblem for FILE at `shape`."""
    import torch

    import mixerc

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise MixerValueError(f"unknown dtype {dtype!r}", hint="e.g. float32, bfloat16, float16")
    mixer = mixerc.compile(file, backend=backend)
    if not hasattr(mixer, "tuning_problem"):
        raise MixerUnsupportedError(f"the {backend} backend of {mixer.name} has nothing to tune yet")
    return mixer.tuning_problem(shape, dtype=dt, device=device)


@click.command("autotune")
@click.argument("file")
@click.option("--shape", required=True, help="sizes by dim name, with B and T: "
              "'B=1,T=8192,H=8,P=64,G=1,N=64'")
@click.option("--backend", type=click.Choice(["torch", "triton"]), default="torch",
              show_default=True)
@click.option("--budget", type=float, default=None,
              help="wall-clock seconds for measuring (default: per effort)")
@click.option("--effort", type=click.Choice(["quick", "full"]), default="quick", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N")
@click.option("--force", is_flag=True, help="ignore the cache and measure again")
@exit_on_error
def autotune_command(file, shape, backend, budget, effort, dtype, device, force):
    """Tune FILE's kernels for one shape; results go to the autotune cache."""
    from .tuner import tune

    problem = make_problem(file, backend, parse_shape(shape), dtype, device)
    with _progress() as (bar, task):
        def report(done, total, trial):
            bar.update(task, completed=done, total=total,
                       description=_label(trial.config)[:40])
        result = tune(problem, effort=effort, budget_s=budget, force=force, progress=report)
    print_result(result)


class _progress:
    """A rich progress bar on stderr (stdout keeps the table)."""

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self.bar = Progress(TextColumn("tuning {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            console=_console(stderr=True), transient=True)
        self.bar.__enter__()
        return self.bar, self.bar.add_task("", total=None)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def _label(config: dict) -> str:
    from .space import config_label
    return config_label(config)


def print_result(result) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .space import canonical_json

    best, default = canonical_json(result.best), canonical_json(result.default)
    table = Table(title=f"{escape(result.name)}  (key {result.key[:12]})", title_justify="left")
    for col, just in (("config", "left"), ("time (ms)", "right"), ("vs default", "right"),
                      ("", "left")):
        table.add_column(col, justify=just)
    trials = sorted(result.trials, key=lambda t: (t.ms is None, t.ms or 0.0))
    shown = trials[:30]
    for t in shown:
        c = canonical_json(t.config)
        tags = [w for w, on in (("best", c == best), ("default", c == default),
                                ("cached", t.cached)) if on]
        speed = result.speedup(t)
        table.add_row(escape(_label(t.config)), "-" if t.ms is None else f"{t.ms:.3f}",
                      "-" if speed is None else f"{speed:.2f}x",
                      escape(", ".join(tags) + ("; " if tags and t.note else "") + t.note[:80]))
    console = _console()
    console.print(table)
    if len(trials) > len(shown):
        console.print(f"... {len(trials) - len(shown)} more configs (mixerc cache show "
                      f"{result.key[:12]})")
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    how = "cache hit" if result.cache_hit else "tuned"
    took = (f"{result.elapsed_s * 1e3:.1f} ms" if result.elapsed_s < 1
            else f"{result.elapsed_s:.1f} s")
    click.echo(f"best: {_label(result.best)} ({how} in {took})")
    click.echo(f"benchmarks run: {result.benchmarks_run}")


# ---------------------------------------------------------------- mixerc cache
@click.group("cache")
def cache_group():
    """Inspect, ship and clear the autotune cache (MIXERC_CACHE_DIR, MIXERC_REMOTE_CACHE)."""


def _cache():
    from .cache import Cache
    return Cache.from_env()


@cache_group.command("ls")
@click.option("--remote", is_flag=True, help="list Redis instead of the local directory")
@exit_on_error
def cache_ls(remote):
    """One line per cached entry."""
    from rich.markup import escape
    from rich.table import Table

    cache = _cache()
    if remote and cache.remote is None:
        raise MixerValueError("--remote: MIXERC_REMOTE_CACHE is not set")
    rows = cache.entries(remote=remote)
    where = "Redis" if remote else str(cache.local.root)
    table = Table(title=f"autotune cache: {escape(where)} ({len(rows)} entries)",
                  title_justify="left")
    for col in ("key", "mixer", "template", "shape", "device", "best", "ms", "effort", "tuned"):
        table.add_column(col)
    for key, e in rows:
        if isinstance(e, str):
            table.add_row(key[:12], "-", "-", "-", "-", escape(e[:80]), "", "", "")
            continue
        shape = ",".join(f"{k}={v}" for k, v in e.fields["shape"].items())
        dev = e.fields["device"]
        ms = e.best_ms()
        kernel = e.fields["kernel"]
        table.add_row(key[:12], e.name,
                      escape(f"{kernel['backend']} {str(kernel.get('module', ''))[:8]}"), escape(shape), escape(f"{dev['type']} {dev['name']}"),
                      escape(_label(e.best) if e.best else "-"),
                      "-" if ms is None else f"{ms:.3f}", e.effort, escape(e.tuned_at[:16]))
    _console(width=160).print(table)


@cache_group.command("show")
@click.argument("key")
@exit_on_error
def cache_show(key):
    """Print the entry whose key starts with KEY, as JSON."""
    entry = _cache().find(key)
    click.echo(json.dumps(entry.to_json(), indent=2, sort_keys=True))


@cache_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@exit_on_error
def cache_export(file):
    """Write every valid local entry to FILE (a JSON bundle to ship with a model)."""
    n = _cache().export(file)
    click.echo(f"exported {n} entries to {file}")


@cache_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@exit_on_error
def cache_import(file):
    """Check every entry of the bundle FILE and add the valid ones to the cache."""
    n, rejected = _cache().import_bundle(file)
    for reason in rejected:
        click.echo(f"rejected {reason}", err=True)
    click.echo(f"imported {n} entries, rejected {len(rejected)}")


@cache_group.command("clear")
@click.option("--remote", is_flag=True, help="also delete mixerc's entries in Redis")
@exit_on_error
def cache_clear(remote):
    """Delete every local entry (and with --remote, the Redis ones)."""
    n = _cache().clear(remote=remote)
    click.echo(f"removed {n} entries")


COMMANDS.extend([autotune_command, cache_group])
