"""Autotuner: config spaces, timers, cache backends (local dir, Redis).

The interface a backend implements is `problem.TuningProblem`; the entry points
are `tune`, `lookup` and `config_for` (tuner.py). See README "Autotuning".
"""

from .problem import TuningProblem, bucket_T, shape_bucket
from .space import Choice, ConfigSpace
from .tuner import TuneResult, autotune_mode, config_for, lookup, tune

__all__ = ["Choice", "ConfigSpace", "TuningProblem", "TuneResult", "tune", "lookup", "config_for",
           "autotune_mode", "bucket_T", "shape_bucket"]
