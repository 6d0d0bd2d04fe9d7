"""Softmax attention with masks over t, s: flash-style online softmax over key
blocks (skipping fully masked blocks), SDPA where it applies, KV-cache decode.

Not implemented yet: match() passes, so softmax matrices use the dense fallback.
"""

NAME = "flash"
VERSION = "0"


def match(parts, mp, program):
    return None


def emit(tp, mp, w, key, values):  # pragma: no cover - match() claims nothing yet
    raise NotImplementedError


def space(tp):
    return {}
