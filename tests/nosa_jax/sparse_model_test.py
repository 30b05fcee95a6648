"""NOSA inside the model and the training loop (issue: NOSA attention)."""

import glob
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tensorboard.backend.event_processing import event_accumulator

from nosa_jax import model
from nosa_jax import testing
from nosa_jax import train


def _leaves_named(tree, name):
  return [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if name in jax.tree_util.keystr(p)]


class EvictionHeadTest(parameterized.TestCase):

  def test_gradients_after_one_step_from_a_zero(self):
    self._check_after_one_step("nosa")

  @pytest.mark.slow
  def test_gradients_after_one_step_from_a_zero_dma(self):
    self._check_after_one_step("dma")

  def _check_after_one_step(self, variant):
    cfg = testing.tiny_config(variant, seq_len=96, warmup_steps=0)
    graphdef, state, tx = train.init_state(cfg)
    self.assertTrue(all(np.all(a == 0)
                        for a in _leaves_named(state["params"], "evict_a")))
    batch = testing.random_tokens(jax.random.key(0), 2, 97)
    # One compiled gradient serves both points; the step between them is
    # the trainer's optimizer update (train.train_step's, which train_test
    # runs), so only one sparse backward is compiled.
    grad_fn = jax.jit(jax.grad(lambda p: train.loss_fn(
        p, graphdef, cfg.model, batch)[0]))
    params = state["params"]
    grads = grad_fn(params)
    # b = A * softplus(delta): with A = 0, delta gets no gradient yet.
    for g in _leaves_named(grads, "evict_delta"):
      self.assertEqual(float(jnp.abs(g).max()), 0.0)
    updates, _ = jax.jit(tx.update)(grads, state["opt_state"], params)
    grads = grad_fn(optax.apply_updates(params, updates))
    for name in ("evict_a", "evict_delta"):
      for g in _leaves_named(grads, name):
        self.assertTrue(np.all(np.isfinite(g)), name)
        self.assertGreater(float(jnp.abs(g).max()), 0.0, name)


class LocalityPenaltyTest(parameterized.TestCase):

  def _penalty_grads(self, weight):
    cfg = testing.tiny_model_config("nosa")
    cfg = cfg.__class__(**{**cfg.__dict__, "sparse": cfg.sparse.__class__(
        **{**cfg.sparse.__dict__, "locality_weight": weight})})
    graphdef, params = model.init(cfg, 0)
    batch = testing.random_tokens(jax.random.key(1), 2, 97)

    def weighted_penalty(p):
      loss, metrics = train.loss_fn(p, graphdef, cfg, batch)
      return loss - metrics["loss"]  # = locality_weight * penalty

    return jax.jit(jax.grad(weighted_penalty))(params)

  def test_gradient_on_q_and_k_projections(self):
    grads = self._penalty_grads(0.5)
    for name in ("wq", "wk"):
      for g in _leaves_named(grads, f"'{name}'"):
        self.assertTrue(np.all(np.isfinite(g)))
        self.assertGreater(float(jnp.abs(g).max()), 0.0, name)
    # The last layer's values enter neither selection nor a later layer.
    last_wv = _leaves_named(grads, "'wv'")[-1]
    self.assertEqual(float(jnp.abs(last_wv).max()), 0.0)

  def test_no_gradient_when_weight_is_zero(self):
    for g in jax.tree.leaves(self._penalty_grads(0.0)):
      self.assertEqual(float(jnp.abs(g).max()), 0.0)


class SampledPenaltyKeyTest(absltest.TestCase):

  def test_train_step_draws_from_the_state_rng(self):
    # The sampled penalty's key is the second half of the split of the
    # state's (checkpointed) RNG, whose first half becomes the next
    # state's: a resumed run draws as the uninterrupted one did.
    tx = train.make_optimizer(testing.tiny_config().train)
    params = {"w": jnp.ones((3,))}
    state = {"params": params, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(5))}

    def fake_loss(params, graphdef, cfg, batch, penalty_key=None):
      del graphdef, cfg, batch
      loss = jnp.sum(params["w"] ** 2)
      return loss, {"loss": loss, "key": jax.random.key_data(penalty_key)}

    with mock.patch.object(train, "loss_fn", fake_loss):
      new_state, metrics = jax.jit(lambda s: train.train_step(
          s, jnp.zeros((1, 9), jnp.int32), graphdef=None, cfg=None,
          tx=tx))(state)
    rng, key = jax.random.split(jax.random.key(5))
    np.testing.assert_array_equal(metrics["key"], jax.random.key_data(key))
    np.testing.assert_array_equal(new_state["rng"], jax.random.key_data(rng))


class TrainEachVariantTest(parameterized.TestCase):
  """Sequences longer than the budget, so selection really drops blocks."""

  def test_trains_and_logs_gamma_per_layer(self):
    self._train_and_check("nosa")

  # The baselines go through the same code (~13 s each on 2 cores).
  @parameterized.parameters("infllmv2", "dma")
  @pytest.mark.slow
  def test_trains_and_logs_gamma_per_layer_baselines(self, variant):
    self._train_and_check(variant)

  def _train_and_check(self, variant):
    cache = self.create_tempdir().full_path
    workdir = self.create_tempdir().full_path
    # T=192: 12 blocks of 16 against a budget of 8.
    cfg = testing.tiny_config(variant, cache_dir=cache, seq_len=192,
                              num_steps=4, log_every=2, checkpoint_every=0)
    out = train.train_and_evaluate(cfg, workdir)
    self.assertTrue(np.isfinite(out["loss"]))
    events = glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
    acc = event_accumulator.EventAccumulator(
        events[0], size_guidance={event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for layer in range(cfg.model.num_layers):
      self.assertIn(f"locality/gamma/layer_{layer:02d}", tags)
    gamma = acc.Scalars("locality/gamma")[-1].value
    self.assertBetween(gamma, 0.0, 1.0)
    self.assertLess(gamma, 1.0)  # selection changes: the sparsity is real
    if cfg.model.sparse.has_eviction_head:
      self.assertIn("bias_BTK/layer_00", acc.Tags()["histograms"])


if __name__ == "__main__":
  absltest.main()
