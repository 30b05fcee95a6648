"""Offloaded decode engine: same logits as decode.py, K/V on pinned host.

Checks that the host store lives in `pinned_host` memory, that offloaded
decode reproduces decode.py (and the teacher-forced forward) step by step
for infllmv2 and nosa (variable lengths, contexts below and past the
budget, tails filling), that greedy generate matches, and the fetch counts
(cold start, misses only, the §3 locality bound for nosa).
"""


from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import decode
from nosa_jax import model
from nosa_jax import offload
from nosa_jax import testing
from tests import tolerances


_model = testing.tiny_model_with_bias


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
    with self.assertRaisesRegex(ValueError, "offload supports"):
      offload.prefill(params, testing.tiny_model_config("full"), tokens,
                      jnp.array([40, 7]), 64)

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

  @parameterized.named_parameters(("infllmv2", "infllmv2"), ("nosa", "nosa"))
  def test_offload_matches_decode(self, variant):
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
                                    max_len)
    np.testing.assert_array_equal(got_BV, want_BV)
    prev = None
    for i in range(steps):
      pos = lengths + i
      tok = tokens[rows, pos]
      cache, want_BV, idx_LBKP = decode.decode_step(
          params, cfg, cache, tok, return_selection=True)
      state, got_BV, stats = offload.decode_step(params, cfg, state, tok)
      # Not bitwise: the slot order (hence the summation order) differs.
      np.testing.assert_allclose(got_BV, want_BV, **tol, err_msg=f"step {i}")
      np.testing.assert_allclose(got_BV, ref_BTV[rows, pos], **tol,
                                 err_msg=f"step {i}")
      idx_LBKP = np.asarray(idx_LBKP)
      sel_LBK = np.asarray(stats["selected"])
      fet_LBK = np.asarray(stats["fetched"])
      np.testing.assert_array_equal(sel_LBK, (idx_LBKP >= 0).sum(-1))
      own_B = pos // c
      if prev is None:  # cold start: every selected block but the tail
        np.testing.assert_array_equal(fet_LBK, sel_LBK - 1)
      else:
        # At most the selected blocks that were not selected (hence
        # resident) at the previous step, the new own block excluded.
        cur_sets = [_sets(x) for x in idx_LBKP]
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
    # The host store holds every completed block, equal to decode's cache
    # (up to rounding: layer 1's keys see layer 0's attention output).
    for lc, lo in zip(cache.layers, state.layers, strict=True):
      k_BKNCD = np.asarray(lc.k_BKSD).reshape(lo.k_host.shape)
      host = np.asarray(lo.k_host)
      for bi in range(b):
        done = (lengths[bi] + steps) // c
        np.testing.assert_allclose(host[bi, :, :done],
                                   k_BKNCD[bi, :, :done], **tol)

  def test_generate_matches_decode(self):
    cfg, _, params = _model("nosa")
    prompts = [[1, 2, 3], list(range(40, 140))]  # the second passes 128
    want = decode.generate(params, cfg, prompts, 40)
    got, stats = offload.generate(params, cfg, prompts, 40,
                                  return_stats=True)
    self.assertEqual(got, want)
    self.assertEqual(stats["decode_steps"], 39)
    hit = np.array(stats["hit_rate"])
    self.assertTrue(np.all((hit > 0) & (hit <= 1)), hit)
    self.assertTrue(np.all(np.array(stats["fetched_blocks"]) > 0))


if __name__ == "__main__":
  absltest.main()
