"""Tests for pallas_kernels.sparse_decode_triton (jax-triton; GPU only).

The GPU class reruns every case of SparseDecodeTest with the Triton kernel
in place of the Pallas one (the fetch cases still exercise the Pallas fetch
kernel), adds a grid over B, G, bias, dtype and the split count, and checks
each load option. The CPU class checks what needs no GPU: the package
imports without triton, and bad options or a missing jax-triton give one
clear line.
"""

import importlib.util
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import pytest

from tests import tolerances
from tests.pallas_kernels import sparse_decode_test as base

sdt = importlib.import_module("pallas_kernels.sparse_decode_triton")
sd = importlib.import_module("pallas_kernels.sparse_decode")


def _grid():
  for b in (1, 3):
    for g in (1, 4, 16):
      for bias in (True, False):
        for dtype in ("float32", "bfloat16"):
          yield dict(testcase_name=f"b{b}_g{g}_bias{int(bias)}_{dtype}", b=b,
                     g=g, bias=bias, dtype=dtype)


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

  @parameterized.named_parameters(_grid())
  def test_grid_matches_reference(self, b, g, bias, dtype):
    # P = 5 slots of C = 16 (empty, full and partial ones); B = 1 splits
    # every slot into its own program, B = 3 into uneven splits of 3 + 2.
    args = base._inputs(b * 100 + g, b=b, k=2, g=g, p=5, c=16, d=32,
                        dtype=dtype, bias=bias)
    splits = None if b == 1 else sd.DecodeBlockSizes(num_splits=2)
    self.assertGreater(sd.num_decode_splits(
        b, 2, 5, splits or sd.DecodeBlockSizes())[0], 1)
    self._check(args, 16, block_sizes=splits)

  @parameterized.parameters(
      dict(cache_modifier=".cg"), dict(cache_modifier=".ca"),
      dict(eviction_policy="evict_first"), dict(eviction_policy="evict_last"),
      dict(cache_modifier=".cg", num_stages=1, dtype="float32"))
  def test_load_options(self, dtype="bfloat16", **options):
    args = base._inputs(9, b=3, k=2, g=16, p=8, c=64, d=128, dtype=dtype)
    out = sdt.sparse_decode_triton(*args, 64, **options)
    ref = sd.sparse_decode_reference(*args, 64)
    np.testing.assert_allclose(base._f32(out), base._f32(ref),
                               **tolerances.tol(dtype))


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
    # Pipelined (cp.async) loads would drop the option without a word.
    with self.assertRaisesRegex(ValueError, "num_stages=2 with a"):
      sdt.sparse_decode_triton(*args, 16, cache_modifier=".cg",
                               num_stages=2)
    with self.assertRaisesRegex(ValueError, r"P \* block_size"):
      sdt.sparse_decode_triton(*args[:4], args[4][..., :1], 16)

  def test_missing_jax_triton_is_one_clear_error(self):
    if importlib.util.find_spec("jax_triton") is not None:
      # A cached trace of these shapes would skip the import.
      self.skipTest("jax-triton is installed")
    args = base._inputs(2, b=1, k=2, g=4, p=2, c=16, d=32, dtype="float32")
    with mock.patch.dict(sys.modules, {"jax_triton": None}):
      with self.assertRaisesRegex(ImportError, "needs jax-triton") as cm:
        jax.block_until_ready(sdt.sparse_decode_triton(*args, 16))
    self.assertNotIn("\n", str(cm.exception))

  def test_package_imports_without_triton(self):
    # A fresh interpreter where importing triton or jax_triton fails: the
    # package and the wrapper still import (the kernel module is lazy).
    code = ("import sys; sys.modules['triton'] = None; "
            "sys.modules['jax_triton'] = None; import pallas_kernels; "
            "assert callable(pallas_kernels.sparse_decode_triton)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120,
                         check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])


if __name__ == "__main__":
  absltest.main()
