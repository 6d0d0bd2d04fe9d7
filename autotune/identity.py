"""Cache keys: what must match for a tuned config to be reused.

key fields = kernel identity (IR hash, backend, template version) + shape
bucket + dtypes + device identity + torch/triton versions. The key string is
the sha256 of their canonical JSON, so it is also a safe file name. The search
space is *not* in the key: the entry stores per-config timings, and a larger
space reuses them and measures only the new configs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import metadata

from .problem import check_problem, shape_bucket
from .space import canonical_json

FIELDS_FORMAT = 1


def _normalize(name: str) -> str:
    # "NVIDIA  H100 80GB HBM3 " and "nvidia h100 80gb hbm3" are the same card
    return " ".join(name.split()).lower()


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return _normalize(line.split(":", 1)[1])
    except OSError:
        pass
    import platform
    return _normalize(platform.processor() or platform.machine() or "unknown")


def device_identity(device: str) -> dict:
    """What makes timings from two machines comparable."""
    import torch

    if device.startswith("cuda"):
        d = torch.device(device)
        props = torch.cuda.get_device_properties(d)
        runtime = torch.version.hip or torch.version.cuda or "unknown"
        return {"type": "cuda", "name": _normalize(props.name),
                "capability": f"{props.major}.{props.minor}",
                "runtime": str(runtime)}
    if device == "cpu":
        return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}
    return {"type": _normalize(device.split(":")[0]), "name": _normalize(device)}


@functools.lru_cache(maxsize=None)
def _dist_version(name: str) -> str:
    # metadata, not import: importing triton costs seconds and may need a driver
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def library_versions() -> dict:
    import torch
    return {"torch": torch.__version__, "triton": _dist_version("triton")}


def key_fields(problem) -> dict:
    check_problem(problem)
    return {
        "format": FIELDS_FORMAT,
        "kernel": dict(sorted(problem.key.items())),
        "shape": dict(sorted(shape_bucket(problem.shape).items())),
        "device": device_identity(problem.device),
        "versions": library_versions(),
    }


def key_of(fields: dict) -> str:
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


KEY_RE = re.compile(r"^[0-9a-f]{64}$")
