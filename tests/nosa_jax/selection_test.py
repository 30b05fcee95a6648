"""Tests for nosa_jax.selection against numpy loops of NOSA_SPEC.md §2-§3."""

import dataclasses
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import selection

# C=8, windows 8/4 (5 windows per block), sink 1 + window 1 + own block,
# 2 free query-aware picks, 3 eviction picks.
_CFG = config_lib.SparseConfig(
    variant="nosa", block_size=8, compress_kernel=8, compress_stride=4,
    topk_blocks=7, query_topk_blocks=5, sink_blocks=1, window_blocks=1,
    query_chunk=48)


def _cfg(**kw):
  return dataclasses.replace(_CFG, **kw)


def _inputs(seed, b, t, h, k, d):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  kk = rng.normal(size=(b, t, k, d)).astype(np.float32)
  bias = rng.normal(size=(b, t, k)).astype(np.float32)
  return q, kk, bias


# ---------------------------------------------------------------- numpy spec


def np_window_mean(x, kernel, stride):
  t = x.shape[1]
  w = (t - kernel) // stride + 1 if t >= kernel else 0
  out = np.zeros((x.shape[0], w) + x.shape[2:])
  for c in range(w):
    out[:, c] = x[:, stride * c:stride * c + kernel].astype(np.float64).mean(1)
  return out


def np_pool(x_w, n, c_size, kernel, stride):
  """General overlap rule of project decision 3, one loop per block."""
  out = np.full(n, -np.inf)
  for j in range(n):
    cs = [c for c in range(len(x_w))
          if stride * c < c_size * (j + 1) and stride * c + kernel > c_size * j]
    if cs:
      out[j] = max(x_w[c] for c in cs)
  return out


def np_scores(q, k, bias, cfg):
  """sq [B, K, T, N] (§2.3) and se [B, K, N] (§2.4) in float64."""
  b_, t_, h_, d_ = q.shape
  kh = k.shape[2]
  g_ = h_ // kh
  c_, ker, st = cfg.block_size, cfg.compress_kernel, cfg.compress_stride
  n = -(-t_ // c_)
  kbar = np_window_mean(k, ker, st)
  w = kbar.shape[1]
  sq = np.zeros((b_, kh, t_, n))
  se = np.zeros((b_, kh, n))
  for b in range(b_):
    for h in range(kh):
      if bias is not None:
        ebar = np_window_mean(bias, ker, st)
        se[b, h] = np_pool(ebar[b, :, h], n, c_, ker, st)
      for t in range(t_):
        s = np.zeros(w)
        vis = [c for c in range(w) if st * c + ker - 1 <= t]
        if vis:
          for g in range(g_):
            logit = kbar[b, vis, h] @ q[b, t, h * g_ + g].astype(np.float64)
            logit /= math.sqrt(d_)
            p = np.exp(logit - logit.max())
            s[vis] += p / p.sum()
        sq[b, h, t] = np_pool(s, n, c_, ker, st)
  return sq, se


def np_select(sq, se, cfg):
  """Per-(b, h, t) loop of §2.5 with np.argsort(-score, kind='stable')."""
  b_, kh, t_, n = sq.shape
  mask = np.zeros(sq.shape, bool)
  for b in range(b_):
    for h in range(kh):
      for t in range(t_):
        jt = t // cfg.block_size
        j = np.arange(n)
        future = j > jt
        forced = ((j < cfg.sink_blocks)
                  | ((j >= jt - cfg.window_blocks) & (j <= jt))) & ~future

        def fix(s, forced=forced, future=future):
          s = s.copy()
          s[forced] = np.inf
          s[future] = -np.inf
          return s

        def top(s, m):
          return np.argsort(-s, kind="stable")[:min(m, n)]

        if not cfg.has_eviction_head:  # query-aware only (infllmv2)
          sel = top(fix(sq[b, h, t]), cfg.topk_blocks)
        elif not cfg.query_aware:  # eviction score only (dma)
          sel = top(fix(se[b, h]), cfg.topk_blocks)
        else:
          qset = top(fix(sq[b, h, t]), cfg.query_topk_blocks)
          qset = qset[qset <= jt]
          s_tilde = fix(se[b, h])
          s_tilde[qset] = np.inf
          sel = top(s_tilde, cfg.topk_blocks)
        sel = sel[sel <= jt]
        mask[b, h, t, sel] = True
  return mask


def np_penalty(sq, cfg):
  """Mean total variation of the soft free-block distributions (tau=1)."""
  _, _, t_, _ = sq.shape
  vals = []
  for t in range(1, t_):
    hi = (t - 1) // cfg.block_size - cfg.window_blocks - 1
    if hi < cfg.sink_blocks:
      continue
    u = slice(cfg.sink_blocks, hi + 1)
    p_prev = sq[:, :, t - 1, u] / sq[:, :, t - 1, u].sum(-1, keepdims=True)
    p_cur = sq[:, :, t, u] / sq[:, :, t, u].sum(-1, keepdims=True)
    vals.append(0.5 * np.abs(p_cur - p_prev).sum(-1))
  return np.mean(np.stack(vals)) if vals else 0.0


# --------------------------------------------------------------------- tests


class PoolingTest(parameterized.TestCase):

  @parameterized.parameters((37, 8, 4), (40, 8, 4), (50, 12, 4), (33, 32, 16),
                            (5, 8, 4), (8, 8, 4))
  def test_compress_keys_and_window_means(self, t, kernel, stride):
    rng = np.random.default_rng(t)
    k = rng.normal(size=(2, t, 3, 5)).astype(np.float32)
    x = rng.normal(size=(2, t, 3)).astype(np.float32)
    w = selection.num_windows(t, kernel, stride)
    kbar = selection.compress_keys(jnp.asarray(k), kernel, stride)
    xbar = selection.window_means(jnp.asarray(x), kernel, stride)
    self.assertEqual(kbar.shape, (2, w, 3, 5))
    self.assertEqual(xbar.shape, (2, w, 3))
    self.assertEqual(kbar.dtype, jnp.float32)
    np.testing.assert_allclose(kbar, np_window_mean(k, kernel, stride),
                               atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(xbar, np_window_mean(x, kernel, stride),
                               atol=1e-6, rtol=1e-6)

  @parameterized.parameters(300, 256, 95)
  def test_block_pool_paper_rule(self, t):
    # C/kernel/stride = 64/32/16: block j pools windows [4j-1, 4j+3] (§2.3).
    w = selection.num_windows(t, 32, 16)
    n = selection.num_blocks(t, 64)
    x = np.random.default_rng(t).normal(size=(3, w)).astype(np.float32)
    got = selection.block_pool(jnp.asarray(x), num_blocks=n, block_size=64,
                               kernel=32, stride=16)
    want = np.full((3, n), -np.inf, np.float32)
    for j in range(n):
      cs = [c for c in range(4 * j - 1, 4 * j + 4) if 0 <= c < w]
      if cs:
        want[:, j] = x[:, cs].max(-1)
    np.testing.assert_array_equal(got, want)

  @parameterized.parameters((8, 8, 4, 61), (8, 6, 4, 61), (16, 8, 8, 70),
                            (4, 4, 2, 23), (8, 20, 4, 100), (8, 8, 4, 10))
  def test_block_pool_general_rule(self, c_size, kernel, stride, t):
    w = selection.num_windows(t, kernel, stride)
    n = selection.num_blocks(t, c_size)
    x = np.random.default_rng(t).normal(size=(2, w)).astype(np.float32)
    got = selection.block_pool(jnp.asarray(x), num_blocks=n,
                               block_size=c_size, kernel=kernel, stride=stride)
    want = np.stack([np_pool(row, n, c_size, kernel, stride) for row in x])
    np.testing.assert_array_equal(got, want)

  def test_eviction_bias(self):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 9, 2, 4)).astype(np.float32)
    a = np.array([0.5, -1.5], np.float32)
    dw = rng.normal(size=(8, 2)).astype(np.float32)
    db = rng.normal(size=(2,)).astype(np.float32)
    got = selection.eviction_bias(jnp.asarray(v, jnp.bfloat16), a, dw, db)
    self.assertEqual(got.dtype, jnp.float32)
    v16 = np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)
    z = v16.reshape(2, 9, 8) @ dw + db
    want = a * np.log1p(np.exp(z))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


class SelectionTest(parameterized.TestCase):

  def test_scores_match_numpy(self):
    q, k, bias = _inputs(1, 2, 61, 4, 2, 8)
    sq, se = np_scores(q, k, bias, _CFG)
    n = sq.shape[-1]
    kbar = selection.compress_keys(jnp.asarray(k), 8, 4)
    got_sq = selection.query_aware_scores(jnp.asarray(q), kbar,
                                          jnp.arange(61), _CFG, n)
    got_se = selection.query_agnostic_scores(jnp.asarray(bias), _CFG, n)
    np.testing.assert_allclose(got_sq, sq, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_se, se, atol=1e-6, rtol=1e-6)

  @parameterized.product(variant=("nosa", "infllmv2", "dma"),
                         shape=((2, 150, 4, 2, 48), (1, 101, 2, 2, 512),
                                (1, 77, 3, 3, 32)))
  def test_selection_matches_numpy(self, variant, shape):
    b, t, h, kh, query_chunk = shape
    cfg = _cfg(variant=variant, query_chunk=query_chunk)
    q, k, bias = _inputs(t + h, b, t, h, kh, 8)
    sq, se = np_scores(q, k, bias, cfg)
    want = np_select(sq, se, cfg)
    fn = jax.jit(lambda q, k, b: selection.select_blocks(q, k, b, cfg))
    idx, valid = fn(q, k, bias)
    mask = jax.jit(lambda q, k, b: selection.block_mask(q, k, b, cfg))(
        q, k, bias)
    np.testing.assert_array_equal(mask, want)

    idx, valid = np.asarray(idx), np.asarray(valid)
    n = sq.shape[-1]
    jt = np.arange(t) // cfg.block_size
    self.assertEqual(idx.shape, (b, kh, t, min(cfg.topk_blocks, n)))
    # Counts, no future blocks, ascending valid indices, -1 elsewhere.
    np.testing.assert_array_equal(valid.sum(-1),
                                  np.broadcast_to(np.minimum(
                                      cfg.topk_blocks, jt + 1), (b, kh, t)))
    self.assertTrue(np.all(np.where(valid, idx <= jt[:, None], True)))
    self.assertTrue(np.all(np.where(valid, True, idx == -1)))
    pad = n + np.arange(idx.shape[-1])
    self.assertTrue(np.all(np.diff(np.where(valid, idx, pad), axis=-1) > 0))
    from_idx = np.zeros_like(want)
    bb, hh, tt, pp = np.nonzero(valid)
    from_idx[bb, hh, tt, idx[bb, hh, tt, pp]] = True
    np.testing.assert_array_equal(from_idx, want)
    # Forced blocks always selected.
    j = np.arange(n)
    forced = ((j[None] < cfg.sink_blocks)
              | ((j[None] >= jt[:, None] - cfg.window_blocks)
                 & (j[None] <= jt[:, None])))
    forced &= j[None] <= jt[:, None]
    self.assertTrue(np.all(mask | ~forced[None, None]))

  @parameterized.parameters("nosa", "infllmv2")
  def test_pallas_scores_select_the_same_blocks(self, variant):
    # score_implementation="pallas" (block_scores, interpret mode here),
    # with two query chunks, picks exactly the numpy selection.
    cfg = _cfg(variant=variant, query_chunk=64, score_implementation="pallas")
    q, k, bias = _inputs(3, 2, 100, 4, 2, 8)
    want = np_select(*np_scores(q, k, bias, cfg), cfg)
    mask = jax.jit(lambda q, k, b: selection.block_mask(q, k, b, cfg))(
        q, k, bias)
    np.testing.assert_array_equal(mask, want)

  @parameterized.parameters("nosa", "dma", "infllmv2")
  def test_short_sequence_without_windows(self, variant):
    # T < compress_kernel: no compressed window exists (W = 0).
    cfg = _cfg(variant=variant, block_size=4, compress_kernel=8,
               compress_stride=4, topk_blocks=3, query_topk_blocks=3,
               window_blocks=1)
    q, k, bias = _inputs(0, 1, 7, 2, 2, 4)
    mask = selection.block_mask(jnp.asarray(q), jnp.asarray(k),
                                jnp.asarray(bias), cfg)
    causal = np.arange(2)[None] <= (np.arange(7) // 4)[:, None]
    np.testing.assert_array_equal(mask, np.broadcast_to(causal, mask.shape))

  def test_full_variant_is_causal(self):
    cfg = _cfg(variant="full")
    q, k, _ = _inputs(0, 1, 30, 2, 1, 4)
    mask = selection.block_mask(q, k, None, cfg)
    idx, valid = selection.select_blocks(q, k, None, cfg)
    causal = np.arange(4)[None] <= (np.arange(30) // 8)[:, None]
    np.testing.assert_array_equal(mask[0, 0], causal)
    np.testing.assert_array_equal(valid[0, 0], causal)
    np.testing.assert_array_equal(np.where(causal, idx[0, 0], -1), idx[0, 0])

  def test_bias_required(self):
    q, k, _ = _inputs(0, 1, 30, 2, 1, 4)
    with self.assertRaisesRegex(ValueError, "bias"):
      selection.block_mask(q, k, None, _cfg(variant="dma"))


class PositionsTest(parameterized.TestCase):
  """A chunk of queries at positions p.. against the keys 0..S-1 selects as
  the same queries do in a pass over the whole sequence (chunked prefill)."""

  @parameterized.parameters(
      ("nosa", "xla"), ("nosa", "pallas"), ("infllmv2", "xla"),
      ("dma", "xla"), ("full", "xla"))
  def test_chunk_selects_as_whole(self, variant, scores):
    cfg = _cfg(variant=variant, query_chunk=16, score_implementation=scores)
    q, k, bias = (jnp.asarray(x) for x in _inputs(5, 2, 100, 4, 2, 8))
    masks = jax.jit(lambda *a: selection.select_block_masks(*a, cfg))
    want_mask, want_pinned = masks(q, k, bias)
    want_idx, want_valid = jax.jit(
        lambda *a: selection.select_blocks(*a, cfg))(q, k, bias)

    @jax.jit
    def chunk(q_c, k_s, b_s, pos):
      return (selection.select_block_masks(q_c, k_s, b_s, cfg, pos),
              selection.select_blocks(q_c, k_s, b_s, cfg, pos))

    for p, tc in ((0, 30), (37, 27), (64, 36)):
      s = p + tc
      n = -(-s // cfg.block_size)
      (mask, pinned), (idx, valid) = chunk(
          q[:, p:s], k[:, :s], bias[:, :s], jnp.arange(p, s))
      rows = slice(p, s)
      np.testing.assert_array_equal(mask, want_mask[:, :, rows, :n])
      np.testing.assert_array_equal(pinned, want_pinned[:, :, rows, :n])
      self.assertFalse(np.any(want_mask[:, :, rows, n:]))
      np.testing.assert_array_equal(valid, want_valid[:, :, rows, :n])
      np.testing.assert_array_equal(
          np.where(valid, idx, -1),
          np.where(want_valid[:, :, rows, :n], want_idx[:, :, rows, :n], -1))

  def test_different_lengths_need_positions(self):
    q, k, bias = _inputs(0, 1, 40, 2, 1, 4)
    with self.assertRaisesRegex(ValueError, "positions_T"):
      selection.block_mask(q[:, 20:], k, bias, _CFG)


class TiesTest(absltest.TestCase):

  def test_flipped_picks_lie_within_two_eps_of_the_boundary(self):
    # Scores on a coarse grid (many exact and near ties) against a copy
    # perturbed by at most eps: picks flip, each within 2 eps of the
    # boundary (selection.score_path_agreement's bound); a copy off by
    # more than the rounding shows as a large eps instead.
    cfg = _cfg(query_chunk=64)
    rng = np.random.default_rng(0)
    t, n = 120, 15
    a = jnp.asarray(np.round(rng.uniform(size=(2, 2, t, n)), 2), jnp.float32)
    noise = jnp.asarray(rng.uniform(-1, 1, size=a.shape), jnp.float32)
    pos = jnp.arange(t)
    for eps in (1e-3, 2e-2):
      differ, picks, row_eps, ratio = jax.jit(
          lambda a, b: selection._phase1_rows(a, b, pos, cfg))(  # pylint: disable=protected-access
              a, a + eps * noise)
      self.assertGreater(int(differ.sum()), 0)
      self.assertEqual(int(picks.sum()) % 2, 0)  # one in, one out
      self.assertLessEqual(float(row_eps.max()), eps * 1.0001)
      self.assertLessEqual(float(ratio.max()), 2.0 + 1e-4)
    same = selection._phase1_rows(a, a, pos, cfg)  # pylint: disable=protected-access
    self.assertFalse(bool(same[0].any()))

  def test_bfloat16_scores_merge_near_ties(self):
    # Blocks 1 and 2 differ by less than bf16 resolves: fp32 ranking picks
    # block 2, score_dtype="bfloat16" sees a tie and keeps block 1.
    cfg = _cfg(variant="infllmv2", sink_blocks=1, window_blocks=1,
               query_topk_blocks=4, topk_blocks=4)
    sq = jnp.asarray([[[[0.0, 0.5, 0.5 + 1e-5, 0.1, 0.0, 0.0]]]],
                     jnp.float32)  # one query at block 5: 0, 4, 5 forced
    pos = jnp.asarray([5 * cfg.block_size])
    pick = lambda c: set(np.asarray(
        selection.select_from_scores(sq, None, pos, c)[0]).ravel().tolist())
    self.assertEqual(pick(cfg), {0, 2, 4, 5})
    self.assertEqual(
        pick(dataclasses.replace(cfg, score_dtype="bfloat16")), {0, 1, 4, 5})


class MembersTest(absltest.TestCase):

  def test_scatter_equals_compare(self):
    # Random indices with repeats and invalid (-1 / masked) entries.
    rng = np.random.default_rng(0)
    n = 11
    idx = jnp.asarray(rng.integers(-1, n, size=(2, 3, 17, 5)), jnp.int32)
    valid = jnp.asarray(rng.random((2, 3, 17, 5)) < 0.8) & (idx >= 0)
    got = selection._members(idx, valid, n)  # pylint: disable=protected-access
    want = selection._members_by_compare(idx, valid, n)  # pylint: disable=protected-access
    self.assertEqual(got.shape, (2, 3, 17, n))
    self.assertGreater(int(got.sum()), 0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class MasksFromScoresTest(parameterized.TestCase):
  """`select_masks_from_scores` (no final top-k for dma / nosa) equals the
  members of `select_from_scores`' indices, ties and -inf scores
  included."""

  @parameterized.product(
      variant=["nosa", "dma", "infllmv2"],
      sizes=[dict(t=70, c=8, topk=6, qtopk=3, window=1, sink=1),
             dict(t=40, c=8, topk=12, qtopk=5, window=1, sink=0),  # P >= N
             dict(t=90, c=16, topk=5, qtopk=4, window=2, sink=1)],  # Q = forced
      levels=[3, 0])  # scores drawn from 3 values (ties), or continuous
  def test_equals_members_of_the_indices(self, variant, sizes, levels):
    t, c = sizes["t"], sizes["c"]
    cfg = _cfg(variant=variant, block_size=c, topk_blocks=sizes["topk"],
               query_topk_blocks=sizes["qtopk"],
               window_blocks=sizes["window"], sink_blocks=sizes["sink"])
    n = -(-t // c)
    rng = np.random.default_rng(sizes["topk"] + levels)
    draw = ((lambda *s: rng.integers(0, levels, s).astype(np.float32))
            if levels else (lambda *s: rng.normal(size=s)))
    sq = jnp.asarray(draw(2, 3, t, n), jnp.float32)
    se_np = draw(2, 3, n)
    se_np[:, :, -1] = -np.inf  # a block without windows
    se = jnp.asarray(se_np, jnp.float32)
    pos = jnp.arange(t) + 5  # not starting at 0
    if not cfg.query_aware:
      sq = None
    idx, valid, pinned_want = selection.select_from_scores(sq, se, pos, cfg)
    want = selection._members_by_compare(idx, valid, n)  # pylint: disable=protected-access
    got, pinned = selection.select_masks_from_scores(sq, se, pos, cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(pinned), np.asarray(pinned_want))
    # Every query keeps exactly min(topk, causal blocks).
    causal = np.minimum(np.asarray(pos) // c + 1, n)
    np.testing.assert_array_equal(np.asarray(got).sum(-1),
                                  np.broadcast_to(np.minimum(sizes["topk"],
                                                             causal),
                                                  (2, 3, t)))


class LocalityTest(parameterized.TestCase):

  # C=4, sink 1, window 2 (+ own block), query top-k 7 (3 free picks),
  # budget 12: the §3 bound is 12 - 3 - 1 = 8 shared blocks per step.
  LOC = config_lib.SparseConfig(
      variant="nosa", block_size=4, compress_kernel=4, compress_stride=2,
      topk_blocks=12, query_topk_blocks=7, sink_blocks=1, window_blocks=2,
      query_chunk=64)

  def _overlaps(self, cfg, seed=0):
    q, k, bias = _inputs(seed, 2, 4 * 60 + 3, 4, 2, 8)
    mask, pinned = jax.jit(
        lambda q, k, b: selection.select_block_masks(q, k, b, cfg))(
            q, k, bias)
    mask, pinned = np.asarray(mask), np.asarray(pinned)
    count = mask.sum(-1)
    full = (count[..., 1:] == cfg.topk_blocks) & (
        count[..., :-1] == cfg.topk_blocks)
    overlap = (mask[:, :, 1:] & mask[:, :, :-1]).sum(-1)
    return mask, pinned, full, overlap

  @parameterized.parameters(0, 1)
  def test_nosa_locality_bound(self, seed):
    cfg = self.LOC
    _, _, full, overlap = self._overlaps(cfg, seed)
    free = cfg.query_topk_blocks - cfg.sink_blocks - cfg.window_blocks - 1
    bound = cfg.topk_blocks - free - 1
    self.assertGreater(full.sum(), 300)
    self.assertGreaterEqual(overlap[full].min(), bound)

  def test_nosa_locality_bound_adversarial_query_scores(self):
    """Query picks that 'steal' the best eviction blocks (spec Appendix A).

    At even steps the free query-aware picks take the top-ranked eviction
    blocks, at odd steps the worst-ranked ones, so the eviction part must
    refill as much as possible every step; the bound still holds.
    """
    cfg, c = self.LOC, self.LOC.block_size
    free = cfg.query_topk_blocks - cfg.sink_blocks - cfg.window_blocks - 1
    n, t_len = 64, 64 * c
    rng = np.random.default_rng(3)
    se = rng.normal(size=n).astype(np.float32)
    order = np.argsort(-se, kind="stable")
    sq = np.zeros((t_len, n), np.float32)
    for t in range(t_len):
      jt = t // c
      free_blocks = [j for j in order
                     if cfg.sink_blocks <= j < jt - cfg.window_blocks]
      picks = free_blocks[:free] if t % 2 == 0 else free_blocks[::-1][:free]
      sq[t, picks] = 10.0 + rng.random(len(picks))
    idx, valid, _ = selection.select_from_scores(
        jnp.asarray(sq)[None, None], jnp.asarray(se)[None, None],
        jnp.arange(t_len), cfg)
    idx, valid = np.asarray(idx)[0, 0], np.asarray(valid)[0, 0]
    sets = [set(i[v].tolist()) for i, v in zip(idx, valid, strict=True)]
    bound = cfg.topk_blocks - free - 1
    checked = 0
    for t in range(1, t_len):
      if len(sets[t]) == len(sets[t - 1]) == cfg.topk_blocks:
        self.assertGreaterEqual(len(sets[t] & sets[t - 1]), bound, t)
        checked += 1
    self.assertGreater(checked, 100)
    # The adversary does reach the bound: the check is tight, not vacuous.
    overlaps = [len(sets[t] & sets[t - 1]) for t in range(1, t_len)
                if len(sets[t]) == len(sets[t - 1]) == cfg.topk_blocks]
    self.assertEqual(min(overlaps), bound)

  def test_infllmv2_has_no_such_bound(self):
    # The bound is not vacuous: the query-aware-only rule breaks it.
    cfg = dataclasses.replace(self.LOC, variant="infllmv2")
    _, _, full, overlap = self._overlaps(cfg)
    self.assertLess(overlap[full].min(), cfg.topk_blocks - 4)

  def test_locality_statistics(self):
    cfg = self.LOC
    mask, pinned, full, overlap = self._overlaps(cfg)
    stats = selection.locality_statistics(mask, pinned, cfg.topk_blocks)
    gamma = overlap[full].mean() / cfg.topk_blocks
    np.testing.assert_allclose(stats["gamma"], gamma, rtol=1e-6)
    entering = mask[:, :, 1:] & ~mask[:, :, :-1]
    np.testing.assert_allclose(
        stats["changed_query_picks"],
        (entering & pinned[:, :, 1:]).sum(-1)[full].mean(), rtol=1e-6)
    np.testing.assert_allclose(
        stats["changed_query_picks"] + stats["changed_agnostic_picks"],
        cfg.topk_blocks * (1 - stats["gamma"]), rtol=1e-5)
    np.testing.assert_allclose(stats["locality_pairs"], full.mean(),
                               rtol=1e-6)

  def test_locality_statistics_short_sequence(self):
    mask = np.ones((1, 1, 5, 2), bool)
    stats = selection.locality_statistics(mask, mask, 4)
    self.assertEqual(float(stats["gamma"]), 1.0)
    self.assertEqual(float(stats["locality_pairs"]), 0.0)


class LocalityPenaltyTest(parameterized.TestCase):

  def test_matches_numpy_and_chunking(self):
    q, k, _ = _inputs(3, 2, 93, 4, 2, 8)
    sq, _ = np_scores(q, k, None, _CFG)
    want = np_penalty(sq, _CFG)
    for chunk in (16, 40, 512):
      got = jax.jit(lambda q, k, c=chunk: selection.locality_penalty(
          q, k, _cfg(query_chunk=c)))(q, k)
      np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)

  def test_gradient_reaches_q_and_k(self):
    q, k, _ = _inputs(4, 1, 70, 4, 2, 8)
    gq, gk = jax.jit(jax.grad(
        lambda q, k: selection.locality_penalty(q, k, _CFG),
        argnums=(0, 1)))(jnp.asarray(q), jnp.asarray(k))
    for g in (gq, gk):
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertGreater(float(jnp.abs(g).sum()), 1e-4)

  def test_zero_for_repeated_query(self):
    # G=1 and the same query at every position: consecutive soft
    # distributions differ only by the normalisation, which cancels.
    q, k, _ = _inputs(5, 1, 90, 2, 2, 8)
    q_same = np.broadcast_to(q[:, :1], q.shape)
    same = selection.locality_penalty(q_same, k, _CFG)
    rand = selection.locality_penalty(q, k, _CFG)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    self.assertGreater(float(rand), 1e-2)

  def test_short_sequence_is_zero(self):
    q, k, _ = _inputs(6, 1, 20, 2, 2, 8)
    self.assertEqual(float(selection.locality_penalty(q, k, _CFG)), 0.0)


class SampledLocalityPenaltyTest(parameterized.TestCase):
  """`locality_sample_fraction` < 1: an unbiased estimate of the penalty.

  T = 93 with C = 8: segments 3..11 (S = 9), the last one with 4 pairs.
  """

  T = 93

  def _penalty(self, fraction, chunk=48):
    cfg = _cfg(locality_sample_fraction=fraction, query_chunk=chunk)
    return lambda q, k, key: selection.locality_penalty(q, k, cfg, key=key)

  def test_segments(self):
    self.assertEqual(selection.penalty_segments(self.T, _CFG), (3, 9, 9))
    self.assertEqual(selection.penalty_segments(
        self.T, _cfg(locality_sample_fraction=0.3)), (3, 9, 3))
    self.assertEqual(selection.penalty_segments(
        self.T, _cfg(locality_sample_fraction=1e-3)), (3, 9, 1))
    self.assertEqual(selection.penalty_segments(25, _CFG)[1:], (0, 0))

  def test_fraction_one_or_no_key_is_the_exact_penalty(self):
    q, k, _ = _inputs(3, 2, self.T, 4, 2, 8)
    exact = selection.locality_penalty(q, k, _CFG)
    key = jax.random.key(0)
    self.assertEqual(float(self._penalty(1.0)(q, k, key)), float(exact))
    self.assertEqual(float(self._penalty(0.3)(q, k, None)), float(exact))

  def test_every_segment_drawn_equals_exact(self):
    # fraction 0.999: m = ceil(0.999 * 9) = S, every pair is scored; in 2
    # groups of 5 segments (one padded) or 9 groups of 1.
    q, k, _ = _inputs(3, 2, self.T, 4, 2, 8)
    want = selection.locality_penalty(q, k, _CFG)
    for chunk in (48, 8):
      got = jax.jit(self._penalty(0.999, chunk))(q, k, jax.random.key(4))
      np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_gradient_reaches_q_and_k_and_is_exact_when_all_drawn(self):
    # The estimate is (S / m) * the sum of the drawn segments' TV, so its
    # gradient is the same sum of their gradients: with m = S (fraction
    # 0.999 < 1, the sampled path) it is the exact penalty's gradient.
    q, k, _ = _inputs(3, 2, self.T, 4, 2, 8)
    q, k = jnp.asarray(q), jnp.asarray(k)
    got = jax.jit(jax.grad(self._penalty(0.999), argnums=(0, 1)))(
        q, k, jax.random.key(4))
    want = jax.jit(jax.grad(lambda q, k: selection.locality_penalty(
        q, k, _CFG), argnums=(0, 1)))(q, k)
    for g, w in zip(got, want, strict=True):
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertGreater(float(jnp.abs(g).sum()), 1e-4)
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)

  def test_one_segment_draws_average_to_exact(self):
    # B = 1, m = 1: each key scores one of the S segments, each with
    # probability 1 / S, so the mean over the S distinct outcomes is the
    # expectation, which must be the exact penalty.
    q, k, _ = _inputs(7, 1, self.T, 4, 2, 8)
    keys = jax.random.split(jax.random.key(1), 128)
    vals = np.asarray(jax.jit(jax.vmap(
        self._penalty(0.1), in_axes=(None, None, 0)))(q, k, keys))
    outcomes = np.unique(vals)
    self.assertLen(outcomes, 9)
    np.testing.assert_allclose(outcomes.mean(),
                               selection.locality_penalty(q, k, _CFG),
                               rtol=1e-5)

  def test_mean_over_keys_matches_exact(self):
    # B = 2, m = 3 of 9 per sequence: within 4 standard errors.
    q, k, _ = _inputs(8, 2, self.T, 4, 2, 8)
    keys = jax.random.split(jax.random.key(2), 400)
    vals = np.asarray(jax.jit(jax.vmap(
        self._penalty(0.3), in_axes=(None, None, 0)))(q, k, keys))
    se = vals.std() / np.sqrt(len(vals))
    self.assertGreater(se, 0.0)  # the draws differ
    self.assertLess(abs(vals.mean() - float(
        selection.locality_penalty(q, k, _CFG))), 4 * se)


class DecodeLocalityTest(absltest.TestCase):
  """gamma and prefetch coverage of consecutive decode selections."""

  def test_gamma(self):
    prev = jnp.array([[0, 1, 2, -1], [0, 1, 2, 3]])
    cur = jnp.array([[0, 1, 2, 3], [0, 2, 3, 4]])
    # Row 0: block 3 is new (the tail opened), a hit unless asked not to.
    np.testing.assert_allclose(selection.selection_gamma(prev, cur),
                               [1.0, 1.0])
    np.testing.assert_allclose(
        selection.selection_gamma(prev, cur, new_block_hits=False),
        [0.75, 0.75])
    prev = jnp.array([[0, 1, 2, -1], [0, 2, 3, 4]])
    cur = jnp.array([[0, 1, 2, -1], [0, 1, 3, 4]])  # row 1: block 1 missed
    np.testing.assert_allclose(selection.selection_gamma(prev, cur),
                               [1.0, 0.75])

  def test_coverage_counts(self):
    prev = jnp.array([[0, 2, 4, 5]])
    cur = jnp.array([[0, 1, 3, 5]])    # misses: 1, 3
    pred = jnp.array([[0, 1, 6, -1]])  # covers 1; 6 is extra
    self.assertEqual(tuple(int(x[0]) for x in selection.prefetch_coverage(
        prev, cur, pred)), (2, 1, 1))
    # A newly opened tail block (beyond everything at t-1) is no miss.
    cur = jnp.array([[0, 2, 5, 6]])
    self.assertEqual(int(selection.prefetch_coverage(prev, cur, cur)[0][0]),
                     0)


if __name__ == "__main__":
  absltest.main()


class HandComputedTest(absltest.TestCase):
  """Small cases worked out by hand, one per variant.

  C=4, windows 4/4 (one window per block, so pooling takes the block's own
  window and its neighbours' windows that overlap: none for kernel=stride),
  budget 4 blocks, query top-k 3 = sink 1 + window 1 + own block, so
  query-aware picks add nothing beyond the forced blocks and the eviction
  picks fill the last slot. One sequence, one KV head, G=1, D=1.
  """

  CFG = config_lib.SparseConfig(
      variant="nosa", block_size=4, compress_kernel=4, compress_stride=4,
      topk_blocks=4, query_topk_blocks=3, sink_blocks=1, window_blocks=1,
      query_chunk=32)

  def _select(self, variant, q, k, bias, topk=4, query_topk=3):
    cfg = dataclasses.replace(self.CFG, variant=variant, topk_blocks=topk,
                              query_topk_blocks=query_topk)
    mask = selection.block_mask(q, k, bias, cfg)
    return {int(j) for j in np.flatnonzero(np.asarray(mask[0, 0, -1]))}

  def setUp(self):
    super().setUp()
    t = 32  # 8 blocks; the last query (t=31) is in block 7.
    self.k = np.ones((1, t, 1, 1), np.float32)
    # Keys: block 3 has a large key, the others are small.
    self.k[0, 12:16, 0, 0] = 5.0
    self.q = np.ones((1, t, 1, 1), np.float32)
    # Eviction bias per block: 2 is the best, then 4, 1, 5, 3.
    per_block = [0.0, 0.3, 0.9, -1.0, 0.5, 0.1, 0.0, 0.0]
    self.bias = np.repeat(np.array(per_block, np.float32), 4)[None, :, None]

  def test_nosa(self):
    # Forced: sink 0, window 6, own 7 -> query top-3 is exactly these;
    # the fourth slot goes to the best eviction score: block 2.
    self.assertEqual(self._select("nosa", self.q, self.k, self.bias),
                     {0, 6, 7, 2})
    # With query top-k 4 (budget 5) the query picks block 3 (large key),
    # then eviction adds block 2.
    self.assertEqual(self._select("nosa", self.q, self.k, self.bias,
                                  topk=5, query_topk=4), {0, 6, 7, 3, 2})

  def test_infllmv2(self):
    # Query-aware only: forced blocks plus the block with the large key.
    self.assertEqual(self._select("infllmv2", self.q, self.k, None),
                     {0, 6, 7, 3})

  def test_dma(self):
    # Eviction only: forced blocks plus the best bias block.
    self.assertEqual(self._select("dma", self.q, self.k, self.bias),
                     {0, 6, 7, 2})
    self.assertEqual(self._select("dma", self.q, self.k, self.bias, topk=6,
                                  query_topk=3), {0, 6, 7, 2, 4, 1})
