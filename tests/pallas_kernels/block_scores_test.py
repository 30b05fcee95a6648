"""Tests for pallas_kernels.block_scores (NOSA_SPEC.md §2.3 steps 2-4)."""

import dataclasses
import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nosa_jax import config as config_lib
from nosa_jax import selection
from tests import tolerances

# The package re-exports the function `block_scores`, which shadows the
# submodule attribute; take the module itself.
bs = importlib.import_module("pallas_kernels.block_scores")

_K = 2  # KV heads.
# (block_size, compress_kernel, compress_stride, T). "paper": 64/32/16 with
# T = 200 (4 blocks, the last one without a complete window: -inf). "small":
# 16/8/4 with T = 300 (19 blocks: two column tiles of 16, and query tiles
# whose second tile is past every visible window).
_GEOMETRIES = {"paper": (64, 32, 16, 200), "small": (16, 8, 4, 300)}


def _cfg(geometry):
  c, kernel, stride, _ = _GEOMETRIES[geometry]
  return dataclasses.replace(
      config_lib.SparseConfig(variant="nosa"), block_size=c,
      compress_kernel=kernel, compress_stride=stride)


def _inputs(seed, *, t, g, kernel, stride, dtype, d=16):
  rng = np.random.default_rng(seed)
  # Scale 2: peaked softmaxes, so a wrong max or denominator shows.
  q = jnp.asarray(2 * rng.normal(size=(1, t, _K * g, d)), dtype)
  k = jnp.asarray(rng.normal(size=(1, t, _K, d)), dtype)
  return q, selection.compress_keys(k, kernel, stride)


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def _assert_scores_equal(got, want, **tol):
  """Same -inf pattern (blocks without a window) and close finite values."""
  got, want = _f32(got), _f32(want)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), fin)
  np.testing.assert_allclose(got[fin], want[fin], **tol)


def _grid():
  for geometry in _GEOMETRIES:
    for g in (1, 4, 16):
      for dtype in ("float32", "bfloat16"):
        yield dict(testcase_name=f"{geometry}_g{g}_{dtype}",
                   geometry=geometry, g=g, dtype=dtype)


# Kernel and reference both compute in fp32 from the same (possibly bf16)
# inputs, so the fp32 tolerance applies to every input dtype.
_TOL = tolerances.tol("float32")


class BlockScoresTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Pallas Triton kernels need a GPU")

  def _scores(self, q, kbar, pos, n, geometry, **kwargs):
    c, kernel, stride, _ = _GEOMETRIES[geometry]
    return bs.block_scores(q, kbar, pos, n, c, kernel, stride,
                           interpret=self.INTERPRET, **kwargs)

  @parameterized.named_parameters(_grid())
  def test_matches_reference_and_selection(self, geometry, g, dtype):
    c, kernel, stride, t = _GEOMETRIES[geometry]
    q, kbar = _inputs(g, t=t, g=g, kernel=kernel, stride=stride, dtype=dtype)
    n = selection.num_blocks(t, c)
    pos = jnp.arange(t)
    got = self._scores(q, kbar, pos, n, geometry)
    ref = bs.block_scores_reference(q, kbar, pos, n, c, kernel, stride)
    lib = jax.jit(selection.query_aware_scores, static_argnums=(3, 4))(
        q, kbar, pos, _cfg(geometry), n)
    self.assertEqual(got.shape, (1, _K, t, n))
    self.assertEqual(got.dtype, jnp.float32)
    _assert_scores_equal(ref, lib, **_TOL)
    _assert_scores_equal(got, ref, **_TOL)
    if geometry == "paper":  # block 3 (tokens 192..199) holds no window
      self.assertTrue(np.all(np.isneginf(_f32(got[..., 3]))))

  @parameterized.parameters(
      dict(g=1, block_q=16, block_n=32),
      dict(g=4, block_q=4, block_n=16),
      dict(g=4, block_q=32, block_n=16),
      dict(g=16, block_q=2, block_n=32),
  )
  def test_tilings_agree(self, g, block_q, block_n):
    c, kernel, stride, t = _GEOMETRIES["small"]
    q, kbar = _inputs(7, t=t, g=g, kernel=kernel, stride=stride,
                      dtype="float32")
    n = selection.num_blocks(t, c)
    pos = jnp.arange(t)
    got = self._scores(q, kbar, pos, n, "small",
                       block_sizes=bs.ScoreBlockSizes(block_q, block_n))
    ref = bs.block_scores_reference(q, kbar, pos, n, c, kernel, stride)
    _assert_scores_equal(got, ref, **_TOL)

  def test_arbitrary_positions(self):
    # A query chunk of the chunked selection (positions 100..), and the
    # locality penalty's leading row (position -1: no visible window).
    c, kernel, stride, t = _GEOMETRIES["small"]
    q, kbar = _inputs(3, t=t, g=4, kernel=kernel, stride=stride,
                      dtype="float32")
    n = selection.num_blocks(t, c)
    for pos in (100 + jnp.arange(40), jnp.arange(40) - 1,
                jnp.asarray(np.random.default_rng(0).permutation(t)[:40])):
      got = self._scores(q[:, :40], kbar, pos, n, "small")
      ref = bs.block_scores_reference(q[:, :40], kbar, pos, n, c, kernel,
                                      stride)
      _assert_scores_equal(got, ref, **_TOL)
    # Row 0 sees no window: 0 for every block that has one, -inf elsewhere.
    got = _f32(self._scores(q[:, :40], kbar, jnp.arange(40) - 1, n, "small"))
    self.assertTrue(np.all((got[:, :, 0] == 0) | np.isneginf(got[:, :, 0])))

  def test_no_complete_window(self):
    q, kbar = _inputs(0, t=20, g=4, kernel=32, stride=16, dtype="float32")
    self.assertEqual(kbar.shape[1], 0)
    got = self._scores(q, kbar, jnp.arange(20), 1, "paper")
    self.assertTrue(np.all(np.isneginf(_f32(got))))

  def test_bf16_dot(self):
    # precision="bf16" rounds q and kbar to bf16 before the dot: at most
    # twice as far from the fp32 result as the reference on rounded inputs.
    c, kernel, stride, t = _GEOMETRIES["small"]
    q, kbar = _inputs(5, t=t, g=4, kernel=kernel, stride=stride,
                      dtype="float32")
    n = selection.num_blocks(t, c)
    pos = jnp.arange(t)
    ref = bs.block_scores_reference(q, kbar, pos, n, c, kernel, stride)
    rnd = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    ref_lowp = bs.block_scores_reference(rnd(q), rnd(kbar), pos, n, c,
                                         kernel, stride)
    got = self._scores(q, kbar, pos, n, "small", precision="bf16")
    np.testing.assert_array_equal(np.isneginf(_f32(got)),
                                  np.isneginf(_f32(ref)))
    fin = lambda x: jnp.where(jnp.isfinite(ref), x, 0.0)
    tolerances.assert_close_to_reference(fin(got), fin(ref), fin(ref_lowp),
                                         err_msg="bf16 dot")

  def test_selection_wiring(self):
    # selection.query_aware_scores_pallas: same scores, same top-k picks.
    c, kernel, stride, t = _GEOMETRIES["small"]
    cfg = dataclasses.replace(_cfg("small"), implementation="pallas",
                              window_blocks=2, query_topk_blocks=6,
                              topk_blocks=8)
    q, kbar = _inputs(11, t=t, g=4, kernel=kernel, stride=stride,
                      dtype="bfloat16")
    n = selection.num_blocks(t, c)
    pos = jnp.arange(t)
    # Off the GPU the wrapper picks interpret mode itself. Both sides run
    # their dots at "highest": the wrapper's tf32 default and XLA's default
    # GPU precision round differently (3e-4 apart on the H100, 2026-11-24),
    # and this test checks the wiring, not the precision.
    tuning = {"block_sizes": bs.ScoreBlockSizes(block_n=16),
              "precision": "highest"}
    got = selection.query_aware_scores_pallas(q, kbar, pos, cfg, n,
                                              tuning=tuning)
    with jax.default_matmul_precision("highest"):
      want = selection.query_aware_scores(q, kbar, pos, cfg, n)
    _assert_scores_equal(got, want, **_TOL)
    bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, t, _K)),
                       jnp.float32)
    se = selection.query_agnostic_scores(bias, cfg, n)
    idx_got = selection.select_from_scores(got, se, pos, cfg)[0]
    idx_want = selection.select_from_scores(want, se, pos, cfg)[0]
    np.testing.assert_array_equal(np.asarray(idx_got), np.asarray(idx_want))

  def _agreement(self, t, g, d, cfg, seed, tuning=None):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(1, t, g, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, t, 1, d)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, t, 1)), jnp.float32)
    stats = jax.jit(lambda q, k, b: selection.score_path_agreement(
        q, k, b, cfg, tuning=tuning))(q, k, bias)
    return {name: float(x) for name, x in stats.items()}

  def test_selection_agreement(self):
    # The Pallas and XLA scores select alike up to picks within 2 eps of
    # the phase-1 boundary (eps: the row's largest score difference), and
    # eps is rounding: a wrong score (a bug, not a tie) fails either bound.
    # G = 16 as NOSA; 20 blocks of 16 in two query chunks.
    cfg = dataclasses.replace(_cfg("small"), window_blocks=2,
                              query_topk_blocks=6, topk_blocks=9,
                              query_chunk=160)
    # Both sides at fp32 ("highest": the tests' XLA default; the kernel's
    # tf32 default would be ~1e-4 from it on the GPU).
    stats = self._agreement(320, 16, 16, cfg, seed=2, tuning={
        "block_sizes": bs.ScoreBlockSizes(block_n=16),
        "precision": "highest"})
    self.assertEqual(stats["rows"], 320)
    self.assertLessEqual(stats["max_eps"], _TOL["atol"])
    self.assertLessEqual(stats["worst_gap_over_eps"], 2.0)

  @pytest.mark.gpu
  def test_selection_agreement_at_32k(self):
    # The kernel benchmark's case (T = 32k, B = 1, G = 16, the paper's
    # constants; H = 16 over one KV head). tf32 kernel against XLA at its
    # GPU default (tf32) precision, as the benchmark and training run it.
    if self.INTERPRET:
      self.skipTest("GPU-sized case; compiled kernels only")
    cfg = dataclasses.replace(config_lib.SparseConfig(variant="nosa"),
                              score_implementation="pallas")
    with jax.default_matmul_precision("tensorfloat32"):
      stats = self._agreement(32768, 16, 128, cfg, seed=0)
    print("score_path_agreement at 32k:", stats, flush=True)
    self.assertLessEqual(stats["max_eps"], 1e-3)
    self.assertLessEqual(stats["worst_gap_over_eps"], 2.0)

  def test_validation(self):
    q, kbar = _inputs(0, t=64, g=4, kernel=8, stride=4, dtype="float32")
    pos = jnp.arange(64)
    bad = [
        (q[0], kbar, pos, {}),                       # q not 4-D
        (q, kbar[..., :8], pos, {}),                 # D differs
        (q[:, :, :6], kbar[:, :, :1].repeat(4, 2), pos, {}),  # H % K
        (q, kbar, pos[:10], {}),                     # positions length
        (q, kbar, pos, {"precision": "fp8"}),
        (q, kbar, pos, {"block_sizes": bs.ScoreBlockSizes(block_q=3)}),
        (q, kbar, pos, {"block_sizes": bs.ScoreBlockSizes(block_n=8)}),
    ]
    for q_, kbar_, pos_, kwargs in bad:
      with self.assertRaises(ValueError):
        bs.block_scores(q_, kbar_, pos_, 4, 16, 8, 4, interpret=True,
                        **kwargs)
    with self.assertRaises(ValueError):
      bs.block_scores(q, kbar, pos, 4, 16, 8, 6, interpret=True)  # C % s


class BlockScoresInterpretTest(BlockScoresTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
