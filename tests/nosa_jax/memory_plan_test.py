"""memory_plan: the per-device bytes of a training step, from shapes only."""

import dataclasses

from absl.testing import absltest
import jax
import numpy as np

from nosa_jax import memory_plan
from nosa_jax import model
from nosa_jax import testing


class MemoryPlanTest(absltest.TestCase):

  def test_scan_layers_adds_two_copies_of_the_layer_params(self):
    cfg = testing.tiny_config("nosa")
    loop = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, scan_layers=False))
    scan = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, scan_layers=True))
    _, abstract = model.abstract_params(cfg.model)
    block_bytes = model.count_params(abstract["blocks"]) * np.dtype(
        cfg.model.param_dtype).itemsize
    a, b = (memory_plan.memory_plan(c, (1, 1, 1)) for c in (scan, loop))
    self.assertEqual(a.activations - b.activations, 2 * block_bytes)
    self.assertEqual((a.params, a.grads, a.optimizer),
                     (b.params, b.grads, b.optimizer))
    # bf16 compute: the matmul weights are stacked in bf16, the rest fp32.
    bf16 = lambda c: dataclasses.replace(c, model=dataclasses.replace(
        c.model, dtype="bfloat16"))
    a, b = (memory_plan.memory_plan(bf16(c), (1, 1, 1)) for c in (scan, loop))
    matmul = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(
        abstract["blocks"]) if any(getattr(k, "key", None) in
                                   model.MATMUL_WEIGHTS for k in path))
    other = model.count_params(abstract["blocks"]) - matmul
    self.assertGreater(matmul, 0)
    self.assertEqual(a.activations - b.activations,
                     2 * (2 * matmul + 4 * other))

  def test_one_device_holds_every_parameter(self):
    cfg = testing.tiny_config("nosa")
    _, abstract = model.abstract_params(cfg.model)
    n = model.count_params(abstract)
    plan = memory_plan.memory_plan(cfg, (1, 1, 1))
    self.assertEqual(plan.params, n * np.dtype(cfg.model.param_dtype).itemsize)
    self.assertEqual(plan.optimizer, 2 * n * 4)
    # An fsdp axis of 2 splits the model dim of every matrix.
    self.assertLess(memory_plan.memory_plan(cfg, (1, 2, 1)).params,
                    plan.params)

  def test_format_plan_lists_each_part_and_the_limit(self):
    plan = memory_plan.MemoryPlan(mesh_shape=(1, 2, 1), params=2**30,
                                  grads=2**30, optimizer=2**31,
                                  activations=2**29)
    text = memory_plan.format_plan(plan, 4 * 2**30)
    self.assertIn("(1, 2, 1)", text)
    self.assertIn("total            4.50 GiB  of     4.00 GiB", text)


if __name__ == "__main__":
  absltest.main()
