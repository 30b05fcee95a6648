"""Tests for nosa_jax.sparse_attention (NOSA_SPEC.md §2.6-§2.9)."""

import dataclasses
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nosa_jax import config as config_lib
from nosa_jax import selection
from nosa_jax import sparse_attention as sa
from tests import tolerances

_C = 16
_CFG = config_lib.SparseConfig(
    variant="nosa", block_size=_C, compress_kernel=8, compress_stride=4,
    topk_blocks=4, query_topk_blocks=3, sink_blocks=1, window_blocks=1,
    query_chunk=48)


def _inputs(seed, b, t, h, k, d, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q, kk, v = (rng.normal(size=s).astype(np.float32) for s in
              ((b, t, h, d), (b, t, k, d), (b, t, k, d)))
  bias = rng.normal(size=(b, t, k)).astype(np.float32)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(kk), cast(v), jnp.asarray(bias)


def _dense_causal(q, k, v, bias):
  """Plain dense causal GQA attention with an additive per-key bias."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  k_h = jnp.repeat(k.astype(jnp.float32), g, axis=2)
  v_h = jnp.repeat(v.astype(jnp.float32), g, axis=2)
  logits = jnp.einsum("BTHD,BSHD->BHTS", q.astype(jnp.float32), k_h)
  logits = logits / math.sqrt(d)
  if bias is not None:
    logits = logits + jnp.repeat(bias, g, axis=2).transpose(0, 2, 1)[
        :, :, None, :]
  causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
  p = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
  return jnp.einsum("BHTS,BSHD->BTHD", p, v_h).astype(q.dtype)


def _grads(fn, args, cot):
  """Output and grads of sum(fn(*args) * cot) w.r.t. every argument."""

  @jax.jit
  def run(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cot.astype(out.dtype))

  return run(*args)


def _causal_blocks(b, k, t, c):
  n = -(-t // c)
  causal = np.arange(n)[None] <= (np.arange(t) // c)[:, None]
  return jnp.asarray(np.broadcast_to(causal, (b, k, t, n)))


class SparseAttentionTest(parameterized.TestCase):

  @parameterized.parameters((1, 2), (4, 2))
  def test_all_blocks_equals_dense(self, g, kh):
    b, t, d = 2, 75, 8
    q, k, v, bias = _inputs(g, b, t, g * kh, kh, d)
    cot = jax.random.normal(jax.random.key(0), q.shape)
    mask = _causal_blocks(b, kh, t, _C)
    want, want_g = _grads(_dense_causal, (q, k, v, bias), cot)
    ref = lambda q, k, v, bias: sa.sparse_attention_reference(
        q, k, v, bias, mask, _C)
    chunked = lambda q, k, v, bias: sa.sparse_attention(
        q, k, v, bias, mask, block_size=_C, query_chunk=32)
    for fn in (ref, chunked):
      out, grads = _grads(fn, (q, k, v, bias), cot)
      np.testing.assert_allclose(out, want, **tolerances.tol(np.float32))
      for got_g, exp_g in zip(grads, want_g, strict=True):
        np.testing.assert_allclose(got_g, exp_g, **tolerances.tol(np.float32))

  @parameterized.parameters("nosa", "dma", "infllmv2")
  def test_budget_covering_all_blocks_equals_dense(self, variant):
    # With topk_blocks >= N every causal block is selected (§2.5 "short
    # sequences"): NOSA is exactly dense attention with the bias.
    b, t, kh, g, d = 1, 90, 2, 2, 8
    q, k, v, bias = _inputs(7, b, t, kh * g, kh, d)
    cfg = dataclasses.replace(_CFG, variant=variant, topk_blocks=6)
    att_bias = bias if cfg.has_eviction_head else None
    out, aux = jax.jit(lambda *a: sa.nosa_attention(*a, cfg))(q, k, v, bias)
    np.testing.assert_allclose(out, _dense_causal(q, k, v, att_bias),
                               **tolerances.tol(np.float32))
    self.assertEqual(float(aux["gamma"]), 1.0)

  @parameterized.parameters((np.float32, 1, 61, 32), (np.float32, 4, 100, 16),
                            (jnp.bfloat16, 1, 100, 16),
                            (jnp.bfloat16, 4, 61, 32))
  def test_chunked_matches_reference(self, dtype, g, t, chunk):
    b, kh, d = 2, 2, 8
    q, k, v, bias = _inputs(t + g, b, t, g * kh, kh, d, dtype)
    rng = np.random.default_rng(t)
    n = -(-t // _C)
    mask = rng.random((b, kh, t, n)) < 0.5
    mask[..., np.arange(t), np.arange(t) // _C] = True  # own block
    mask = jnp.asarray(mask) & _causal_blocks(b, kh, t, _C)
    cot = jax.random.normal(jax.random.key(1), q.shape)
    want, want_g = _grads(
        lambda q, k, v, bias: sa.sparse_attention_reference(
            q, k, v, bias, mask, _C), (q, k, v, bias), cot)
    out, grads = _grads(
        lambda q, k, v, bias: sa.sparse_attention(
            q, k, v, bias, mask, block_size=_C, query_chunk=chunk),
        (q, k, v, bias), cot)
    self.assertEqual(out.dtype, dtype)
    tol = tolerances.tol(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(want, np.float32), **tol)
    for got_g, exp_g in zip(grads, want_g, strict=True):
      np.testing.assert_allclose(np.asarray(got_g, np.float32),
                                 np.asarray(exp_g, np.float32), **tol)

  def test_mask_is_honoured(self):
    # Changing an unselected block's keys and values changes nothing.
    b, t, kh, d = 1, 64, 1, 8
    q, k, v, bias = _inputs(3, b, t, 2, kh, d)
    mask = np.asarray(_causal_blocks(b, kh, t, _C)).copy()
    mask[:, :, 40:, 1] = False
    fn = jax.jit(lambda k, v: sa.sparse_attention(
        q, k, v, bias, jnp.asarray(mask), block_size=_C, query_chunk=16))
    k2 = k.at[:, _C:2 * _C].add(3.0)
    v2 = v.at[:, _C:2 * _C].add(3.0)
    out1, out2 = fn(k, v), fn(k2, v2)
    np.testing.assert_array_equal(out1[:, 40:], out2[:, 40:])
    self.assertGreater(float(jnp.abs(out1[:, :40] - out2[:, :40]).max()), 0.1)

  def test_fully_masked_row_is_zero_not_nan(self):
    q, k, v, bias = _inputs(0, 1, 20, 2, 1, 4)
    mask = jnp.zeros((1, 1, 20, 2), bool)
    ref = jax.jit(sa.sparse_attention_reference, static_argnums=5)
    chunked = jax.jit(lambda *a: sa.sparse_attention(
        *a, block_size=_C, query_chunk=8))
    for out in (ref(q, k, v, bias, mask, _C), chunked(q, k, v, bias, mask)):
      np.testing.assert_array_equal(out, 0.0)

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_pallas_matches_xla(self, dtype):
    """The kernel path (interpret mode on CPU) equals the xla path."""
    q, k, v, bias = _inputs(3, 1, 70, 4, 2, 16, dtype)
    mask = selection.block_mask(q, k, bias, _CFG)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), dtype)
    run = lambda impl: _grads(lambda *a: sa.sparse_attention(
        *a, mask, block_size=_C, query_chunk=32, implementation=impl),
                              (q, k, v, bias), cot)
    (out_x, grads_x), (out_p, grads_p) = run("xla"), run("pallas")
    for a, b in zip((out_x, *grads_x), (out_p, *grads_p), strict=True):
      np.testing.assert_allclose(np.asarray(a, np.float32),
                                 np.asarray(b, np.float32),
                                 **tolerances.tol(dtype))

  @pytest.mark.slow
  def test_mosaic_trains_like_xla(self):
    """implementation="mosaic" (Mosaic GPU fwd + bwd, interpret mode on the
    CPU) gives the xla path's output and gradients; the Mosaic kernels take
    64-token blocks and D % 64 == 0, bf16."""
    q, k, v, bias = _inputs(5, 1, 100, 4, 2, 64, jnp.bfloat16)
    rng = np.random.default_rng(5)
    mask = rng.random((1, 2, 100, 2)) < 0.5
    mask[:, :, np.arange(100), np.arange(100) // 64] = True
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)
    run = lambda impl: _grads(lambda *a: sa.sparse_attention(
        *a, jnp.asarray(mask), block_size=64, query_chunk=64,
        implementation=impl), (q, k, v, bias), cot)
    (out_x, grads_x), (out_m, grads_m) = run("xla"), run("mosaic")
    for a, b in zip((out_x, *grads_x), (out_m, *grads_m), strict=True):
      np.testing.assert_allclose(np.asarray(a, np.float32),
                                 np.asarray(b, np.float32),
                                 **tolerances.tol(jnp.bfloat16))

  def test_decode_attention_implementations_agree(self):
    rng = np.random.default_rng(5)
    b, kh, g, p, d = 2, 2, 4, 3, 16
    q = jnp.asarray(rng.normal(size=(b, kh * g, d)), jnp.float32)
    kc, vc = (jnp.asarray(rng.normal(size=(b, kh, p * _C, d)), jnp.float32)
              for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(b, kh, p * _C)), jnp.float32)
    slot_len = jnp.asarray([[[16, 0, 5], [16, 16, 1]]] * b, jnp.int32)
    got = [sa.decode_attention(q, kc, vc, bias, slot_len, _C, impl)
           for impl in ("xla", "pallas")]
    np.testing.assert_allclose(got[0], got[1],
                               **tolerances.tol(jnp.float32))


class NosaAttentionTest(parameterized.TestCase):

  def _eviction_setup(self, seed=0):
    b, t, kh, g, d = 1, 120, 2, 2, 8
    q, k, v, _ = _inputs(seed, b, t, kh * g, kh, d)
    rng = np.random.default_rng(seed)
    delta_w = jnp.asarray(rng.normal(size=(kh * d, kh)), jnp.float32)
    cot = jax.random.normal(jax.random.key(seed), q.shape)
    return q, k, v, delta_w, cot

  @parameterized.parameters("nosa", "dma")
  def test_gradient_reaches_eviction_head(self, variant):
    q, k, v, delta_w, cot = self._eviction_setup()
    cfg = dataclasses.replace(_CFG, variant=variant)

    def loss(a, delta_w):
      bias = selection.eviction_bias(v, a, delta_w)
      out, _ = sa.nosa_attention(q, k, v, bias, cfg)
      return jnp.sum(out * cot)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ga, gd = grad_fn(jnp.array([0.7, -0.4]), delta_w)
    for g in (ga, gd):
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertGreater(float(jnp.abs(g).sum()), 1e-4)
    # At the paper's init A = 0: A moves first, delta gets no gradient (§2.2).
    ga0, gd0 = grad_fn(jnp.zeros(2), delta_w)
    self.assertGreater(float(jnp.abs(ga0).min()), 1e-6)
    np.testing.assert_array_equal(gd0, 0.0)

  @parameterized.parameters("nosa", "infllmv2")
  def test_no_gradient_through_selection(self, variant):
    q, k, v, delta_w, cot = self._eviction_setup(1)
    bias = selection.eviction_bias(v, jnp.array([0.7, -0.4]), delta_w)
    cfg = dataclasses.replace(_CFG, variant=variant)
    att_bias = bias if cfg.has_eviction_head else None
    mask = jax.jit(lambda *a: selection.block_mask(*a, cfg))(q, k, att_bias)
    self.assertLess(float(mask.mean()), 0.5)  # genuinely sparse

    def via_nosa(q, k, v, bias):
      return sa.nosa_attention(q, k, v, bias, cfg)[0]

    def fixed_mask(q, k, v, bias):
      return sa.sparse_attention(q, k, v, None if att_bias is None else bias,
                                 mask, block_size=_C, query_chunk=48)

    out, grads = _grads(via_nosa, (q, k, v, bias), cot)
    want, want_g = _grads(fixed_mask, (q, k, v, bias), cot)
    np.testing.assert_array_equal(out, want)
    for got_g, exp_g in zip(grads, want_g, strict=True):
      np.testing.assert_allclose(got_g, exp_g, **tolerances.tol(np.float32))
    self.assertTrue(np.all(np.isfinite(grads[0])))

  def test_aux_and_locality_penalty(self):
    q, k, v, delta_w, _ = self._eviction_setup(2)
    bias = selection.eviction_bias(v, jnp.array([0.7, -0.4]), delta_w)
    keys = {"gamma", "changed_query_picks", "changed_agnostic_picks",
            "locality_pairs", "locality_penalty"}
    _, aux = jax.jit(lambda *a: sa.nosa_attention(*a, _CFG))(q, k, v, bias)
    self.assertEqual(set(aux), keys)
    self.assertEqual(float(aux["locality_penalty"]), 0.0)
    self.assertGreater(float(aux["locality_pairs"]), 0.0)
    self.assertTrue(0.0 < float(aux["gamma"]) <= 1.0)

    cfg = dataclasses.replace(_CFG, locality_weight=0.5)

    def penalty(q, k):
      return sa.nosa_attention(q, k, v, bias, cfg)[1]["locality_penalty"]

    value, (gq, gk) = jax.jit(jax.value_and_grad(penalty, argnums=(0, 1)))(
        q, k)
    direct = jax.jit(lambda q, k: selection.locality_penalty(q, k, cfg))
    np.testing.assert_allclose(value, direct(q, k), rtol=1e-6)
    self.assertGreater(float(value), 0.0)
    for g in (gq, gk):
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertGreater(float(jnp.abs(g).sum()), 1e-4)

  def test_sampled_locality_penalty_draws_with_the_key(self):
    q, k, v, delta_w, _ = self._eviction_setup(2)
    bias = selection.eviction_bias(v, jnp.array([0.7, -0.4]), delta_w)
    cfg = dataclasses.replace(_CFG, locality_weight=0.5,
                              locality_sample_fraction=0.3)
    key = jax.random.key(3)
    got = jax.jit(lambda q, k, key: sa.nosa_attention(
        q, k, v, bias, cfg, penalty_key=key)[1]["locality_penalty"])(
            q, k, key)
    want = jax.jit(lambda q, k, key: selection.locality_penalty(
        q, k, cfg, key=key))(q, k, key)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    self.assertGreater(float(got), 0.0)

  @parameterized.parameters("nosa", "infllmv2")
  def test_chunk_attends_as_whole(self, variant):
    # Queries p..p+Tc-1 against the keys 0..S-1 (a chunked prefill) give
    # the rows of the whole-sequence pass: same selection, same keys.
    q, k, v, delta_w, _ = self._eviction_setup(3)
    bias = selection.eviction_bias(v, jnp.array([0.7, -0.4]), delta_w)
    cfg = dataclasses.replace(_CFG, variant=variant, query_chunk=16)
    whole = jax.jit(lambda *a: sa.nosa_attention(*a, cfg)[0])(q, k, v, bias)
    chunk = jax.jit(lambda q_c, k_s, v_s, b_s, pos: sa.nosa_attention(
        q_c, k_s, v_s, b_s, cfg, pos)[0])
    for p, s in ((0, 40), (50, 83), (83, 120)):
      got = chunk(q[:, p:s], k[:, :s], v[:, :s], bias[:, :s],
                  jnp.arange(p, s))
      np.testing.assert_allclose(got, whole[:, p:s],
                                 **tolerances.tol(np.float32))
    with self.assertRaisesRegex(ValueError, "xla"):
      sa.sparse_attention(
          q[:, 50:], k, v, bias, jnp.ones((1, 2, 70, 8), bool),
          block_size=_C, query_chunk=16, implementation="pallas",
          positions_T=jnp.arange(50, 120))


class TwoPassTest(absltest.TestCase):
  """§2.7: the exp-delayed two-pass form equals the additive bias."""

  def test_exp_delayed_two_pass_equals_additive_bias(self):
    q, k, v, bias = _inputs(7, 2, 53, 4, 2, 8)
    mask = jax.jit(lambda *a: selection.block_mask(*a, _CFG))(q, k, bias)
    attend = jax.jit(lambda vals, b: sa.sparse_attention_reference(
        q, k, vals, b, mask, _C))
    e_BTK = jnp.exp(bias)
    numer = attend(v * e_BTK[..., None], None)            # sum p e v
    denom = attend(jnp.broadcast_to(e_BTK[..., None], v.shape), None)[..., :1]
    two_pass = numer / denom
    direct = attend(v, bias)
    np.testing.assert_allclose(two_pass, direct, atol=1e-5, rtol=1e-5)
    # The bias really matters here (the check is not vacuous).
    self.assertGreater(float(jnp.abs(attend(v, None) - direct).max()), 1e-2)


if __name__ == "__main__":
  absltest.main()
