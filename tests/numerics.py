"""One tolerance table and one verbose allclose for every numerics test.

Results in a low-precision dtype are compared with the float64 oracle. A tolerance
is a few units of that dtype's rounding error: inputs are rounded once, the
probabilities are rounded before P @ V in fused kernels, and long fp32-accumulated
sums add little. Gradients sum over a whole key or query axis, so they get about
one more order of magnitude.
"""

from __future__ import annotations

import torch

# dtype -> (forward atol=rtol, gradient atol=rtol)
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),  # same math in another order: rounding near 1e-16 x length
    torch.float32: (2e-5, 2e-4),  # eps 1.2e-7; tl.dot in tf32 is disabled in tests
    torch.float16: (4e-3, 3e-2),  # eps 9.8e-4: four units, P rounded to fp16
    torch.bfloat16: (3e-2, 1e-1),  # eps 7.8e-3: four units, P rounded to bf16
}


def tolerance(dtype: torch.dtype, kind: str = "fwd") -> float:
    fwd, grad = TOLERANCES[dtype]
    return fwd if kind == "fwd" else grad


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype,
                 kind: str = "fwd", name: str = "tensor") -> None:
    """allclose with atol = rtol = tolerance(dtype, kind), in float64, and a useful message."""
    tol = tolerance(dtype, kind)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_mismatch = (a.isnan() != e.isnan()) | (a.isinf() != e.isinf())
    err = (a - e).abs()
    bad = (err > tol + tol * e.abs()) | nan_mismatch
    if bad.any():
        worst = int(torch.nan_to_num(err, nan=float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name} ({dtype}, {kind}, atol=rtol={tol:g}): {int(bad.sum())} of {a.numel()} "
            f"elements differ; max abs err {err.max().item():.3g} at {idx} "
            f"(got {a[idx].item():.6g}, expected {e[idx].item():.6g}); "
            f"NaN/Inf disagreements: {int(nan_mismatch.sum())}")
