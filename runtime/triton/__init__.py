"""Helpers of generated Triton modules: device functions the kernels call
(`_mx_*`) and host-side work before a launch (which key blocks each query
block visits)."""
