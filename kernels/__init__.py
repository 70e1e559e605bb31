"""Triton kernels of mvit-fast, imported as `mvit_fast.kernels`.

Only jit kernels and their launchers live here: no autograd, modules or tests.
"""
