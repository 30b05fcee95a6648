"""Tests for pallas_kernels.block_sparse_attention: kernel vs reference.

`BlockSparseAttentionTest` runs the compiled (Triton) kernels and skips
without a GPU; `BlockSparseAttentionInterpretTest` runs the same grid in the
Pallas interpreter on CPU. On the GPU machine:

  NOSA_TEST_GPU=1 python -m pytest -q -m '' \
      tests/pallas_kernels/block_sparse_attention_test.py
"""

import functools
import importlib
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

# The module, for its list helpers (the package re-exports the function
# under the same name).
bsa = importlib.import_module("pallas_kernels.block_sparse_attention")

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


# name, B, T, K, G, D, C, mask density, bias, dtype, BlockSizes args
# (block_q, block_q_dq, block_q_dkv[, dkv_segment]).
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
    # dk/dv lists longer than a segment: 25 tiles of 4 tokens, segments of
    # 2 tiles, so busy blocks span many work items that add atomically.
    # (Tiles of tokens x G >= 16 rows, so the compiled class runs it too.)
    ("g4_segmented_dkv_f32", 1, 100, 2, 4, 16, 16, 0.4, True, np.float32,
     (4, 8, 4, 2)),
    # Every causal (tile, block) pair selected and one tile per segment:
    # the static bound on the work items is reached exactly.
    ("g2_segment1_dense_bf16", 1, 100, 1, 2, 16, 16, 1.0, True, _BF16,
     (8, 8, 8, 1)),
    # One-token tiles (16 rows with G = 16) and 3-tile segments.
    ("g16_tile1_bias_bf16", 1, 40, 2, 16, 16, 16, 0.6, True, _BF16,
     (1, 1, 2, 3)),
)


# The backward options (`fused_dq`, `transpose_bwd`) on their own shape
# grid: name, fused_dq, transpose_bwd, then the `_GRID` columns. T is never
# a multiple of C or of the tiles; GQA ratios 1/4/16; tiles of >= 16 rows
# (GPU-valid) and dk/dv segments of 2-3 tiles, so every (block, tile) pair's
# dq share in the fused kernel meets other items' atomic adds.
_BWD_SHAPES = (
    ("g1_bias_f32", 1, 45, 2, 1, 16, 16, 0.5, True, np.float32,
     (16, 16, 16, 2)),
    ("g4_nobias_bf16", 1, 77, 1, 4, 32, 16, 0.4, False, _BF16, (4, 4, 4, 2)),
    ("g16_bias_bf16", 1, 40, 2, 16, 16, 16, 0.6, True, _BF16, (1, 1, 2, 3)),
)
# The default backward is transposed and unfused; the others stay options.
_BWD_OPTIONS = (("untransposed", False, False), ("fused", True, False),
                ("transposed", False, True), ("fused_transposed", True, True))
# The kernel-vs-reference cases of the other three: the default's are
# test_forward_and_grads' grid (the same GQA ratios, ragged lengths, dtypes,
# one-token tiles and dk/dv segments) and test_full_fast_path (empty rows,
# segments).
_BWD_OTHER_OPTIONS = tuple(o for o in _BWD_OPTIONS if o[1:] != (False, True))
_BWD_GRID = tuple((f"{opt}_{shape[0]}", fused_dq, transpose_bwd, *shape[1:])
                  for opt, fused_dq, transpose_bwd in _BWD_OTHER_OPTIONS
                  for shape in _BWD_SHAPES)


class BlockSparseAttentionTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas Triton kernels need a GPU")

  def _kernel(self, mask, c, block_sizes=None, **options):
    bs = (None if block_sizes is None
          else pallas_kernels.BlockSizes(*block_sizes))
    return lambda q, k, v, bias: pallas_kernels.block_sparse_attention(
        q, k, v, bias, mask, c, block_sizes=bs, interpret=self.INTERPRET,
        **options)

  def _compare(self, q, k, v, bias, mask, c, cot, block_sizes=None,
               lowp_reference=False, **options):
    """Kernel vs reference: output and grads w.r.t. q, k, v (and bias).

    Element-wise `tolerances.tol` by default; with `lowp_reference`, the
    large-case criterion `tolerances.assert_close_to_reference` against
    the reference run in q's dtype as well as in fp32. `options` are the
    kernel's backward options (`fused_dq`, `transpose_bwd`).
    """
    kernel_fn = self._kernel(mask, c, block_sizes, **options)
    ref_fn = functools.partial(
        pallas_kernels.block_sparse_attention_reference, mask_BKTN=mask,
        block_size=c)
    # Differentiate w.r.t. the bias only when there is one.
    args = (q, k, v) if bias is None else (q, k, v, bias)
    kernel = lambda q, k, v, *b: kernel_fn(q, k, v, *(b or (None,)))
    ref = lambda q, k, v, *b: ref_fn(q, k, v, *(b or (None,)))
    out, grads = _out_and_grads(kernel, args, cot)
    want, want_grads = _out_and_grads(ref, args, cot)
    if lowp_reference:
      ref_lowp = lambda q, k, v, *b: ref_fn(q, k, v, *(b or (None,)),
                                            compute_dtype=q.dtype)
      lowp, lowp_grads = _out_and_grads(ref_lowp, args, cot)
    self.assertEqual(out.dtype, q.dtype)
    # Everything, the fp32 bias gradient included, is computed from q's
    # dtype, so q's dtype sets the tolerance.
    tol = tolerances.tol(q.dtype)
    f32 = lambda x: np.asarray(x, np.float32)
    names = ("out", "dq", "dk", "dv", "dbias")[:len(args) + 1]
    for i, name in enumerate(names):
      got, exp = (out, want) if i == 0 else (grads[i - 1], want_grads[i - 1])
      self.assertEqual(got.dtype, exp.dtype, name)
      self.assertTrue(np.all(np.isfinite(f32(got))), name)
      if lowp_reference:
        exp_lowp = lowp if i == 0 else lowp_grads[i - 1]
        tolerances.assert_close_to_reference(got, exp, exp_lowp,
                                             err_msg=name)
      else:
        np.testing.assert_allclose(f32(got), f32(exp), err_msg=name, **tol)

  @parameterized.named_parameters(*_GRID)
  def test_forward_and_grads(self, b, t, kh, g, d, c, density, with_bias,
                             dtype, block_sizes):
    q, k, v, bias, cot = _inputs(t + g, b, t, kh * g, kh, d, dtype,
                                 with_bias)
    mask = _mask(t + g, b, kh, t, c, density)
    self._compare(q, k, v, bias, mask, c, cot, block_sizes)

  @parameterized.named_parameters(*_BWD_GRID)
  def test_backward_options(self, fused_dq, transpose_bwd, b, t, kh, g, d, c,
                            density, with_bias, dtype, block_sizes):
    q, k, v, bias, cot = _inputs(t + g, b, t, kh * g, kh, d, dtype,
                                 with_bias)
    mask = _mask(t + g, b, kh, t, c, density)
    self._compare(q, k, v, bias, mask, c, cot, block_sizes,
                  fused_dq=fused_dq, transpose_bwd=transpose_bwd)

  @parameterized.named_parameters(*_BWD_OTHER_OPTIONS)
  def test_backward_options_empty_rows_and_dense(self, fused_dq,
                                                 transpose_bwd):
    # Tokens with no selected block (zero output, zero dq rows) next to a
    # fully selected group, with 2-tile segments: a second KV head whose
    # every causal (tile, block) pair is in the lists.
    b, t, kh, g, d, c = 1, 50, 2, 4, 16, 16
    q, k, v, bias, cot = _inputs(11, b, t, kh * g, kh, d, np.float32, True)
    mask = np.array(_mask(11, b, kh, t, c, 0.5))
    mask[:, 0, np.arange(t) % 3 == 0] = False
    mask[:, 1] = True
    self._compare(q, k, v, bias, jnp.asarray(mask), c, cot, (4, 4, 4, 2),
                  fused_dq=fused_dq, transpose_bwd=transpose_bwd)

  @parameterized.named_parameters(*_BWD_OPTIONS)
  @pytest.mark.slow  # inside: the generated cases copy the mark
  def test_backward_options_nosa_like(self, fused_dq, transpose_bwd):
    # A bigger NOSA-like case: sink + window + random blocks, G = 16,
    # D = 64, bf16, 64-token blocks, sink lists over many segments.
    b, t, kh, g, d, c = 1, 300, 2, 16, 64, 64
    q, k, v, bias, cot = _inputs(13, b, t, kh * g, kh, d, _BF16, True)
    mask = _nosa_like_mask(13, b, kh, t, c, sink=1, window=2, extra=1)
    self._compare(q, k, v, bias, mask, c, cot, (4, 2, 2, 8),
                  lowp_reference=True, fused_dq=fused_dq,
                  transpose_bwd=transpose_bwd)

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
    # The sink block's dk/dv list (all 512 tiles) spans 8 work items.
    # Compared as a whole against the reference's own bf16 rounding: with
    # 2048 keys a few dk entries are near-zero sums that no element-wise
    # rtol covers (tests/tolerances.py).
    self._compare(q, k, v, bias, mask, c, cot, lowp_reference=True)

  @parameterized.product(dtype=(_BF16, np.float32),
                          full_fast_path=(True, False))
  def test_full_fast_path(self, dtype, full_fast_path):
    # Sink + window + random extra blocks with 4-token tiles: most (tile,
    # block) pairs are full and take the unmasked branch; the tiles' own
    # blocks (causal inside) and blocks only some tokens picked do not. A
    # wrong full-pair test (any token instead of all, or the causal bound
    # off by one) attends keys it must not and fails the comparison. Every
    # third token of one KV head selects nothing (all-masked rows).
    b, t, kh, g, d, c = 1, 150, 2, 4, 16, 16
    q, k, v, bias, cot = _inputs(17, b, t, kh * g, kh, d, dtype, True)
    mask = np.array(_nosa_like_mask(17, b, kh, t, c, sink=1, window=3,
                                    extra=2))
    mask[:, 1, np.arange(t) % 3 == 0] = False
    self._compare(q, k, v, bias, jnp.asarray(mask), c, cot, (4, 4, 4, 2),
                  full_fast_path=full_fast_path)

  def test_segmented_nosa_like(self):
    # The sink block is in all 25 tiles' unions, the window blocks in many:
    # with 3-tile segments their lists become many atomically added items.
    b, t, kh, g, d, c = 1, 100, 2, 4, 16, 16
    q, k, v, bias, cot = _inputs(5, b, t, kh * g, kh, d, np.float32, True)
    mask = _nosa_like_mask(5, b, kh, t, c, sink=1, window=2, extra=1)
    self._compare(q, k, v, bias, mask, c, cot, block_sizes=(4, 4, 4, 3))

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
    with self.assertRaisesRegex(ValueError, "dkv_segment"):
      fn(q, k, v, bias, mask, 16, interpret=self.INTERPRET,
         block_sizes=pallas_kernels.BlockSizes(dkv_segment=-1))
    if not self.INTERPRET:
      with self.assertRaisesRegex(ValueError, "block_size"):
        fn(q, k, v, bias, _mask(0, 1, 2, 20, 8, 1.0), 8)


class BlockSparseAttentionInterpretTest(BlockSparseAttentionTest):
  INTERPRET = True


class BlockSparseAttentionListsTest(parameterized.TestCase):
  """The XLA-side work lists, and the Triton lowering (no GPU needed)."""

  @parameterized.parameters(1, 3, 8)
  def test_dkv_work_items_partition_the_lists(self, segment):
    rng = np.random.default_rng(segment)
    cnt_XN = rng.integers(0, 9, size=(3, 7)).astype(np.int32)
    cnt_XN[0] = 0  # a (b, k) with no items at all
    need = int(np.max(np.sum(-(-cnt_XN // segment), axis=1)))
    blk, start, cnt = map(np.asarray, bsa._dkv_work_items(
        jnp.asarray(cnt_XN), segment, need + 2))
    for x in range(cnt_XN.shape[0]):
      covered = [[] for _ in range(cnt_XN.shape[1])]
      for w in range(blk.shape[1]):
        self.assertBetween(cnt[x, w], 0, segment)
        covered[blk[x, w]].extend(range(start[x, w], start[x, w] + cnt[x, w]))
      for j, entries in enumerate(covered):
        self.assertEqual(entries, list(range(cnt_XN[x, j])), (x, j))

  @parameterized.parameters((100, 16, 4, 1), (100, 16, 2, 3), (77, 32, 8, 5))
  def test_dkv_item_bound_is_reached_by_dense_masks(self, t, c, bq, segment):
    n = math.ceil(t / c)
    mask = jnp.ones((1, 1, math.ceil(t / bq) * bq, n), bool)
    mask = mask.at[:, :, t:].set(False)  # padded tokens select nothing
    tiles, cnt = bsa._compact(
        bsa._tile_unions(mask, bq, c).transpose(0, 1, 3, 2))
    del tiles
    used = int(np.sum(-(-np.asarray(cnt) // segment)))
    self.assertEqual(used, bsa._dkv_num_items(t, n, c, bq, segment))

  def test_compact_orders_members_per_row(self):
    member = np.random.default_rng(0).random((2, 3, 5, 40)) < 0.3
    idx, cnt = bsa._compact(jnp.asarray(member))
    idx, cnt = np.asarray(idx).reshape(-1, 40), np.asarray(cnt).reshape(-1)
    for m, row in enumerate(member.reshape(-1, 40)):
      want = np.flatnonzero(row)
      self.assertEqual(cnt[m], want.size)
      np.testing.assert_array_equal(idx[m, :want.size], want)

  def test_compact_traces_past_2_31_entries(self):
    """The offload issue's 128k prefill at batch 16: B K A Z = 2^31 once
    overflowed a flat int32 scatter index while tracing. Shapes only."""
    member = jax.ShapeDtypeStruct((16, 2, 2048, 1 << 16), jnp.bool_)
    idx, cnt = jax.eval_shape(bsa._compact, member)
    self.assertEqual(idx.shape, (32, 2048, 1 << 16))
    self.assertEqual(cnt.shape, (32, 2048))

  @parameterized.named_parameters(*_BWD_OPTIONS)
  def test_lowers_to_triton(self, fused_dq, transpose_bwd):
    """Triton lowering of all the kernels for an abstract H100."""
    b, t, kh, g, d, c = 1, 256, 2, 16, 128, 64
    q, k, v, bias, cot = _inputs(0, b, t, kh * g, kh, d, _BF16, True)
    mask = _nosa_like_mask(0, b, kh, t, c, sink=1, window=2, extra=1)
    fn = lambda q, k, v, bias: pallas_kernels.block_sparse_attention(
        q, k, v, bias, mask, c,
        block_sizes=pallas_kernels.BlockSizes(dkv_segment=4),
        fused_dq=fused_dq, transpose_bwd=transpose_bwd)
    run = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cot))
    dev = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
      text = run.trace(q, k, v, bias).lower(
          lowering_platforms=("cuda",)).as_text()
    for name in ("fwd", "dkv"):
      self.assertIn(f"block_sparse_attention_{name}", text)
    # The fused dk/dv kernel computes dq: no dq kernel.
    self.assertEqual("block_sparse_attention_dq" in text, not fused_dq)


if __name__ == "__main__":
  absltest.main()
