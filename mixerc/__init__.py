"""mixerc: a compiler for sequence mixers written as structured-matrix expressions.

    import mixerc
    m = mixerc.compile("ssd")                 # a path, a stdlib name, or source text
    y = m(x=x, dt=dt, B=B, C=C, A_log=A_log, dt_bias=dt_bias, D=D)
    print(m.explain())
"""

__version__ = "0.1.0"  # before the imports below: the JIT cache keys on it

from .api import CompiledMixer, compile, stdlib_names  # noqa: A004,E402
from .errors import (MixerDecodeError, MixerError, MixerNameError,  # noqa: E402
                     MixerShapeError, MixerSyntaxError, MixerTypeError, MixerUnsupportedError,
                     MixerValueError)

__all__ = ["compile", "CompiledMixer", "stdlib_names", "MixerError", "MixerSyntaxError",
           "MixerNameError", "MixerTypeError", "MixerShapeError", "MixerValueError",
           "MixerDecodeError", "MixerUnsupportedError", "__version__"]
