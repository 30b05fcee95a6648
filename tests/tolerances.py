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
