"""Convolution helpers for generated modules (toeplitz strategy). Pure torch."""
