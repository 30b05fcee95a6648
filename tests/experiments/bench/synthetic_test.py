"""Synthetic selections have the locality asked for; synthetic states have
prefill's types and decode like a cold-started prefill."""

import json
import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import synthetic
from nosa_jax import config as config_lib
from nosa_jax import testing
from nosa_jax.inference import engine
from nosa_jax.inference import stores


class SyntheticTest(absltest.TestCase):

  def test_synthetic_selection_locality(self):
    sp = config_lib.SparseConfig(
        variant="nosa", block_size=64, compress_kernel=32, compress_stride=16,
        topk_blocks=64, query_topk_blocks=33, sink_blocks=1, window_blocks=16)
    t0 = synthetic.synthetic_min_length(sp) + 3000
    sel = jax.jit(lambda t, g: synthetic.synthetic_selection(t, 2, 600, sp, g),
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

  def test_synthetic_guess(self):
    sp = config_lib.SparseConfig(variant="nosa")  # topk 64, 1 sink, 16 window
    pos_B = jnp.asarray([20000, 30000])
    n = 30000 // sp.block_size + 1
    pred = jnp.zeros((2, 2, sp.topk_blocks), jnp.int32)
    want = synthetic.synthetic_selection(pos_B, 2, n, sp, 0.9, salt=3)
    oracle = synthetic.SyntheticGuess(sp, 0.9)(pred, pos_B, n, 3)
    np.testing.assert_array_equal(oracle, want)
    wrong = synthetic.SyntheticGuess(sp, 0.9, accuracy=0.0)(pred, pos_B, n, 3)
    lane = (want >= sp.sink_blocks) & (
        want < (pos_B // sp.block_size - sp.window_blocks)[:, None, None])
    # Every lane pick moves, the forced blocks stay.
    np.testing.assert_array_equal(wrong != want, lane)
    half = synthetic.SyntheticGuess(sp, 0.9, accuracy=0.5)(pred, pos_B, n, 3)
    share = float(jnp.sum(half != want) / jnp.sum(lane))
    self.assertBetween(share, 0.3, 0.7)
    with self.assertRaisesRegex(ValueError, "accuracy"):
      synthetic.SyntheticGuess(sp, 0.9, accuracy=1.5)

  def test_synthetic_state_is_prefills_type(self):
    cfg, _, params = testing.tiny_model_with_bias("nosa")
    store = stores.HostStore(cache_blocks=10)
    override = synthetic.SyntheticSelection(cfg.sparse, 0.9)
    st = synthetic.synthetic_state(params, cfg, store, 2, 250, 300, 0.9)
    real, _ = engine.prefill(params, cfg, jnp.zeros((2, 250), jnp.int32),
                             jnp.array([250, 250]), 300, store=store)
    kind = lambda x: (str(jax.typeof(x)), x.sharding.memory_kind)
    self.assertEqual(jax.tree.map(kind, st), jax.tree.map(kind, real))
    self.assertTrue(np.all(np.asarray(st.layers[0].kv.slot_map) == -1))
    np.testing.assert_array_equal(st.lengths_B, [250, 250])
    fetched, compiled = [], engine.decode_step._cache_size()
    for _ in range(21):
      st, _, info = engine.decode_step(params, cfg, st,
                                       jnp.zeros(2, jnp.int32),
                                       override=override)
      fetched.append(int(np.sum(info["fetched"])))
    # One compile for every step; cold start fetches all but the own
    # block; afterwards about (1 - gamma) of the selection per step.
    self.assertEqual(engine.decode_step._cache_size(), compiled + 1)
    sel = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.sparse.topk_blocks
    self.assertEqual(fetched[0], sel * 7 // 8)
    self.assertAlmostEqual(1 - np.mean(fetched[1:]) / sel, 0.9, delta=0.03)
    with self.assertRaisesRegex(ValueError, "too short for a synthetic"):
      synthetic.synthetic_state(params, cfg, store, 2, 100, 300, 0.9)


class MeasuredGammaTest(absltest.TestCase):

  def _write(self, data):
    path = self.create_tempfile().full_path
    with open(path, "w") as f:
      json.dump(data, f)
    return path

  def test_recall_summary_mean_over_seeds(self):
    path = self._write({"variants": {"nosa": {"decode_gamma": [0.9, 0.95]},
                                     "full": {"decode_gamma": []}}})
    self.assertAlmostEqual(synthetic.measured_gamma(path), 0.925)

  def test_quality_rows(self):
    path = self._write({"rows": [{"name": "full", "gamma": None},
                                 {"name": "nosa", "gamma": 0.917},
                                 {"name": "nosa_loc0.1", "gamma": 0.945}]})
    self.assertAlmostEqual(synthetic.measured_gamma(path), 0.917)
    self.assertAlmostEqual(synthetic.measured_gamma(path, "nosa_loc0.1"),
                           0.945)

  def test_no_gamma_is_one_error(self):
    path = self._write({"rows": [{"name": "full", "gamma": None}]})
    with self.assertRaisesRegex(ValueError, "no measured decode gamma of "
                                "'nosa'"):
      synthetic.measured_gamma(path)

  def test_the_repository_quality_study(self):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))
    self.assertAlmostEqual(synthetic.measured_gamma(os.path.join(
        repo, "experiments/results/quality/quality.json")), 0.917, places=3)


if __name__ == "__main__":
  absltest.main()
