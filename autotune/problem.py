"""What the tuner tunes: one kernel at one shape on one device.

A backend hands the tuner a `TuningProblem`; the tuner never looks inside the
kernel. `lookup()` only needs `key`, `shape`, `space` and `device`, so a
backend should build inputs lazily (in `runner`), keeping a problem cheap to
make for a cache lookup.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from ..errors import MixerValueError
from .space import ConfigSpace


@runtime_checkable
class TuningProblem(Protocol):
    name: str        # mixer name, for display
    key: dict        # kernel identity: {"module", "backend", ...}: str -> str
    shape: dict      # exact sizes by dim name plus "B", "T"; dtype names, e.g. "dtype": "float32"
    space: ConfigSpace
    device: str      # "cpu" or "cuda:0"

    def runner(self, config: dict) -> Callable[[], object]:
        """A zero-argument function doing one forward with `config`, inputs built."""

    def check(self, output) -> str | None:
        """None if `output` matches the reference, else why not."""

    # optional: screen(config) -> None, or why `config` is dropped before any
    # benchmark (the Triton backend: kernels that spill or overflow shared
    # memory on this GPU, from compiling them)


REQUIRED_KEY = ("module", "backend")  # module: a hash of the generated code that runs


def bucket_T(t: int) -> int:
    """Sequence lengths share a tuned config up to the next power of two."""
    return 1 << max(0, int(t) - 1).bit_length()


def shape_bucket(shape: dict) -> dict:
    """The shape part of a cache key: every dim exact except T (bucketed)."""
    out = dict(shape)
    if "T" in out:
        out["T"] = bucket_T(out["T"])
    return out


def check_problem(problem) -> None:
    """Fail early, with the field named, on a problem the cache could not key."""
    key = getattr(problem, "key", None)
    if not isinstance(key, dict) or any(not isinstance(key.get(k), str) for k in REQUIRED_KEY):
        raise MixerValueError(f"tuning problem key must hold strings {', '.join(REQUIRED_KEY)}; "
                              f"got {key!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in key.items()):
        raise MixerValueError("tuning problem key must map strings to strings")
    shape = getattr(problem, "shape", None)
    if not isinstance(shape, dict) or not all(
            isinstance(k, str) and type(v) in (int, str) for k, v in shape.items()):
        raise MixerValueError(f"tuning problem shape must map names to ints or dtype names, "
                              f"got {shape!r}")
    if not isinstance(getattr(problem, "space", None), ConfigSpace):
        raise MixerValueError("tuning problem space must be a ConfigSpace")
    if not isinstance(getattr(problem, "device", None), str):
        raise MixerValueError("tuning problem device must be a string like 'cpu' or 'cuda:0'")
