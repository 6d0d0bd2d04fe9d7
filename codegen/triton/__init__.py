"""The Triton backend: the kernel plan's terms as Triton kernels where a
template exists (softmax attention today), the rest through the torch
backend's code in the same generated module."""
