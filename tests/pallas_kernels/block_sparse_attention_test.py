"""Tests for pallas_kernels.block_sparse_attention: kernel vs reference.

`BlockSparseAttentionTest` runs the compiled (Triton) kernels and skips
without a GPU; `BlockSparseAttentionInterpretTest` runs the same grid in the
Pallas interpreter on CPU. On the GPU machine:

  NOSA_TEST_GPU=1 python -m pytest -q -m '' \
      tests/pallas_kernels/block_sparse_attention_test.py
"""

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels
from tests import tolerances

_BF16 = ml_dtypes.bfloat16


def _inputs(seed, b, t, h, kh, d, dtype, with_bias):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in
             ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))
  bias = (jnp.asarray(rng.normal(size=(b, t, kh)), jnp.float32)
          if with_bias else None)
  cot = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
  return q, k, v, bias, cot


def _mask(seed, b, kh, t, c, density):
  """[B, K, T, N]: each block with prob `density` (future ones too, which
  the causal mask must ignore), always the query's own block; density >= 1
  selects every block (dense causal attention)."""
  n = math.ceil(t / c)
  rng = np.random.default_rng(seed + 1000)
  mask = rng.random((b, kh, t, n)) < density
  mask[:, :, np.arange(t), np.arange(t) // c] = True
  return jnp.asarray(mask)


def _nosa_like_mask(seed, b, kh, t, c, sink, window, extra):
  """Sink + local window + `extra` random past blocks per token."""
  n = math.ceil(t / c)
  rng = np.random.default_rng(seed)
  own = np.arange(t) // c
  blocks = np.arange(n)
  mask = (blocks[None, :] < sink) | (
      (blocks[None, :] <= own[:, None]) &
      (blocks[None, :] > own[:, None] - window))
  mask = np.broadcast_to(mask, (b, kh, t, n)).copy()
  pick = rng.random((b, kh, t, n)) < extra / n
  mask |= pick & (blocks[None, None, None, :] <= own[None, None, :, None])
  return jnp.asarray(mask)


def _out_and_grads(fn, args, cot):
  """fn(*args) and the grads of sum(fn(*args) * cot), in one jit."""

  @jax.jit
  def run(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cot)

  return run(*args)


# name, B, T, K, G, D, C, mask density, bias, dtype, BlockSizes args.
_GRID = (
    ("g1_dense_bias_f32", 1, 45, 2, 1, 16, 16, 1.0, True, np.float32, None),
    ("g4_sparse_bias_bf16", 2, 77, 1, 4, 32, 16, 0.4, True, _BF16, None),
    ("g16_sparse_nobias_f32", 1, 40, 2, 16, 16, 16, 0.5, False, np.float32,
     None),
    ("g16_dense_bias_bf16", 1, 70, 1, 16, 16, 16, 1.0, True, _BF16, None),
    # Several tiles per kernel, each kernel tiled differently.
    ("g4_small_tiles_f32", 1, 100, 2, 4, 16, 16, 0.4, True, np.float32,
     (4, 8, 16)),
    # G and D not powers of 2: padded in the wrapper.
    ("g3_d24_padded_f32", 1, 33, 2, 3, 24, 16, 0.5, True, np.float32, None),
    ("g1_sparse_nobias_bf16", 1, 90, 1, 1, 16, 16, 0.3, False, _BF16,
     (16, 16, 16)),
    ("g8_sparse_bias_f32", 2, 60, 2, 8, 16, 16, 0.3, True, np.float32,
     (2, 4, 8)),
)


class BlockSparseAttentionTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas Triton kernels need a GPU")

  def _kernel(self, mask, c, block_sizes=None):
    bs = (None if block_sizes is None
          else pallas_kernels.BlockSizes(*block_sizes))
    return lambda q, k, v, bias: pallas_kernels.block_sparse_attention(
        q, k, v, bias, mask, c, block_sizes=bs, interpret=self.INTERPRET)

  def _compare(self, q, k, v, bias, mask, c, cot, block_sizes=None):
    """Kernel vs reference: output and grads w.r.t. q, k, v (and bias)."""
    kernel_fn = self._kernel(mask, c, block_sizes)
    ref_fn = functools.partial(
        pallas_kernels.block_sparse_attention_reference, mask_BKTN=mask,
        block_size=c)
    # Differentiate w.r.t. the bias only when there is one.
    args = (q, k, v) if bias is None else (q, k, v, bias)
    kernel = lambda q, k, v, *b: kernel_fn(q, k, v, *(b or (None,)))
    ref = lambda q, k, v, *b: ref_fn(q, k, v, *(b or (None,)))
    out, grads = _out_and_grads(kernel, args, cot)
    want, want_grads = _out_and_grads(ref, args, cot)
    self.assertEqual(out.dtype, q.dtype)
    # Everything, the fp32 bias gradient included, is computed from q's
    # dtype, so q's dtype sets the tolerance.
    tol = tolerances.tol(q.dtype)
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(out), f32(want), err_msg="out", **tol)
    names = ("dq", "dk", "dv", "dbias")[:len(args)]
    for name, got, exp in zip(names, grads, want_grads, strict=True):
      self.assertEqual(got.dtype, exp.dtype, name)
      self.assertTrue(np.all(np.isfinite(f32(got))), name)
      np.testing.assert_allclose(f32(got), f32(exp), err_msg=name, **tol)

  @parameterized.named_parameters(*_GRID)
  def test_forward_and_grads(self, b, t, kh, g, d, c, density, with_bias,
                             dtype, block_sizes):
    q, k, v, bias, cot = _inputs(t + g, b, t, kh * g, kh, d, dtype,
                                 with_bias)
    mask = _mask(t + g, b, kh, t, c, density)
    self._compare(q, k, v, bias, mask, c, cot, block_sizes)

  def test_empty_rows_give_zero(self):
    # Tokens that select no block attend nothing: output 0, no NaN in the
    # gradients (a NOSA selection always holds the own block, but the
    # kernel does not rely on it).
    b, t, kh, g, d, c = 1, 50, 1, 4, 16, 16
    q, k, v, bias, cot = _inputs(7, b, t, kh * g, kh, d, np.float32, True)
    mask = np.array(_mask(7, b, kh, t, c, 0.5))
    empty = np.arange(t) % 3 == 0
    mask[:, :, empty] = False
    mask = jnp.asarray(mask)
    out = self._kernel(mask, c)(q, k, v, bias)
    np.testing.assert_array_equal(np.asarray(out)[:, empty], 0.0)
    self._compare(q, k, v, bias, mask, c, cot)

  @pytest.mark.gpu
  def test_large_nosa_like(self):
    if self.INTERPRET:
      self.skipTest("GPU-sized case; compiled kernels only")
    b, t, kh, g, d, c = 1, 2048, 2, 16, 128, 64
    q, k, v, bias, cot = _inputs(3, b, t, kh * g, kh, d, _BF16, True)
    mask = _nosa_like_mask(3, b, kh, t, c, sink=1, window=4, extra=8)
    self._compare(q, k, v, bias, mask, c, cot)

  def test_shape_errors(self):
    q, k, v, bias, _ = _inputs(0, 1, 20, 4, 2, 16, np.float32, True)
    mask = _mask(0, 1, 2, 20, 16, 1.0)
    fn = pallas_kernels.block_sparse_attention
    with self.assertRaisesRegex(ValueError, "k_BTKD"):
      fn(q, k[:, :10], v, bias, mask, 16, interpret=self.INTERPRET)
    with self.assertRaisesRegex(ValueError, "v_BTKD"):
      fn(q, k, v[..., :8], bias, mask, 16, interpret=self.INTERPRET)
    with self.assertRaisesRegex(ValueError, "bias_BTK"):
      fn(q, k, v, bias[:, :5], mask, 16, interpret=self.INTERPRET)
    with self.assertRaisesRegex(ValueError, "mask_BKTN"):
      fn(q, k, v, bias, mask[..., :1], 16, interpret=self.INTERPRET)
    if not self.INTERPRET:
      with self.assertRaisesRegex(ValueError, "block_size"):
        fn(q, k, v, bias, _mask(0, 1, 2, 20, 8, 1.0), 8)


class BlockSparseAttentionInterpretTest(BlockSparseAttentionTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
