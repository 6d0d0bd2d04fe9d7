"""Triton's CPU interpreter (TRITON_INTERPRET=1) computes bf16 dots on the
raw bits of their operands, which gives wrong numbers; a GPU's tensor cores
take bf16 as it is. For the tests and the benchmarks' dry runs only: a
replacement of the interpreter's dot that upcasts bf16 operands to float32
first. Generated modules never import this."""


def bf16_dots_patch():
    """(class, attribute, replacement) for setattr / monkeypatch.setattr:
    the interpreter's create_dot with bf16 operands upcast."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def up(x):
        if x.dtype == tl.bfloat16:
            data = interp._convert_float(x.data, tl.bfloat16, tl.float32, None)
            return interp.TensorHandle(data.view(np.float32).reshape(x.data.shape), tl.float32)
        return x

    def create_dot(self, a, b, d, *rest):
        return original(self, up(a), up(b), d, *rest)
    return interp.InterpreterBuilder, "create_dot", create_dot
