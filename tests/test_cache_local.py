"""The local cache directory: values are data checked before use, writes are
atomic and safe across processes, bundles ship entries, the CLI shows them."""

import json
import os
import pickle
import time

import pytest
from click.testing import CliRunner
from test_autotune_toy import (SleepProblem, finish, isolated_cache,  # noqa: F401
                               tune_in_subprocess)

from mixerc.autotune import lookup, tune
from mixerc.autotune.backends import CacheWarning, LocalDir
from mixerc.autotune.cache import Cache
from mixerc.autotune.entry import MAX_BYTES, BadEntry, parse_entry
from mixerc.autotune.identity import key_fields, key_of
from mixerc.cli import main


class Marker:
    """Unpickling this creates `path`: proof a payload was (not) unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def poisoned_values(tmp_path, good: bytes) -> dict:
    """Values a hostile or broken cache could hold, by name."""
    entry = json.loads(good)

    def variant(**changes):
        return json.dumps({**entry, **changes}).encode()

    code = "__import__('os').system('touch " + str(tmp_path / "code-ran") + "')"
    own_space = {"params": {"M.chunk": {"values": [code], "default": code}}}
    from mixerc.autotune.space import ConfigSpace
    return {
        "pickle": pickle.dumps(Marker(tmp_path / "unpickled")),
        "python source": code.encode(),
        "truncated": good[: len(good) // 2],
        "corrupted": good.replace(b'"', b"'", 7),
        "empty": b"",
        "not utf-8": b"\xff\xfe" + good,
        "wrong schema": json.dumps({"config": {"M.chunk": 64}}).encode(),
        "other schema version": variant(schema="mixerc.autotune.entry/0"),
        "code in a config": variant(best={"M.chunk": code}),
        "code in a space": variant(space=own_space,
                                   space_fingerprint=ConfigSpace.from_json(own_space).fingerprint(),
                                   best={"M.chunk": code},
                                   timings=[{"config": {"M.chunk": code}, "ms": 0.1, "note": ""}]),
        "unknown knob": variant(best={"M.chunk": 64, "M.evil": 1}),
        "NaN time": good.replace(b'"ms": ', b'"ms": NaN, "x": ', 1),
        "key of other fields": variant(fields={**entry["fields"], "kernel": {"module": "x"}}),
        "huge": b'{"schema": "' + b"x" * (MAX_BYTES + 10) + b'"}',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "JSON list": b"[1, 2, 3]",
    }


def _good_entry_bytes(problem) -> tuple:
    tune(problem)
    key = key_of(key_fields(problem))
    return key, LocalDir().get(key)


def test_the_pickle_payload_is_live_so_the_marker_test_can_fail(tmp_path):
    pickle.loads(pickle.dumps(Marker(tmp_path / "live")))
    assert (tmp_path / "live").exists()


def test_every_poisoned_local_value_is_rejected_and_the_job_completes(tmp_path):
    p = SleepProblem(fastest=64)
    key, good = _good_entry_bytes(p)
    assert parse_entry(good, key).best == {"M.chunk": 64}
    local = LocalDir()
    for name, raw in poisoned_values(tmp_path, good).items():
        if name != "code in a space":
            with pytest.raises(BadEntry):
                parse_entry(raw, key)
        local.path(key).write_bytes(raw)
        if name == "code in a space":
            # a well-formed entry for another space: unusable here, so a miss
            assert lookup(p) is None
        else:
            with pytest.warns(CacheWarning, match="bad autotune cache entry"):
                assert lookup(p) is None, name
            with pytest.warns(CacheWarning):
                r = tune(p)          # the job completes: tunes again ...
            assert r.benchmarks_run == 4 and r.best == {"M.chunk": 64}, name
            assert parse_entry(local.get(key), key).best == {"M.chunk": 64}  # ... and repairs it
    assert not (tmp_path / "unpickled").exists()
    assert not (tmp_path / "code-ran").exists()


def test_writes_are_atomic_and_leave_no_temp_files(isolated_cache):
    p = SleepProblem()
    tune(p)
    tune(p, force=True)
    files = sorted(f.name for f in isolated_cache.joinpath("autotune").iterdir())
    assert files == [".locks", key_of(key_fields(p)) + ".json"]


def test_two_processes_tuning_one_key_leave_one_valid_entry(tmp_path):
    env = {"MIXERC_CACHE_DIR": str(tmp_path / "shared")}
    procs = [tune_in_subprocess(env, wait=False, fastest=128) for _ in range(2)]
    reports = [finish(p) for p in procs]
    assert reports[0]["best"] == reports[1]["best"] == {"M.chunk": 128}
    # the tuning lock made the later one wait and read the first one's entry
    assert sorted(r["runs"] for r in reports) == [0, 4]
    root = tmp_path / "shared" / "autotune"
    entries = [f for f in root.iterdir() if f.suffix == ".json"]
    assert len(entries) == 1 and not [f for f in root.iterdir() if f.suffix == ".tmp"]
    assert parse_entry(entries[0].read_bytes(), entries[0].stem).best == {"M.chunk": 128}


STORE_LOOP = """
import sys
sys.path.insert(0, {tests!r})
from test_autotune_toy import SleepProblem
from mixerc.autotune.cache import Cache
from mixerc.autotune.entry import Entry, Timing
from mixerc.autotune.identity import key_fields, key_of
p = SleepProblem()
fields = key_fields(p)
for i in range(20):
    chunk = [16, 32, 64, 128][i % 4]
    Cache.from_env().store(Entry(key_of(fields), fields, "w{n}", p.space, "quick", {{"M.chunk": chunk}},
                                 [Timing({{"M.chunk": chunk}}, float(i))], "now"))
"""


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    import subprocess
    import sys

    from test_autotune_toy import TESTS_DIR
    env = {**os.environ, "MIXERC_CACHE_DIR": str(tmp_path / "c")}
    procs = [subprocess.Popen([sys.executable, "-c", STORE_LOOP.format(tests=TESTS_DIR, n=n)],
                              env=env, stderr=subprocess.PIPE) for n in range(2)]
    reader = Cache(LocalDir(tmp_path / "c" / "autotune"))
    key = None
    while any(p.poll() is None for p in procs):
        time.sleep(0.01)
        for k in reader.local.keys():
            key = k
            assert parse_entry(reader.local.get(k), k) is not None  # never torn
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    key = key or reader.local.keys()[0]
    entry = parse_entry(reader.local.get(key), key)
    assert len(entry.timings) == 4   # merged: every config's latest timing


def test_export_import_ships_entries_and_rejects_bad_ones(tmp_path, monkeypatch):
    tune(SleepProblem(fastest=128))
    tune(SleepProblem(fastest=16, template_version="2"))
    bundle = tmp_path / "tuned.json"
    assert Cache.from_env().export(bundle) == 2
    monkeypatch.setenv("MIXERC_CACHE_DIR", str(tmp_path / "elsewhere"))
    obj = json.loads(bundle.read_text())
    obj["entries"].append({"schema": "evil", "payload": "__import__('os')"})
    obj["entries"].append(dict(obj["entries"][0], best={"M.chunk": 12345}))
    bundle.write_text(json.dumps(obj))
    n, rejected = Cache.from_env().import_bundle(bundle)
    assert n == 2 and len(rejected) == 2
    assert lookup(SleepProblem()) == {"M.chunk": 128}
    assert tune(SleepProblem(template_version="2")).benchmarks_run == 0
    bundle.write_bytes(pickle.dumps(Marker(tmp_path / "unpickled")))
    from mixerc.errors import MixerCacheError
    with pytest.raises(MixerCacheError):
        Cache.from_env().import_bundle(bundle)
    assert not (tmp_path / "unpickled").exists()


def test_cli_cache_commands(tmp_path):
    runner = CliRunner()
    tune(SleepProblem(fastest=128))
    key = key_of(key_fields(SleepProblem()))
    r = runner.invoke(main, ["cache", "ls"])
    assert r.exit_code == 0 and key[:12] in r.output and "sleepy" in r.output
    r = runner.invoke(main, ["cache", "show", key[:10]])
    assert r.exit_code == 0 and json.loads(r.output)["best"] == {"M.chunk": 128}
    r = runner.invoke(main, ["cache", "show", "ffff"])
    assert r.exit_code == 2 and "0 cache entries match" in r.output
    r = runner.invoke(main, ["cache", "export", str(tmp_path / "b.json")])
    assert r.exit_code == 0 and "exported 1" in r.output
    r = runner.invoke(main, ["cache", "clear"])
    assert r.exit_code == 0 and "removed 1" in r.output
    assert lookup(SleepProblem()) is None
    r = runner.invoke(main, ["cache", "import", str(tmp_path / "b.json")])
    assert r.exit_code == 0 and "imported 1 entries, rejected 0" in r.output
    assert lookup(SleepProblem()) == {"M.chunk": 128}
    (tmp_path / "junk.json").write_text("{not json")
    r = runner.invoke(main, ["cache", "import", str(tmp_path / "junk.json")])
    assert r.exit_code == 2 and "cannot read bundle" in r.output


def test_cli_autotune_table_and_benchmark_count(monkeypatch):
    from mixerc.autotune import cli

    monkeypatch.setattr(cli, "make_problem", lambda *a: SleepProblem(fastest=128))
    runner = CliRunner()
    args = ["autotune", "examples/ssd.mx", "--shape", "B=1,T=4096,H=2"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[-1] == "benchmarks run: 4"
    assert any("M.chunk=128" in line and "best" in line for line in lines)
    assert any("M.chunk=32" in line and "1.00x" in line and "default" in line for line in lines)
    r = runner.invoke(main, args)
    assert r.output.splitlines()[-1] == "benchmarks run: 0" and "cache hit" in r.output
    r = runner.invoke(main, ["autotune", "examples/ssd.mx", "--shape", "T=4096"])
    assert r.exit_code == 2 and "needs B" in r.output


def test_an_unusable_cache_directory_warns_and_the_job_completes(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("MIXERC_CACHE_DIR", str(not_a_dir))
    with pytest.warns(CacheWarning):
        r = tune(SleepProblem(fastest=128))
    assert r.best == {"M.chunk": 128} and r.benchmarks_run == 4
    with pytest.warns(CacheWarning, match="cannot read"):
        assert lookup(SleepProblem()) is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_a_named_pipe_at_an_entry_path_is_a_miss_not_a_hang(tmp_path):
    """open() on a FIFO with no writer blocks forever; the cache must not."""
    from test_safe_io import quick

    p = SleepProblem(fastest=128)
    local = LocalDir()
    local.root.mkdir(parents=True)
    os.mkfifo(local.path(key_of(key_fields(p))))
    with pytest.warns(CacheWarning, match="named pipe"):
        r = quick(lookup, p)
    assert r == {"value": None, "seconds": r["seconds"]} and r["seconds"] < 1, r
    with pytest.warns(CacheWarning, match="named pipe"):
        r = quick(tune, p, limit=10)
    assert r["value"].best == {"M.chunk": 128}           # tuned, and the pipe replaced
    assert lookup(p) == {"M.chunk": 128}
    os.mkfifo(tmp_path / "bundle.json")
    from mixerc.errors import MixerCacheError
    r = quick(Cache.from_env().import_bundle, tmp_path / "bundle.json")
    assert isinstance(r.get("error"), MixerCacheError) and "named pipe" in str(r["error"])


def test_export_over_a_fifo_does_not_block(tmp_path, monkeypatch):
    import os
    import threading

    from mixerc.autotune.backends import LocalDir
    from mixerc.autotune.cache import Cache

    target = tmp_path / "bundle.json"
    os.mkfifo(target)
    done = []
    worker = threading.Thread(target=lambda: done.append(Cache(LocalDir(tmp_path / "c"))
                                                         .export(target)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done == [0] and target.is_file()


def test_cache_files_are_shareable(tmp_path):
    import os
    import stat

    from mixerc.autotune.backends import LocalDir

    old = os.umask(0o022)
    try:
        LocalDir(tmp_path).put("ab" * 32, b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / ("ab" * 32 + ".json")).stat().st_mode) == 0o644
