"""The Redis layer against a real redis-server on a free loopback port: shared
results across "machines", a dead or hung server, poisoned values.

redis-server comes from the distribution (.ci/run installs it). Without it
these tests skip on a developer machine and fail in CI (CI is set there)."""

import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from test_autotune_toy import SleepProblem, isolated_cache, tune_in_subprocess  # noqa: F401

from mixerc.autotune import lookup, tune
from mixerc.autotune.backends import REDIS_PREFIX, CacheWarning, LocalDir
from mixerc.autotune.entry import parse_entry
from mixerc.autotune.identity import key_fields, key_of
from mixerc.cli import main

redis = pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
LOOPBACK = "127.0.0.1"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    port: int

    def client(self, password=None):
        return redis.Redis(host=LOOPBACK, port=self.port, password=password, socket_timeout=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_redis(tmp_path, password=None) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        msg = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    port = _free_port()
    args = [exe, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), "--protected-mode", "yes"]
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = f":{password}@" if password else ""
    server = Server(proc, f"redis://{auth}{LOOPBACK}:{port}/0", port)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client(password).ping()
            return server
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_redis(server)
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


def stop_redis(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)  # a test may have paused it
        server.proc.terminate()
        try:
            server.proc.wait(5)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def server(tmp_path, monkeypatch):
    s = start_redis(tmp_path)
    monkeypatch.setenv("MIXERC_REMOTE_CACHE", s.url)
    yield s
    stop_redis(s)


def _cache_warnings(record) -> list:
    return [str(w.message) for w in record if issubclass(w.category, CacheWarning)]


def test_only_loopback_addresses_are_used(server):
    assert server.url.startswith(f"redis://{LOOPBACK}:")
    c = server.client()
    assert c.config_get("bind")["bind"] == LOOPBACK
    tune(SleepProblem())
    clients = c.client_list()
    assert clients and all(x["addr"].startswith(LOOPBACK + ":") for x in clients)


def test_machine_b_gets_machine_a_config_with_zero_benchmarks(server, tmp_path):
    a = tune_in_subprocess({"MIXERC_CACHE_DIR": str(tmp_path / "machine-a"),
                            "MIXERC_REMOTE_CACHE": server.url}, fastest=128)
    assert a["runs"] == 4 and a["best"] == {"M.chunk": 128} and not a["warnings"]
    assert len(server.client().keys(REDIS_PREFIX + "*")) == 1
    b = tune_in_subprocess({"MIXERC_CACHE_DIR": str(tmp_path / "machine-b"),
                            "MIXERC_REMOTE_CACHE": server.url}, fastest=128)
    assert b == {"best": {"M.chunk": 128}, "runs": 0, "hit": True, "warnings": []}
    # the remote hit was materialized locally: machine B no longer needs the network
    assert LocalDir(tmp_path / "machine-b" / "autotune").keys()
    c = tune_in_subprocess({"MIXERC_CACHE_DIR": str(tmp_path / "machine-b"),
                            "MIXERC_REMOTE_CACHE": "redis://127.0.0.1:1/0"}, fastest=128)
    assert c["runs"] == 0 and c["hit"]


def test_redis_killed_mid_run_gives_one_warning_and_the_job_completes(server):
    p = SleepProblem(fastest=128)

    def kill_on_second_run(config, calls=[]):
        calls.append(config)
        if len(calls) == 2:
            server.proc.kill()
            server.proc.wait()
    p.on_run = kill_on_second_run
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        r = tune(p)
        again = tune(SleepProblem(fastest=128))          # local cache, no new warning
        lookup(SleepProblem(template_version="other"))    # a miss: Redis not asked again
    assert r.best == {"M.chunk": 128} and r.benchmarks_run == 4
    assert again.cache_hit
    msgs = _cache_warnings(record)
    assert len(msgs) == 1 and "unavailable" in msgs[0], msgs


def test_a_hung_redis_costs_one_timeout_then_nothing(server):
    tune(SleepProblem())
    server.proc.send_signal(signal.SIGSTOP)   # accepts connections, never answers
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            assert lookup(SleepProblem(template_version="2")) is None
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = tune(SleepProblem(template_version="2"))
            rest = time.perf_counter() - t0
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert 0.9 < first < 2.5, first
    assert r.benchmarks_run == 4 and rest < first + 2
    msgs = _cache_warnings(record)
    assert len(msgs) == 1 and "Timeout" in msgs[0], msgs


def test_poisoned_redis_values_are_rejected_and_the_job_completes(server, tmp_path, monkeypatch):
    from test_cache_local import poisoned_values

    p = SleepProblem(fastest=64)
    tune(p)
    key = key_of(key_fields(p))
    good = server.client().get(REDIS_PREFIX + key)
    assert parse_entry(good, key).best == {"M.chunk": 64}
    for i, (name, raw) in enumerate(poisoned_values(tmp_path, good).items()):
        monkeypatch.setenv("MIXERC_CACHE_DIR", str(tmp_path / f"fresh-{i}"))  # empty local dir
        server.client().set(REDIS_PREFIX + key, raw)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert lookup(p) is None, name
            r = tune(p)
        assert r.benchmarks_run == 4 and r.best == {"M.chunk": 64}, name
        if name not in ("code in a space", "empty"):  # GETRANGE reads "" as no key
            assert any("bad autotune cache entry" in m and "Redis" in m
                       for m in _cache_warnings(record)), name
        # the good write-through replaced the bad value
        assert parse_entry(server.client().get(REDIS_PREFIX + key), key).best == {"M.chunk": 64}
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "code-ran").exists()


def test_a_key_of_the_wrong_redis_type_is_a_bad_value_not_an_outage(server, monkeypatch):
    p = SleepProblem()
    key = key_of(key_fields(p))
    server.client().rpush(REDIS_PREFIX + key, b"x")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert lookup(p) is None
    assert any("refused" in m for m in _cache_warnings(record))
    server.client().delete(REDIS_PREFIX + key)
    tune(p)
    assert server.client().get(REDIS_PREFIX + key)     # Redis still in use


def test_password_comes_from_the_url_and_never_reaches_a_message(tmp_path, monkeypatch):
    s = start_redis(tmp_path, password="s3cret-pw")
    try:
        monkeypatch.setenv("MIXERC_REMOTE_CACHE", s.url)
        tune(SleepProblem())
        assert len(s.client("s3cret-pw").keys(REDIS_PREFIX + "*")) == 1
        monkeypatch.setenv("MIXERC_REMOTE_CACHE", s.url.replace("s3cret-pw", "wrong-pw"))
        monkeypatch.setenv("MIXERC_CACHE_DIR", str(tmp_path / "other"))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert tune(SleepProblem()).benchmarks_run == 4
        msgs = _cache_warnings(record)
        assert len(msgs) == 1 and "wrong-pw" not in msgs[0] and "***" in msgs[0], msgs
    finally:
        stop_redis(s)


def test_cli_lists_and_clears_redis(server):
    tune(SleepProblem())
    runner = CliRunner()
    r = runner.invoke(main, ["cache", "ls", "--remote"])
    assert r.exit_code == 0 and "sleepy" in r.output
    r = runner.invoke(main, ["cache", "clear", "--remote"])
    assert r.exit_code == 0 and "removed 2" in r.output
    assert not server.client().keys(REDIS_PREFIX + "*")
