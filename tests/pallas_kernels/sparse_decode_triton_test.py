"""Tests for pallas_kernels.sparse_decode_triton (jax-triton; GPU only).

The GPU class reruns every case of SparseDecodeTest with the Triton kernel
in place of the Pallas one (the fetch cases still exercise the Pallas fetch
kernel), plus each load option. The CPU class checks what needs no GPU:
the package imports without triton, and bad options or a missing jax-triton
give one clear line.
"""

import importlib
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tolerances
from tests.pallas_kernels import sparse_decode_test as base

sdt = importlib.import_module("pallas_kernels.sparse_decode_triton")
sd = importlib.import_module("pallas_kernels.sparse_decode")


@pytest.mark.gpu
class SparseDecodeTritonTest(base.SparseDecodeTest):
  INTERPRET = False

  def setUp(self):
    super().setUp()  # skips off the GPU
    try:
      import jax_triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      self.skipTest("jax-triton is not installed")

  def _decode(self, *args, **kwargs):
    return sdt.sparse_decode_triton(*args, **kwargs)

  @parameterized.parameters(
      dict(cache_modifier=".cg"), dict(cache_modifier=".ca"),
      dict(eviction_policy="evict_first"), dict(eviction_policy="evict_last"))
  def test_load_options(self, **options):
    args = base._inputs(9, b=3, k=2, g=16, p=8, c=64, d=128,
                        dtype="bfloat16")
    out = sdt.sparse_decode_triton(*args, 64, **options)
    ref = sd.sparse_decode_reference(*args, 64)
    np.testing.assert_allclose(base._f32(out), base._f32(ref),
                               **tolerances.tol("bfloat16"))


class SparseDecodeTritonCpuTest(absltest.TestCase):

  def test_bad_options_are_one_line_errors(self):
    args = base._inputs(1, b=1, k=2, g=4, p=2, c=16, d=32, dtype="float32")
    with self.assertRaisesRegex(ValueError, "cache_modifier='.cs'"):
      sdt.sparse_decode_triton(*args, 16, cache_modifier=".cs")
    with self.assertRaisesRegex(ValueError, "eviction_policy='evict'"):
      sdt.sparse_decode_triton(*args, 16, eviction_policy="evict")
    with self.assertRaisesRegex(ValueError, "set at most one"):
      sdt.sparse_decode_triton(*args, 16, cache_modifier=".cg",
                               eviction_policy="evict_first")
    with self.assertRaisesRegex(ValueError, r"P \* block_size"):
      sdt.sparse_decode_triton(*args[:4], args[4][..., :1], 16)

  def test_missing_jax_triton_is_one_clear_error(self):
    args = base._inputs(2, b=1, k=2, g=4, p=2, c=16, d=32, dtype="float32")
    with mock.patch.dict(sys.modules, {"jax_triton": None}):
      with self.assertRaisesRegex(ImportError, "needs jax-triton"):
        jax.block_until_ready(sdt.sparse_decode_triton(*args, 16))

  def test_package_imports_without_triton(self):
    # The kernel module is the only one that imports triton.
    src = open(sdt.__file__).read() + open(sd.__file__).read()
    self.assertNotIn("\nimport triton", src)
    self.assertNotIn("\nimport jax_triton", src)
    self.assertTrue(callable(jnp.asarray))


if __name__ == "__main__":
  absltest.main()
