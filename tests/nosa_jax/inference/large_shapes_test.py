"""The engine at the sizes the host store exists for, traced only.

The offload issue's 128k contexts at batch 16 once failed while tracing (a
flat int32 scatter index of 2^31 in the Pallas attention's list
compaction). `jax.eval_shape` traces prefill and a decode step of the stock
8B-like model (one layer) at 128k and batch 64, where stores, selections and
kernel inputs pass 2^31 elements, without allocating them, so a Python int
or int32 index that overflows fails here on the CPU. Offsets inside the
kernels are the GPU test's (tests/pallas_kernels/offsets_gpu_test.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl.testing import absltest
from absl.testing import parameterized

from configs import nosa_8b
from nosa_jax import config as config_lib
from nosa_jax import model
from nosa_jax.inference import engine
from nosa_jax.inference import stores

B, L = 64, 131072


def _cfg(variant):
  cfg = config_lib.ExperimentConfig.from_dict(
      nosa_8b.get_config(f"variant={variant}").to_dict()).model
  return dataclasses.replace(cfg, num_layers=1, sparse=dataclasses.replace(
      cfg.sparse, implementation="pallas", score_implementation="pallas"))


class LargeShapesTest(parameterized.TestCase):

  @parameterized.parameters(("nosa", "pallas"), ("nosa", "fused"),
                            ("nosa", "loop"), ("nosa", None),
                            ("infllmv2", "pallas"))
  def test_prefill_and_step_trace_at_128k_batch_64(self, variant, fetch):
    cfg = _cfg(variant)
    _, params = model.abstract_params(cfg)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cfg.dtype),
                          params)
    store = engine.DEVICE if fetch is None else stores.HostStore(fetch=fetch)
    state, logits = jax.eval_shape(
        lambda p, t, n: engine._prefill(p, cfg, t, n, L + 64, store), params,
        jax.ShapeDtypeStruct((B, L), jnp.int32),
        jax.ShapeDtypeStruct((B,), jnp.int32))
    self.assertEqual(logits.shape, (B, cfg.vocab_size))
    self.assertGreaterEqual(
        max(x.size for x in jax.tree.leaves(state)), 1 << 31)
    _, logits, info = jax.eval_shape(
        lambda p, s, t: engine.decode_step(p, cfg, s, t), params, state,
        jax.ShapeDtypeStruct((B,), jnp.int32))
    self.assertEqual(logits.shape, (B, cfg.vocab_size))
    self.assertEqual(info["fetched"].shape, (1, B, cfg.num_kv_heads))


if __name__ == "__main__":
  absltest.main()
