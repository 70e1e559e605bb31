"""One tolerance table and one verbose allclose for every numerics test.

Results in a low-precision dtype are compared with the float64 oracle. A tolerance
is a few units of that dtype's rounding error: inputs are rounded once, the
probabilities are rounded before P @ V in fused kernels, and long fp32-accumulated
sums add little. Gradients sum over a whole key or query axis, so they get about
one more order of magnitude.

The rel-pos table gradients (kind "table_grad") are sums over thousands of queries of
terms that cancel (each query's dS sums to zero over its keys): an element's rounding
error follows the size of its terms, not of the sum, so their atol is the gradient
tolerance times the tensor's RMS (where it is above 1: a table of one coordinate has an
exactly zero gradient, its terms are O(1)). At the MViTv2-S block shapes (blocks 0, 1, 3
and 14, batch 2) the plain eager computation in the same dtype (CPU, torch 2.13) misses
the elementwise bound by 4-14x (fp16) and 8-18x (bf16) at near-zero elements, and uses at
most 0.36 (fp16) and 0.80 (bf16) of this one (`test_table_grad_tolerance_is_what_plain_eager_attains`);
a wrong or missing term is off by O(RMS) and still fails.
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
    """atol = rtol for "fwd", "grad" or "table_grad" (the gradient's, see the module doc)."""
    if kind not in ("fwd", "grad", "table_grad"):
        raise ValueError(f"unknown tolerance kind {kind!r}")
    fwd, grad = TOLERANCES[dtype]
    return fwd if kind == "fwd" else grad


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype,
                 kind: str = "fwd", name: str = "tensor") -> None:
    """allclose with rtol = tolerance(dtype, kind) and atol the same (times RMS(expected), if
    above 1, for kind "table_grad"), in float64, and a useful message."""
    tol = tolerance(dtype, kind)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    atol = tol * (max(1.0, e.square().mean().sqrt().item()) if kind == "table_grad" else 1.0)
    nan_mismatch = (a.isnan() != e.isnan()) | (a.isinf() != e.isinf())
    err = (a - e).abs()
    bad = (err > atol + tol * e.abs()) | nan_mismatch
    if bad.any():
        worst = int(torch.nan_to_num(err, nan=float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name} ({dtype}, {kind}, atol={atol:.3g}, rtol={tol:g}): {int(bad.sum())} of {a.numel()} "
            f"elements differ; max abs err {err.max().item():.3g} at {idx} "
            f"(got {a[idx].item():.6g}, expected {e[idx].item():.6g}); "
            f"NaN/Inf disagreements: {int(nan_mismatch.sum())}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius, float64)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    return float((a - e).norm() / e.norm().clamp_min(torch.finfo(torch.float64).tiny))


def assert_no_worse(actual: torch.Tensor, baseline: torch.Tensor, expected: torch.Tensor, *,
                    dtype: torch.dtype, name: str = "tensor", factor: float = 1.5) -> None:
    """`actual` is at most `factor` times further from the float64 `expected` than `baseline`,
    the plain eager computation in the same `dtype`, in relative norm (plus one unit of dtype's
    rounding, where the baseline happens to be exact).

    For results whose error is set by what the computation rounds by design, not by the
    implementation: gradients of a block under autocast, whose bf16 matmuls and max-pool ties
    put them 10-25% off the float64 ones elementwise at MViTv2-S sizes; SDPA's bias, materialized
    in the input dtype. A wrong index or a missing term is off by O(1) and fails.
    """
    err, base = relative_error(actual, expected), relative_error(baseline, expected)
    bound = factor * base + torch.finfo(dtype).eps
    if not err <= bound:
        raise AssertionError(f"{name} ({dtype}): relative error {err:.3g} > {factor} x {base:.3g} "
                             f"(plain eager, same dtype) + eps = {bound:.3g}")
