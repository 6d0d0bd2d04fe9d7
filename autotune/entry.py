"""A cache value: JSON data, checked field by field before anything uses it.

Cache values may come from a shared directory or a Redis that other people
write to, so they are untrusted input. They are decoded with `json` only and
checked against a fixed schema (exact key sets, types, lengths, sizes); their
configs must be points of the space they declare, and `lookup` re-checks them
against the template's current space and constraints. Nothing in a value is
ever executed, imported or unpickled: a pickle or a string of Python is just
bytes that fail these checks.

    {"schema": "mixerc.autotune.entry/1", "key": "<sha256 of fields>",
     "fields": {...key fields...}, "name": "ssd",
     "space": {"params": {"M.chunk": {"values": [...], "default": 64}}},
     "space_fingerprint": "...", "effort": "quick",
     "best": {"M.chunk": 128} | null,
     "timings": [{"config": {...}, "ms": 1.5 | null, "note": ""}, ...],
     "tuned_at": "2025-01-01T00:00:00Z"}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import MixerError
from .identity import FIELDS_FORMAT, KEY_RE, key_of
from .search import EFFORTS
from .space import ConfigSpace, canonical_json

SCHEMA = "mixerc.autotune.entry/1"
MAX_BYTES = 1 << 20       # a real entry is a few KiB
MAX_TIMINGS = 4096
MAX_NOTE = 500
MAX_NAME = 200
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_TOP = {"schema", "key", "fields", "name", "space", "space_fingerprint", "effort", "best",
        "timings", "tuned_at"}


class BadEntry(Exception):
    """A cache value that is not a valid entry (the reason says which check failed)."""


@dataclass
class Timing:
    config: dict
    ms: float | None          # None: the candidate crashed or gave a wrong output
    note: str = ""


@dataclass
class Entry:
    key: str
    fields: dict
    name: str
    space: ConfigSpace
    effort: str
    best: dict | None
    timings: list = field(default_factory=list)
    tuned_at: str = ""

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "key": self.key, "fields": self.fields, "name": self.name,
                "space": self.space.to_json(), "space_fingerprint": self.space.fingerprint(),
                "effort": self.effort, "best": self.best,
                "timings": [{"config": t.config, "ms": t.ms, "note": t.note[:MAX_NOTE]}
                            for t in self.timings],
                "tuned_at": self.tuned_at}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, indent=1, allow_nan=False).encode()

    def best_ms(self) -> float | None:
        for t in self.timings:
            if self.best is not None and canonical_json(t.config) == canonical_json(self.best):
                return t.ms
        return None


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def parse_entry(raw, expect_key: str | None = None) -> Entry:
    """An `Entry` from untrusted bytes, or BadEntry."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "replace")
    if not isinstance(raw, (bytes, bytearray)):
        raise BadEntry(f"value is {type(raw).__name__}, not bytes")
    if len(raw) > MAX_BYTES:
        raise BadEntry(f"value is {len(raw)} bytes (limit {MAX_BYTES})")
    try:
        obj = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadEntry(f"not JSON ({type(e).__name__}: {str(e)[:80]})") from None
    return entry_from_json(obj, expect_key)


def entry_from_json(obj, expect_key: str | None = None) -> Entry:
    _need(isinstance(obj, dict), "value is not a JSON object")
    _need(set(obj) == _TOP, f"wrong fields: {sorted(map(str, obj))[:12]}")
    _need(obj["schema"] == SCHEMA, f"schema is {str(obj['schema'])[:40]!r}, want {SCHEMA!r}")
    key = obj["key"]
    _need(isinstance(key, str) and bool(KEY_RE.match(key)), "key is not a sha256 hex string")
    _need(expect_key is None or key == expect_key, "key differs from the one looked up")
    fields = obj["fields"]
    _check_fields(fields)
    _need(key_of(fields) == key, "key is not the hash of the fields")
    _need(isinstance(obj["name"], str) and bool(_NAME.match(obj["name"])), "bad name")
    try:
        space = ConfigSpace.from_json(obj["space"])
    except MixerError as e:
        raise BadEntry(f"space: {e.message}") from None
    _need(obj["space_fingerprint"] == space.fingerprint(), "space fingerprint does not match space")
    _need(obj["effort"] in EFFORTS, "unknown effort")
    timings = obj["timings"]
    _need(isinstance(timings, list) and len(timings) <= MAX_TIMINGS, "timings is not a short list")
    parsed = [_timing(t, space) for t in timings]
    best = obj["best"]
    if best is not None:
        best = _config(best, space)
        _need(any(t.ms is not None and t.config == best for t in parsed),
              "best config has no timing")
    tuned_at = obj["tuned_at"]
    _need(isinstance(tuned_at, str) and len(tuned_at) <= 64, "bad tuned_at")
    return Entry(key, fields, obj["name"], space, obj["effort"], best, parsed, tuned_at)


def _need(ok: bool, reason: str) -> None:
    if not ok:
        raise BadEntry(reason)


def _short_str(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_NAME


def _small_int(v) -> bool:
    return type(v) is int and abs(v) < 2 ** 62


def _flat(d, name: str, value_ok) -> None:
    _need(isinstance(d, dict) and len(d) <= 64, f"fields.{name} is not a small object")
    for k, v in d.items():
        _need(_short_str(k) and value_ok(v), f"fields.{name}.{str(k)[:40]} has a bad value")


def _check_fields(f) -> None:
    _need(isinstance(f, dict) and set(f) == {"format", "kernel", "shape", "device", "versions"},
          "fields has the wrong keys")
    _need(f["format"] == FIELDS_FORMAT and type(f["format"]) is int, "unknown fields format")
    _flat(f["kernel"], "kernel", _short_str)
    _flat(f["shape"], "shape", lambda v: _short_str(v) or _small_int(v))
    _flat(f["device"], "device", lambda v: _short_str(v) or _small_int(v))
    _flat(f["versions"], "versions", _short_str)


def _config(obj, space: ConfigSpace) -> dict:
    try:
        return space.validate(obj)
    except MixerError as e:
        raise BadEntry(f"config: {e.message}") from None


def _timing(t, space: ConfigSpace) -> Timing:
    _need(isinstance(t, dict) and set(t) == {"config", "ms", "note"}, "bad timing record")
    ms = t["ms"]
    _need(ms is None or (type(ms) in (int, float) and math.isfinite(ms) and 0 <= ms < 1e9),
          "bad time")
    _need(isinstance(t["note"], str) and len(t["note"]) <= MAX_NOTE, "bad note")
    return Timing(_config(t["config"], space), None if ms is None else float(ms), t["note"])
