"""Numerical tolerances, set here and only here (never loosened silently)."""

import ml_dtypes
import numpy as np

# (atol, rtol) per dtype for comparing two computations of the same quantity.
TOL = {
    np.dtype("float32"): (2e-5, 2e-5),
    np.dtype(ml_dtypes.bfloat16): (2e-2, 2e-2),
    np.dtype("float16"): (2e-3, 2e-3),
}


def tol(dtype) -> dict:
  """`np.testing.assert_allclose` keyword arguments for `dtype`."""
  atol, rtol = TOL[np.dtype(dtype)]
  return {"atol": atol, "rtol": rtol}


def assert_close_to_reference(got, want, want_lowp, *, atol_floor=1e-3,
                              err_msg=""):
  """Second criterion, for large low-precision (bf16) kernel comparisons.

  `want` is the fp32 reference and `want_lowp` the same reference computed
  with its inputs and every intermediate in the kernel's dtype. Passes when

    max|got - want| <= 2 * max|want_lowp - want| + atol_floor,

  i.e. the kernel may be at most twice as far from the exact result as the
  reference itself is when it runs in bf16. Why not element-wise `tol`: the
  kernels round the softmax probabilities (and ds) to bf16 before the
  matmuls, as FlashAttention does, and a gradient that is a long sum of such
  terms can be near zero while its rounding error is not, so any rtol fails
  on a few elements of a large case whose error as a whole is as small as
  bf16 allows. Small cases keep the element-wise `tol`; `atol_floor` is the
  slack where both computations are (nearly) exact, e.g. all-zero outputs.
  """
  got, want, want_lowp = (np.asarray(x, np.float32)
                          for x in (got, want, want_lowp))
  if not got.shape == want.shape == want_lowp.shape:
    raise AssertionError(f"{err_msg}: shapes {got.shape}, {want.shape}, "
                         f"{want_lowp.shape} differ")
  if not np.all(np.isfinite(got)):
    raise AssertionError(f"{err_msg}: non-finite values")
  err = float(np.max(np.abs(got - want), initial=0.0))
  lowp_err = float(np.max(np.abs(want_lowp - want), initial=0.0))
  if err > 2 * lowp_err + atol_floor:
    raise AssertionError(
        f"{err_msg}: max|got - want| = {err:.4g} > 2 * max|want_lowp - want| "
        f"+ {atol_floor:g} = {2 * lowp_err + atol_floor:.4g}")
