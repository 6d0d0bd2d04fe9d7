"""Toeplitz (time-invariant) matrices: FFT convolution padded to >= 2T for long
kernels, direct shifted sums for short convs; decode keeps the last L - 1 inputs.

Not implemented yet: match() passes, so Toeplitz matrices use the dense fallback.
"""

NAME = "toeplitz"
VERSION = "0"


def match(parts, mp, program):
    return None


def emit(tp, mp, w, key, values):  # pragma: no cover - match() claims nothing yet
    raise NotImplementedError


def space(tp):
    return {}
