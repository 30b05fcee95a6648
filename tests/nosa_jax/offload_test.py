"""Offloaded decode engine: same logits as decode.py, K/V on pinned host.

Checks that the host store lives in `pinned_host` memory, that offloaded
decode reproduces decode.py (and the teacher-forced forward) step by step
for infllmv2 and nosa (variable lengths, contexts below and past the
budget, tails filling), that greedy generate matches, and the fetch counts
(cold start, misses only, the §3 locality bound for nosa).
"""


import functools
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nosa_jax import config as config_lib
from nosa_jax import decode
from nosa_jax import model
from nosa_jax import offload
from nosa_jax import testing
from tests import tolerances


_model = testing.tiny_model_with_bias
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _sets(idx_BKP):
  return [[set(int(j) for j in row if j >= 0) for row in per_b]
          for per_b in idx_BKP]


class OffloadTest(parameterized.TestCase):

  def test_store_is_pinned_host_and_capacity(self):
    cfg, _, params = _model("nosa")
    tokens = testing.random_tokens(jax.random.key(0), 2, 40)
    state, _ = offload.prefill(params, cfg, tokens, jnp.array([40, 7]), 64)
    for layer in state.layers:
      self.assertEqual(layer.k_host.sharding.memory_kind, "pinned_host")
      self.assertEqual(layer.v_host.sharding.memory_kind, "pinned_host")
      self.assertEqual(layer.k_host.shape, (2, 2, 4, 16, 16))  # B K N C D
      self.assertEqual(layer.k_slot.sharding.memory_kind, "device")
      self.assertEqual(layer.k_slot.shape, (2, 2, 4, 16, 16))  # P = min(8, 4)
      # Slot 0 holds the tail of the 7-token prompt; 40 = 2.5 blocks too.
      np.testing.assert_array_equal(layer.slot_map[:, :, 0], [[2, 2], [0, 0]])
      np.testing.assert_array_equal(layer.slot_map[:, :, 1:], -1)
    state, _, _ = offload.decode_step(params, cfg, state, tokens[:, 0])
    self.assertEqual(state.layers[0].k_host.sharding.memory_kind,
                     "pinned_host")
    need = offload.host_store_bytes(cfg, 2, 64)
    self.assertEqual(need, 2 * 2 * 2 * 2 * 64 * 16 * 4)
    with self.assertRaisesRegex(ValueError, f"needs {need} bytes"):
      offload.prefill(params, cfg, tokens, jnp.array([40, 7]), 64,
                      host_memory_limit=need - 1)
    # generate refuses both before anything runs.
    with self.assertRaisesRegex(ValueError, "max_len=64 is too small"):
      offload.generate(params, cfg, [list(range(3, 100))], 10, max_len=64)
    with self.assertRaisesRegex(ValueError, "the host KV store needs"):
      offload.generate(params, cfg, [[1, 2, 3]], 10, host_memory_limit=10)
    with self.assertRaisesRegex(ValueError, "offload supports"):
      offload.prefill(params, testing.tiny_model_config("full"), tokens,
                      jnp.array([40, 7]), 64)

  def test_gpu_pinned_host_cap(self):
    # XLA's GPU client caps pinned_host at XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB
    # (64 GB by default); the capacity check must count that cap.
    env = offload.HOST_LIMIT_ENV
    phys = lambda kind: 137_000_000_000  # the H100 machine's 128 GiB
    with mock.patch.dict(os.environ, {}, clear=False), \
        mock.patch.object(offload, "_physical_host_bytes", phys):
      # (need_bytes, cap in GB): need + max(8 GB, 10%), at most 0.75 of
      # RAM (BFC growth pins up to the cap), never below XLA's 64 GB.
      for need, want in ((68_700_000_000, "77"), (None, "103"),
                         (1_000_000_000, "64"), (500_000_000_000, "103")):
        os.environ.pop(env, None)
        offload.allow_pinned_host_memory(need)
        self.assertEqual(os.environ[env], want, need)
      offload.allow_pinned_host_memory(None, fraction=0.9)
      self.assertEqual(os.environ[env], "103")  # an explicit value is kept
      os.environ[env] = "100"  # 100 GB cap, 137 GB "free" RAM
      with mock.patch.object(jax, "default_backend", lambda: "gpu"), \
          mock.patch.object(offload, "_pinned_high_water", [0]), \
          mock.patch.object(offload, "_live_pinned_bytes", lambda: 0):
        cfg, _, _ = _model("nosa")
        self.assertEqual(offload._available_host_bytes(), 100_000_000_000)
        need = offload.check_host_capacity(cfg, 2, 64)
        self.assertEqual(offload._pinned_high_water, [need])
      # A pool that held 70 GB keeps it: with 40 GB of free RAM left, a new
      # store may take the pool's 70 GB (nothing live) plus 30 GB of growth.
      phys40 = lambda kind: 40_000_000_000
      with mock.patch.object(jax, "default_backend", lambda: "gpu"), \
          mock.patch.object(offload, "_physical_host_bytes", phys40), \
          mock.patch.object(offload, "_pinned_high_water", [70 * 10**9]):
        with mock.patch.object(offload, "_live_pinned_bytes", lambda: 0):
          self.assertEqual(offload._available_host_bytes(), 100 * 10**9)
        with mock.patch.object(offload, "_live_pinned_bytes",
                               lambda: 60 * 10**9):
          self.assertEqual(offload._available_host_bytes(), 40 * 10**9)
      os.environ[env] = "0.001"  # 1 MB
      with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        self.assertEqual(offload._available_host_bytes(), 1_000_000)
        cfg, _, _ = _model("nosa")
        with self.assertRaisesRegex(ValueError, env):
          offload.check_host_capacity(cfg, 64, 4096)
      with mock.patch.object(jax, "default_backend", lambda: "cpu"):
        self.assertGreater(offload._available_host_bytes(), 1_000_000)
    with self.assertRaisesRegex(ValueError, "fraction"):
      offload.allow_pinned_host_memory(fraction=0.0)
    with self.assertRaisesRegex(ValueError, "need_bytes"):
      offload.allow_pinned_host_memory(-1)

  def test_diff(self):
    old = jnp.array([[[5, -1, 2, 7]]])
    sel = jnp.array([[[1, 2, 3, 8]]])  # 8 = own block, new
    new_map, load, fetch = offload.diff_slots(old, sel, jnp.array([8]))
    np.testing.assert_array_equal(new_map, [[[1, 3, 2, 8]]])
    np.testing.assert_array_equal(load, [[[1, 3, -1, 8]]])
    np.testing.assert_array_equal(fetch, [[[True, True, False, False]]])
    # Fewer selected than slots: unassigned free slots keep their block.
    new_map, _, fetch = offload.diff_slots(
        old, jnp.array([[[0, 2, -1, -1]]]), jnp.array([2]))
    np.testing.assert_array_equal(new_map, [[[0, -1, 2, 7]]])
    np.testing.assert_array_equal(fetch, [[[True, False, False, False]]])

  def test_diff_keep_values(self):
    # 6 slots, selection of 3: misses take empty slots first, then the
    # lowest keep values; slots holding a selected block are never taken.
    old = jnp.array([[[4, 9, -1, 6, 2, 5]]])
    keep = jnp.array([[[0.5, -3.0, 7.0, 1.0, 9.0, -1.0]]])
    sel = jnp.array([[[1, 2, 3]]])  # 2 resident; 1 and 3 missing
    new_map, load, fetch = offload.diff_slots(old, sel, jnp.array([3]), keep)
    np.testing.assert_array_equal(new_map, [[[4, 3, 1, 6, 2, 5]]])
    np.testing.assert_array_equal(load, [[[-1, 3, 1, -1, -1, -1]]])
    # 3 is the own block (new, not fetched); 1 is fetched into the empty slot.
    np.testing.assert_array_equal(fetch, [[[False, False, True, False, False,
                                            False]]])

  def test_synthetic_selection_locality(self):
    sp = config_lib.SparseConfig(
        variant="nosa", block_size=64, compress_kernel=32, compress_stride=16,
        topk_blocks=64, query_topk_blocks=33, sink_blocks=1, window_blocks=16)
    t0 = offload.synthetic_min_length(sp) + 3000
    sel = jax.jit(lambda t, g: offload.synthetic_selection(t, 2, 600, sp, g),
                  static_argnums=1)
    for gamma in (0.944, 0.889, 0.5):
      prev, new = None, []
      for t in range(t0, t0 + 200):
        idx = np.asarray(sel(jnp.array([t, t + 77]), gamma)).reshape(-1, 64)
        for row, tt in zip(idx, (t, t, t + 77, t + 77), strict=True):
          self.assertLen(set(row.tolist()), 64)  # distinct, all valid
          own = tt // 64
          self.assertContainsSubset({0, own} | set(range(own - 16, own)),
                                    set(row.tolist()))
          self.assertLessEqual(row.max(), own)
        if prev is not None:
          new += [len(set(a) - set(b)) for a, b in zip(idx, prev, strict=True)]
        prev = idx
      self.assertAlmostEqual(1 - np.mean(new) / 64, gamma, delta=0.01)

  def test_synthetic_state_is_prefills_type(self):
    cfg, _, params = _model("nosa")
    opts = offload.OffloadOptions(synthetic_gamma=0.9, cache_blocks=10)
    st = offload.synthetic_state(params, cfg, 2, 250, 300, opts)
    real, _ = offload.prefill(params, cfg, jnp.zeros((2, 250), jnp.int32),
                              jnp.array([250, 250]), 300, options=opts)
    kind = lambda x: (str(jax.typeof(x)), x.sharding.memory_kind)
    self.assertEqual(jax.tree.map(kind, st), jax.tree.map(kind, real))
    self.assertTrue(np.all(np.asarray(st.layers[0].slot_map) == -1))
    np.testing.assert_array_equal(st.lengths_B, [250, 250])
    fetched, compiled = [], offload.decode_step._cache_size()
    for _ in range(21):
      st, _, stats = offload.decode_step(params, cfg, st,
                                         jnp.zeros(2, jnp.int32), opts)
      fetched.append(int(np.sum(stats["fetched"])))
    # One compile for every step; cold start fetches all but the own
    # block; afterwards about (1 - gamma) of the selection per step.
    self.assertEqual(offload.decode_step._cache_size(), compiled + 1)
    sel = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.sparse.topk_blocks
    self.assertEqual(fetched[0], sel * 7 // 8)
    self.assertAlmostEqual(1 - np.mean(fetched[1:]) / sel, 0.9, delta=0.03)
    with self.assertRaisesRegex(ValueError, "too short for synthetic_gamma"):
      offload.synthetic_state(params, cfg, 2, 100, 300, opts)

  def test_options_validation(self):
    with self.assertRaisesRegex(ValueError, "fetch must be one of"):
      offload.OffloadOptions(fetch="dma")
    with self.assertRaisesRegex(ValueError, "cache_blocks"):
      offload.OffloadOptions(cache_blocks=0)
    cfg, _, _ = _model("nosa")
    with self.assertRaisesRegex(ValueError, "below topk_blocks"):
      offload.num_slots(cfg, 1024, offload.OffloadOptions(cache_blocks=2))

  @parameterized.named_parameters(
      ("infllmv2", "infllmv2", offload.OffloadOptions(fetch="loop")),
      ("nosa", "nosa", offload.OffloadOptions(fetch="loop")),
      # The Pallas copy kernel (interpreted on CPU) and a cache that holds
      # every block of the sequence: after a block's first fetch it is
      # never fetched again.
      ("nosa_pallas_all_cached", "nosa", offload.OffloadOptions(
          fetch="pallas", gather_programs=3, cache_blocks=64)),
      ("infllmv2_cache_lru", "infllmv2", offload.OffloadOptions(
          fetch="loop", cache_blocks=9)),
      # The decode attention kernel fetches the misses itself.
      ("nosa_fused", "nosa", offload.OffloadOptions(fetch="fused")),
      ("infllmv2_fused_lru", "infllmv2", offload.OffloadOptions(
          fetch="fused", cache_blocks=9)))
  def test_offload_matches_decode(self, variant, options):
    cfg, graphdef, params = _model(variant)
    sp = cfg.sparse
    c, budget = sp.block_size, sp.topk_blocks  # 16 tokens, 8 blocks
    # 1 token, one full block, a partial block, and 100 tokens that decode
    # past the budget (128 tokens) to 10 blocks.
    lengths = np.array([1, 16, 45, 100])
    steps, b = 50, 4
    max_len = lengths.max() + steps
    tokens = testing.random_tokens(jax.random.key(1), b, max_len)
    ref_BTV = np.asarray(jax.jit(
        lambda t: model.apply(graphdef, params, t)[0])(tokens))
    rows = np.arange(b)
    tol = tolerances.tol(np.float32)
    prompt = tokens[:, :lengths.max()]
    cache, want_BV = decode.prefill(params, cfg, prompt, jnp.asarray(lengths),
                                    max_len)
    state, got_BV = offload.prefill(params, cfg, prompt, jnp.asarray(lengths),
                                    max_len, options=options)
    all_cached = options.cache_blocks == 64
    if all_cached:
      self.assertEqual(state.layers[0].slot_map.shape[-1], max_len // c + 1)
    seen = None
    np.testing.assert_array_equal(got_BV, want_BV)
    prev = None
    for i in range(steps):
      pos = lengths + i
      tok = tokens[rows, pos]
      cache, want_BV, idx_LBKP = decode.decode_step(
          params, cfg, cache, tok, return_selection=True)
      state, got_BV, stats = offload.decode_step(params, cfg, state, tok,
                                                 options)
      if (i + 1) % c == 0:  # the driver's duty (generate does it)
        state = offload.flush(cfg, state)
      # Not bitwise: the slot order (hence the summation order) differs.
      np.testing.assert_allclose(got_BV, want_BV, **tol, err_msg=f"step {i}")
      np.testing.assert_allclose(got_BV, ref_BTV[rows, pos], **tol,
                                 err_msg=f"step {i}")
      idx_LBKP = np.asarray(idx_LBKP)
      sel_LBK = np.asarray(stats["selected"])
      fet_LBK = np.asarray(stats["fetched"])
      np.testing.assert_array_equal(sel_LBK, (idx_LBKP >= 0).sum(-1))
      own_B = pos // c
      cur_sets = [_sets(x) for x in idx_LBKP]
      if all_cached:  # fetched = selected blocks never resident before
        if seen is None:  # prefill's tail block is resident
          seen = [[[{int(lengths[bi] // c)} if lengths[bi] % c else set()
                    for _ in range(cfg.num_kv_heads)] for bi in range(b)]
                  for _ in range(cfg.num_layers)]
        for li in range(cfg.num_layers):
          for bi in range(b):
            for k in range(cfg.num_kv_heads):
              new = cur_sets[li][bi][k] - seen[li][bi][k] - {own_B[bi]}
              self.assertEqual(fet_LBK[li, bi, k], len(new), (i, li, bi, k))
              seen[li][bi][k] |= cur_sets[li][bi][k]
      if prev is None:  # cold start: every selected block but the tail
        np.testing.assert_array_equal(fet_LBK, sel_LBK - 1)
      else:
        # At most the selected blocks that were not selected (hence
        # resident) at the previous step, the new own block excluded.
        prev_sets = [_sets(x) for x in prev]
        for li in range(cfg.num_layers):
          for bi in range(b):
            for k in range(cfg.num_kv_heads):
              new = cur_sets[li][bi][k] - prev_sets[li][bi][k] - {own_B[bi]}
              self.assertLessEqual(fet_LBK[li, bi, k], len(new))
        within_B = own_B + 1 <= budget
        np.testing.assert_array_equal(fet_LBK[:, within_B], 0)
        if variant == "nosa":  # §3: overlap >= k_e = topk - query_topk
          bound = budget - sp.query_topk_blocks
          np.testing.assert_array_less(fet_LBK[:, ~within_B],
                                       budget - bound + 1)
          # §3 instantiated: only the free query-aware picks and the block
          # leaving the window can miss.
          free = sp.query_topk_blocks - sp.sink_blocks - sp.window_blocks - 1
          np.testing.assert_array_less(fet_LBK, free + 1 + 1)
      prev = idx_LBKP
    # The context grew past the budget, with misses along the way.
    self.assertGreater((lengths + steps - 1).max() // c + 1, budget)
    np.testing.assert_array_equal(state.lengths_B, lengths + steps)
    # After a final flush the host store holds every completed block,
    # equal to decode's cache (up to rounding: layer 1's keys see layer 0's
    # attention output).
    state = offload.flush(cfg, state)
    for lc, lo in zip(cache.layers, state.layers, strict=True):
      k_BKNCD = np.asarray(lc.k_BKSD).reshape(lo.k_host.shape)
      host = np.asarray(lo.k_host)
      for bi in range(b):
        done = (lengths[bi] + steps) // c
        np.testing.assert_allclose(host[bi, :, :done],
                                   k_BKNCD[bi, :, :done], **tol)

  def test_streamed_prefill_matches_decode_prefill(self):
    # Variable lengths: two below the 128-token budget (7 is a partial
    # block, 16 a whole one), one past it; B = 5 in groups of 2 covers a
    # full group and a smaller last one.
    cfg, _, params = _model("nosa")
    # Bit-identical on the CPU. On the GPU the two programs fuse
    # differently: up to 1.5e-6 apart in fp32 (H200, 2026-11-23).
    same = (np.testing.assert_array_equal if jax.default_backend() == "cpu"
            else functools.partial(np.testing.assert_allclose,
                                   **tolerances.tol(np.float32)))
    c, kern = cfg.sparse.block_size, cfg.sparse.compress_kernel
    lengths = np.array([200, 7, 45, 130, 16])
    b, steps = len(lengths), 20
    max_len = 240  # N = 15 blocks
    tokens = testing.random_tokens(jax.random.key(2), b, max_len)
    prompt = tokens[:, :208]  # whole blocks, as generate pads them
    cache, want_BV = decode.prefill(params, cfg, prompt, jnp.asarray(lengths),
                                    max_len)
    whole, got_BV = offload.prefill(params, cfg, prompt, lengths, max_len)
    same(got_BV, want_BV)
    compiled = offload._prefill._cache_size()
    grouped, got_BV = offload.prefill(params, cfg, prompt, lengths, max_len,
                                      prefill_batch=2)
    self.assertEqual(offload._prefill._cache_size(), compiled + 2)  # 2, 1
    # Rows never interact: a group's numbers are the whole batch's.
    same(got_BV, want_BV)
    kind = lambda x: (str(jax.typeof(x)), x.sharding.memory_kind)
    self.assertEqual(jax.tree.map(kind, grouped), jax.tree.map(kind, whole))
    jax.tree.map(same, grouped, whole)
    same(grouped.lengths_B, lengths)
    # The host store is decode's K/V cache in the block-major layout, and
    # the device keeps decode's selection state plus the last kern keys.
    tail = np.where(lengths % c != 0, lengths // c, -1)
    for lc, lo in zip(cache.layers, grouped.layers, strict=True):
      self.assertEqual(lo.k_host.sharding.memory_kind, "pinned_host")
      shape = lo.k_host.shape
      self.assertEqual(shape, (b, cfg.num_kv_heads, 15, c, cfg.head_dim))
      same(lo.k_host, np.reshape(lc.k_BKSD, shape))
      same(lo.v_host, np.reshape(lc.v_BKSD, shape))
      for f in ("bias_BKS", "kbar_BWKD", "ebar_BKW"):
        same(getattr(lo, f), getattr(lc, f))
      k_BKSD = np.pad(np.asarray(lc.k_BKSD), ((0, 0), (0, 0), (kern, 0),
                                              (0, 0)))
      for bi, n in enumerate(lengths):
        same(lo.key_buf[bi], k_BKSD[bi, :, n:n + kern])
      same(
          lo.slot_map[:, :, 0],
          np.broadcast_to(tail[:, None], (b, cfg.num_kv_heads)))
      same(lo.slot_map[:, :, 1:], -1)
    # Decoding from the grouped state is decode.decode_step's.
    rows, state = np.arange(b), grouped
    tol = tolerances.tol(np.float32)
    for i in range(steps):
      tok = tokens[rows, lengths + i]
      cache, want_BV = decode.decode_step(params, cfg, cache, tok)
      state, got_BV, _ = offload.decode_step(params, cfg, state, tok)
      if (i + 1) % c == 0:
        state = offload.flush(cfg, state)
      np.testing.assert_allclose(got_BV, want_BV, **tol, err_msg=f"step {i}")
    with self.assertRaisesRegex(ValueError, "prefill_batch must be"):
      offload.prefill(params, cfg, prompt, lengths, max_len, prefill_batch=0)

  def test_prefill_device_memory(self):
    # 8 layers, 64-token prompts in a 4096-token store: the K/V of all
    # layers at capacity (33.5 MB) dwarf one layer's activations. On CPU
    # memory_analysis counts pinned_host outputs as ordinary outputs (the
    # host_* fields stay 0), so only the temporaries say what the device
    # holds besides the state it keeps.
    cfg = testing.tiny_model_config("nosa", num_layers=8)
    _, params = model.init(cfg, 0)
    b, t, max_len = 4, 64, 4096
    tokens = jnp.zeros((b, t), jnp.int32)
    lengths = jnp.full((b,), t, jnp.int32)
    kv_all = offload.host_store_bytes(cfg, b, max_len)

    def temp_bytes(g, **kwargs):
      stats = offload._prefill.lower(params, cfg, tokens[:g], lengths[:g],
                                     max_len, **kwargs).compile()
      stats = stats.memory_analysis()
      if stats is None:
        self.skipTest("this backend's memory_analysis() returns None")
      return stats.temp_size_in_bytes

    whole = temp_bytes(b)
    # The design bound: at most two layers' K/V in flight, plus activations
    # (under three layers' worth; all eight would be 33.5 MB). The CPU holds
    # under two; the GPU (H200, 2026-11-23) 9.47 MB = 2.26 layers.
    self.assertLess(whole, 3 * kv_all // cfg.num_layers)
    # A group of one holds a quarter of the batch's activations.
    state = offload._empty_state(params, cfg, b, t, max_len,
                                 offload.DEFAULT_OPTIONS)
    one = temp_bytes(1, into=state, row0=jnp.int32(0))
    self.assertLess(one, whole // 2)
    # What enforces the bound on the GPU, where the scheduler could
    # otherwise delay the copies: layer i's copy must finish before layer
    # i + 2 starts (one barrier per layer but the last).
    jaxpr = jax.make_jaxpr(lambda p: offload._prefill(
        p, cfg, tokens, lengths, max_len))(params)
    self.assertEqual(str(jaxpr).count("optimization_barrier"),
                     cfg.num_layers - 1)

  def test_generate_matches_decode(self):
    cfg, _, params = _model("nosa")
    prompts = [[1, 2, 3], list(range(40, 140))]  # the second passes 128
    want = decode.generate(params, cfg, prompts, 40)
    got, stats = offload.generate(params, cfg, prompts, 40,
                                  return_stats=True)
    self.assertEqual(got, want)
    # One prompt per prefill pass: the same tokens.
    self.assertEqual(offload.generate(params, cfg, prompts, 40,
                                      prefill_batch=1), want)
    self.assertEqual(stats["decode_steps"], 39)
    hit = np.array(stats["hit_rate"])
    self.assertTrue(np.all((hit > 0) & (hit <= 1)), hit)
    self.assertTrue(np.all(np.array(stats["fetched_blocks"]) > 0))

  @pytest.mark.slow  # a subprocess start + compile: ~17 s on 2 cores
  def test_generate_cli(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.generate",
           "--config=configs/tiny.py", "--prompt=def f(", "--offload=host",
           "--max_new_tokens=20"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    self.assertIn("offload=host", run.stdout)
    self.assertRegex(run.stdout, r"20 tokens; decode [0-9.]+ tokens/s .* "
                     r"block-cache hit rate per layer: ([0-9.]+ ){3}[0-9.]+")
    bad = subprocess.run(cmd + ["--cache_blocks=3"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    self.assertEqual(bad.returncode, 1)
    self.assertEqual(bad.stderr.strip().splitlines()[-1],
                     "generate error: OffloadOptions.cache_blocks=3 is below "
                     "topk_blocks=8; the cache must hold a whole selection")


if __name__ == "__main__":
  absltest.main()
