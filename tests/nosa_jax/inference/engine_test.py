"""The decode engine over both KV stores.

STYLE.md rule 11 (b), (c), (d): prefill + one-token steps reproduce the
teacher-forced `model.apply` logits at every position for every variant and
every store (variable-length batch, contexts below and past the selection
budget, tails filling); the host store attends to exactly the device
store's selection, and its fetch counts obey the cold start and §3's
locality bound; a tiny model that memorised a sequence samples it back.
"""

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nosa_jax import model
from nosa_jax import selection
from nosa_jax import testing
from nosa_jax.inference import engine
from nosa_jax.inference import host_memory
from nosa_jax.inference import stores
from tests import tolerances


_model = testing.tiny_model_with_bias
DEVICE = stores.DeviceStore()
# Prompts of 1 token, one full block and a partial block, which fill their
# tail blocks and go on into the next, and 120 tokens that decode past the
# budget (8 blocks of 16 = 128 tokens, passed at step 8) to 9 whole blocks.
# STEPS = 24 > C: the host store writes back once inside the loop.
LENGTHS = np.array([1, 16, 45, 120])
STEPS = 24


def _sets(idx_BKP):
  return [[set(int(j) for j in row if j >= 0) for row in per_b]
          for per_b in idx_BKP]


@functools.cache
def _reference(variant):
  """Forward logits and the device store's run of the shared case."""
  cfg, graphdef, params = _model(variant)
  max_len = LENGTHS.max() + STEPS
  tokens = testing.random_tokens(jax.random.key(1), len(LENGTHS), max_len)
  ref_BTV = np.asarray(jax.jit(
      lambda t: model.apply(graphdef, params, t)[0])(tokens))
  logits, idx, state = _run(params, cfg, tokens, DEVICE)
  return tokens, ref_BTV, logits, idx, state


def _run(params, cfg, tokens, store, steps=STEPS, lengths=LENGTHS):
  """Prefill + `steps` decode steps; per-step logits, selections, stats."""
  rows = np.arange(len(lengths))
  state, logits_BV = engine.prefill(
      params, cfg, tokens[:, :lengths.max()], jnp.asarray(lengths),
      lengths.max() + steps, store=store)
  out = [np.asarray(logits_BV)]
  idx = []
  for i in range(steps):
    state, logits_BV, info = engine.decode_step(
        params, cfg, state, tokens[rows, lengths + i])
    if store.writes_back and (i + 1) % cfg.sparse.block_size == 0:
      state = engine.write_back(cfg, state)  # the loop's duty
    out.append(np.asarray(logits_BV))
    idx.append((np.asarray(info["selected"]), np.asarray(info["fetched"])))
  return out, idx, state


class DecodeMatchesForwardTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (v, v) for v in ("full", "infllmv2", "dma", "nosa"))
  def test_device_store(self, variant):
    cfg, _, _ = _model(variant)
    c, budget = cfg.sparse.block_size, cfg.sparse.topk_blocks
    tokens, ref_BTV, logits, idx, state = _reference(variant)
    rows, tol = np.arange(len(LENGTHS)), tolerances.tol(np.float32)
    for i, logits_BV in enumerate(logits):
      np.testing.assert_allclose(logits_BV, ref_BTV[rows, LENGTHS - 1 + i],
                                 **tol, err_msg=f"step {i}")
    prev = None
    for i, (idx_LBKP, fetched_LBK) in enumerate(idx):
      np.testing.assert_array_equal(fetched_LBK, 0)
      # All causal blocks within the budget, else exactly the budget; the
      # own block is always in.
      own_B = (LENGTHS + i) // c
      want_B = (np.minimum(own_B + 1, budget) if cfg.sparse.is_sparse
                else own_B + 1)
      n_valid_LBK = (idx_LBKP >= 0).sum(-1)
      np.testing.assert_array_equal(n_valid_LBK, np.broadcast_to(
          want_B[None, :, None], n_valid_LBK.shape))
      self.assertTrue(np.all(np.any(idx_LBKP == own_B[None, :, None, None],
                                    axis=-1)))
      if prev is not None:
        gamma_LBK = np.asarray(selection.selection_gamma(prev, idx_LBKP))
        self.assertTrue(np.all((gamma_LBK >= 0) & (gamma_LBK <= 1)))
        np.testing.assert_array_equal(gamma_LBK[:, own_B + 1 <= budget], 1.0)
      prev = idx_LBKP
    np.testing.assert_array_equal(state.lengths_B, LENGTHS + STEPS)

  # Each fetch mode with and without an eviction bias (nosa / infllmv2);
  # dma's host store runs nosa's code (a bias, no query-aware picks).
  @parameterized.named_parameters(
      ("nosa", "nosa", stores.HostStore(fetch="loop")),
      # The Pallas copy kernel (interpreted on CPU) and a cache that holds
      # every block of the sequence: after a block's first fetch it is
      # never fetched again.
      ("nosa_pallas_all_cached", "nosa", stores.HostStore(
          fetch="pallas", gather_programs=3, cache_blocks=64)),
      # A cache larger than the budget: least recently used blocks leave.
      ("infllmv2_cache_lru", "infllmv2", stores.HostStore(
          fetch="loop", cache_blocks=9)),
      # The decode attention kernel fetches the misses itself.
      ("nosa_fused", "nosa", stores.HostStore(fetch="fused")),
      ("infllmv2_fused_lru", "infllmv2", stores.HostStore(
          fetch="fused", cache_blocks=9)))
  def test_host_store_matches_device_store(self, variant, store):
    cfg, _, params = _model(variant)
    sp = cfg.sparse
    c, budget = sp.block_size, sp.topk_blocks
    tokens, ref_BTV, want, want_idx, dev_state = _reference(variant)
    got, got_idx, state = _run(params, cfg, tokens, store)
    rows, tol = np.arange(len(LENGTHS)), tolerances.tol(np.float32)
    np.testing.assert_array_equal(got[0], want[0])  # the same prefill
    for i in range(1, STEPS + 1):
      # Not bitwise: the slot order (hence the summation order) differs.
      np.testing.assert_allclose(got[i], want[i], **tol, err_msg=f"step {i}")
      np.testing.assert_allclose(got[i], ref_BTV[rows, LENGTHS - 1 + i],
                                 **tol, err_msg=f"step {i}")
    if store.cache_blocks == 64:
      self.assertEqual(state.layers[0].kv.slot_map.shape[-1],
                       state.num_blocks)
    seen = prev = None
    for i, ((idx_LBKP, fet_LBK), (want_LBKP, _)) in enumerate(
        zip(got_idx, want_idx, strict=True)):
      np.testing.assert_array_equal(idx_LBKP, want_LBKP)
      sel_LBK = (idx_LBKP >= 0).sum(-1)
      own_B = (LENGTHS + i) // c
      cur = [_sets(x) for x in idx_LBKP]
      cells = [(li, bi, k) for li in range(cfg.num_layers)
               for bi in range(len(LENGTHS))
               for k in range(cfg.num_kv_heads)]
      if store.cache_blocks == 64:  # fetched = blocks never resident before
        if seen is None:  # prefill's tail block is resident
          seen = {(li, bi, k): ({int(LENGTHS[bi] // c)} if LENGTHS[bi] % c
                                else set()) for li, bi, k in cells}
        for li, bi, k in cells:
          new = cur[li][bi][k] - seen[li, bi, k] - {own_B[bi]}
          self.assertEqual(fet_LBK[li, bi, k], len(new), (i, li, bi, k))
          seen[li, bi, k] |= cur[li][bi][k]
      if prev is None:  # cold start: every selected block but the tail
        np.testing.assert_array_equal(fet_LBK, sel_LBK - 1)
      else:
        # At most the selected blocks not selected (hence resident) at the
        # previous step, the new own block excluded.
        prev_sets = [_sets(x) for x in prev]
        for li, bi, k in cells:
          new = cur[li][bi][k] - prev_sets[li][bi][k] - {own_B[bi]}
          self.assertLessEqual(fet_LBK[li, bi, k], len(new))
        within_B = own_B + 1 <= budget
        np.testing.assert_array_equal(fet_LBK[:, within_B], 0)
        if sp.query_aware and sp.has_eviction_head:  # nosa
          # §3 instantiated: only the free query-aware picks and the block
          # leaving the window can miss.
          free = sp.query_topk_blocks - sp.sink_blocks - sp.window_blocks - 1
          np.testing.assert_array_less(fet_LBK, free + 1 + 1)
      prev = idx_LBKP
    if sp.query_aware and store.cache_blocks is None:  # not vacuous
      # (dma's selection past the window never changes: no misses.)
      self.assertGreater(sum(int(f.sum()) for _, f in got_idx[1:]), 0)
    # After a final write-back the host store holds every completed block,
    # equal to the device store's cache (up to rounding: layer 1's keys see
    # layer 0's attention output).
    state = engine.write_back(cfg, state)
    for dev, host in zip(dev_state.layers, state.layers, strict=True):
      k_BKNCD = np.asarray(dev.kv.k_BKSD).reshape(host.kv.k_host.shape)
      k_host = np.asarray(host.kv.k_host)
      for bi in range(len(LENGTHS)):
        done = (LENGTHS[bi] + STEPS) // c
        np.testing.assert_allclose(k_host[bi, :, :done],
                                   k_BKNCD[bi, :, :done], **tol)

  def test_pallas_matches_forward(self):
    """The kernels (interpret mode on CPU) in prefill and decode: the
    attention, and the block scores of the prefill's selection (decode
    scores its one query with XLA, `select_decode_blocks`)."""
    cfg, graphdef, params = _model("nosa")
    cfg = dataclasses.replace(cfg, sparse=dataclasses.replace(
        cfg.sparse, implementation="pallas", score_implementation="pallas"))
    lengths = np.array([3, 130])
    tokens = testing.random_tokens(jax.random.key(2), 2, 133)
    ref_BTV = np.asarray(jax.jit(
        lambda t: model.apply(graphdef, params, t)[0])(tokens))
    logits, _, _ = _run(params, cfg, tokens, DEVICE, steps=3,
                        lengths=lengths)
    for i, logits_BV in enumerate(logits):
      np.testing.assert_allclose(logits_BV, ref_BTV[[0, 1], lengths - 1 + i],
                                 **tolerances.tol(np.float32))


class PrefillTest(parameterized.TestCase):

  @parameterized.named_parameters(("device", DEVICE),
                                  ("host", stores.HostStore(fetch="loop")))
  def test_grouped_prefill_is_the_whole_prefill(self, store):
    # Variable lengths: two below the 128-token budget (7 is a partial
    # block, 16 a whole one), one past it; B = 5 in groups of 3 covers a
    # full group and a smaller last one. (Groups of one, whose [1, M] x
    # [M, V] head is a matrix-vector product that XLA's CPU backend rounds
    # differently at optimization level 0, are GenerateTest's
    # prefill_batch=1.)
    cfg, _, params = _model("nosa")
    # Bit-identical on the CPU; on the GPU the programs fuse differently.
    same = (np.testing.assert_array_equal if jax.default_backend() == "cpu"
            else functools.partial(np.testing.assert_allclose,
                                   **tolerances.tol(np.float32)))
    c, kern = cfg.sparse.block_size, cfg.sparse.compress_kernel
    lengths = np.array([200, 7, 45, 130, 16])
    b, max_len = len(lengths), 240  # N = 15 blocks
    tokens = testing.random_tokens(jax.random.key(2), b, max_len)
    prompt = tokens[:, :208]  # whole blocks, as generate pads them
    whole, want_BV = engine.prefill(params, cfg, prompt, lengths, max_len,
                                    store=store)
    compiled = engine._prefill._cache_size()
    grouped, got_BV = engine.prefill(params, cfg, prompt, lengths, max_len,
                                     store=store, prefill_batch=3)
    self.assertEqual(engine._prefill._cache_size(), compiled + 2)  # 3, 2
    # Rows never interact: a group's numbers are the whole batch's.
    same(got_BV, want_BV)
    kind = lambda x: (str(jax.typeof(x)), x.sharding.memory_kind)
    self.assertEqual(jax.tree.map(kind, grouped), jax.tree.map(kind, whole))
    jax.tree.map(same, grouped, whole)
    same(grouped.lengths_B, lengths)
    if isinstance(store, stores.HostStore):  # the rolling key buffer
      for lay in grouped.layers:
        k_BKSD = np.reshape(lay.kv.k_host, (b, cfg.num_kv_heads, -1,
                                            cfg.head_dim))
        k_BKSD = np.pad(k_BKSD, ((0, 0), (0, 0), (kern, 0), (0, 0)))
        for bi, n in enumerate(lengths):
          same(lay.kv.keys_BKRD[bi], k_BKSD[bi, :, n:n + kern])
    if isinstance(store, stores.HostStore):
      tail = np.where(lengths % c != 0, lengths // c, -1)
      for lay in grouped.layers:
        self.assertEqual(lay.kv.k_host.sharding.memory_kind, "pinned_host")
        same(lay.kv.slot_map[:, :, 0],
             np.broadcast_to(tail[:, None], (b, cfg.num_kv_heads)))
        same(lay.kv.slot_map[:, :, 1:], -1)
    with self.assertRaisesRegex(ValueError, "prefill_batch must be"):
      engine.prefill(params, cfg, prompt, lengths, max_len, prefill_batch=0)

  def test_host_prefill_device_memory(self):
    # 8 layers, 64-token prompts in a 4096-token store: the K/V of all
    # layers at capacity (33.5 MB) dwarf one layer's activations. On CPU
    # memory_analysis counts pinned_host outputs as ordinary outputs (the
    # host_* fields stay 0), so only the temporaries say what the device
    # holds besides the state it keeps.
    cfg = testing.tiny_model_config("nosa", num_layers=8)
    _, params = model.init(cfg, 0)
    store = stores.HostStore()
    b, t, max_len = 4, 64, 4096
    tokens = jnp.zeros((b, t), jnp.int32)
    lengths = jnp.full((b,), t, jnp.int32)
    kv_all = host_memory.host_store_bytes(cfg, b, max_len)

    def temp_bytes(g, **kwargs):
      stats = engine._prefill.lower(params, cfg, tokens[:g], lengths[:g],
                                    max_len, store, **kwargs).compile()
      stats = stats.memory_analysis()
      if stats is None:
        self.skipTest("this backend's memory_analysis() returns None")
      return stats.temp_size_in_bytes

    whole = temp_bytes(b)
    # The design bound: at most two layers' K/V in flight, plus activations
    # (under three layers' worth; all eight would be 33.5 MB).
    self.assertLess(whole, 3 * kv_all // cfg.num_layers)
    # A group of one holds a quarter of the batch's activations.
    state = engine.empty_state(params, cfg, b, t, max_len, store)
    self.assertLess(temp_bytes(1, into=state, row0=jnp.int32(0)), whole // 2)
    # What enforces the bound on the GPU: layer i's store must be done
    # before layer i + 2 starts (one barrier per layer but the last).
    jaxpr = jax.make_jaxpr(lambda p: engine._prefill(
        p, cfg, tokens, lengths, max_len, store))(params)
    self.assertEqual(str(jaxpr).count("optimization_barrier"),
                     cfg.num_layers - 1)


class PredictionTest(parameterized.TestCase):
  """decode_step's one-layer-ahead selection guess (prefetch study)."""

  @parameterized.parameters("nosa", "infllmv2")
  def test_exact_when_the_previous_layer_is_the_identity(self, variant):
    cfg, _, params = _model(variant)
    # Layer 0 adds nothing to the residual stream: layer 1's input is layer
    # 0's, so its guessed query is its real one and the guess must equal
    # the selection (the current token's own key only touches forced
    # blocks).
    for var in (params["blocks"][0]["attn"]["wo"],
                params["blocks"][0]["mlp"]["w_down"]):
      var.set_value(jnp.zeros_like(var.get_value()))
    # Prompts that pass the budget within the steps; the shapes (and so the
    # prefill and plain decode programs) are DecodeMatchesForwardTest's.
    lengths, rows = np.array([120, 113, 106, 117]), np.arange(len(LENGTHS))
    width, max_len = LENGTHS.max(), LENGTHS.max() + STEPS
    tokens = testing.random_tokens(jax.random.key(3), len(LENGTHS), max_len)
    states = [engine.prefill(params, cfg, tokens[:, :width],
                             jnp.asarray(lengths), max_len)[0]
              for _ in range(2)]
    runs = []
    for i in range(STEPS):
      tok = tokens[rows, lengths + i]
      states[0], logits_BV, info = engine.decode_step(params, cfg, states[0],
                                                      tok, predict=True)
      states[1], want_BV, want = engine.decode_step(params, cfg, states[1],
                                                    tok)
      np.testing.assert_array_equal(logits_BV, want_BV)  # never changes
      np.testing.assert_array_equal(info["selected"], want["selected"])
      idx, pred = np.asarray(info["selected"]), np.asarray(info["predicted"])
      np.testing.assert_array_equal(pred[0], -1)  # no guess for layer 0
      np.testing.assert_array_equal(pred[1], idx[1])
      runs.append((idx, pred))
    misses = covered = 0
    for (prev, _), (idx, pred) in zip(runs[:-1], runs[1:], strict=True):
      m, c, e = (np.asarray(x) for x in selection.prefetch_coverage(
          prev[1], idx[1], pred[1]))
      misses, covered = misses + m.sum(), covered + c.sum()
      np.testing.assert_array_equal(e, 0)
    self.assertGreater(misses, 0)  # the case is not vacuous
    self.assertEqual(covered, misses)
    full = testing.tiny_model_config("full")
    with self.assertRaisesRegex(ValueError, "predict=True needs"):
      engine.decode_step(None, full, None, None, predict=True)


class GenerateTest(parameterized.TestCase):

  def test_seeded_sampling_and_stores(self):
    cfg, _, params = _model("nosa")
    prompts = [[1, 2, 3], list(range(40, 140))]  # the second passes 128
    run = lambda **kw: engine.generate(params, cfg, prompts, 40, **kw)
    sampled = run(temperature=1.0, top_p=0.9, seed=3)
    self.assertEqual(sampled, run(temperature=1.0, top_p=0.9, seed=3))
    self.assertNotEqual(sampled, run(temperature=1.0, top_p=0.9, seed=4))
    self.assertEqual([len(s) for s in sampled], [40, 40])
    greedy, stats = run(temperature=0.0, return_stats=True)
    self.assertEqual(greedy, run(temperature=1.0, top_p=1e-6, seed=5))
    self.assertEqual(stats["decode_steps"], 39)
    self.assertGreater(stats["decode_tokens_per_s"], 0)
    gamma = np.array(stats["gamma_per_layer"])
    self.assertTrue(np.all((gamma > 0) & (gamma <= 1)), gamma)
    np.testing.assert_array_equal(stats["fetched_blocks"], 0)
    # The host store, one prompt per prefill: the same tokens (PrefillTest
    # checks that a grouped prefill is the whole one).
    got, host_stats = run(store=stores.HostStore(), prefill_batch=1,
                          return_stats=True)
    self.assertEqual(got, greedy)
    self.assertEqual(host_stats["gamma_per_layer"], stats["gamma_per_layer"])
    hit = np.array(host_stats["hit_rate"])
    self.assertTrue(np.all((hit > 0) & (hit < 1)), hit)

  @pytest.mark.slow  # ~20 s; the equivalences: ChunkedPrefillTest, PrefetchTest
  def test_chunked_prefill_and_prefetch(self):
    cfg, _, params = _model("nosa")
    prompts = [[1, 2, 3], list(range(40, 140))]
    run = lambda **kw: engine.generate(params, cfg, prompts, 40, **kw)
    greedy = run()
    # A chunked prefill into the host store: the same greedy tokens.
    self.assertEqual(run(store=stores.HostStore(), prefill_chunk=32), greedy)
    # Prefetch into spare slots: the same tokens, counted loads.
    got, pf_stats = run(store=stores.HostStore(cache_blocks=16),
                        prefetch=True, return_stats=True)
    self.assertEqual(got, greedy)
    self.assertEqual(pf_stats["prefetched_blocks"][0], 0)  # layer 0
    self.assertTrue(all(0 <= h <= p for h, p in zip(
        pf_stats["prefetch_hits"], pf_stats["prefetched_blocks"],
        strict=True)))
    with self.assertRaisesRegex(ValueError, "prefetch=True needs"):
      run(prefetch=True)

  def test_errors(self):
    cfg, _, params = _model("nosa")
    with self.assertRaisesRegex(ValueError, "max_len=20 is too small"):
      engine.generate(None, cfg, [[1] * 16], 8, max_len=20)  # 16 + 8 - 1
    with self.assertRaisesRegex(ValueError, "the host KV store needs"):
      engine.generate(params, cfg, [[1, 2, 3]], 10,
                      store=stores.HostStore(), host_memory_limit=10)
    with self.assertRaisesRegex(ValueError, "not 'full'"):
      engine.generate(None, testing.tiny_model_config("full"), [[1]], 2,
                      store=stores.HostStore())

  def test_generates_memorised_sequence(self):
    """Greedy decode of a tiny NOSA model reproduces what it memorised."""
    cfg, _, params, seq, _, last = testing.overfit_sequence("nosa")
    self.assertLess(last, 0.05)
    seq = seq.tolist()
    out = engine.generate(params, cfg.model, [seq[:5], seq[:20]], 24)
    self.assertEqual(out, [seq[5:29], seq[20:44]])
    # EOS: a sequence stops right after emitting it; the other goes on
    # until it emits it too (or runs out of tokens).
    eos = seq[10]
    out = engine.generate(params, cfg.model, [seq[:5], seq[:20]], 24,
                          eos_id=eos, pad_id=258)
    want = []
    for start in (5, 20):
      cont = seq[start:start + 24]
      want.append(cont[:cont.index(eos) + 1] if eos in cont else cont)
    self.assertEqual(out, want)

  def test_serving_params_are_bit_identical(self):
    cfg = testing.tiny_model_config("nosa", dtype="bfloat16")
    _, params = model.init(cfg, 0)
    served = model.serving_params(params, cfg)
    cast = set(model.MATMUL_WEIGHTS + model.EMBEDDINGS)
    for path, x in jax.tree_util.tree_flatten_with_path(served)[0]:
      names = {getattr(k, "key", None) for k in path}
      want = jnp.bfloat16 if names & cast else jnp.float32
      self.assertEqual(x.dtype, want, jax.tree_util.keystr(path))
    tokens = testing.random_tokens(jax.random.key(3), 2, 40)
    lengths = jnp.array([40, 23])
    outs = []
    for p in (params, served):
      state, logits_BV = engine.prefill(p, cfg, tokens, lengths, 48)
      state, step_BV, _ = engine.decode_step(p, cfg, state, tokens[:, 0])
      outs.append((np.asarray(logits_BV), np.asarray(step_BV)))
    for a, b in zip(outs[0], outs[1], strict=True):
      if jax.default_backend() == "gpu":
        # XLA's GPU fusions round differently when the cast is fused into
        # the GEMM: bf16 agreement.
        np.testing.assert_allclose(a, b, **tolerances.tol("bfloat16"))
      else:
        np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
