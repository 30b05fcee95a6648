"""Model: real-config parameter counts (eval_shape), causality, overfitting."""

import functools
import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import model
from nosa_jax import testing
from nosa_jax import train


def _closed_form(c: config_lib.ModelConfig) -> int:
  m, h, k, d = c.model_dim, c.num_heads, c.num_kv_heads, c.head_dim
  layer = m * h * d + 2 * m * k * d + h * d * m + 3 * m * c.mlp_dim + 2 * m
  if c.sparse.has_eviction_head:
    layer += k + k * d * k  # A [K] and delta [K*D, K]
  head = 0 if c.tie_embeddings else m * c.vocab_size
  return c.num_layers * layer + c.vocab_size * m + m + head


class ParamCountTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("1b", "nosa_1b", 1_015_742_008),
      ("3b", "nosa_3b", 2_914_507_328),
      ("8b", "nosa_8b", 8_185_270_336),
  )
  def test_real_config_sizes(self, name, expected):
    raw = importlib.import_module(f"configs.{name}").get_config()
    cfg = config_lib.ExperimentConfig.from_dict(raw.to_dict()).model
    _, params = model.abstract_params(cfg)  # no allocation
    self.assertEqual(model.count_params(params), expected)
    self.assertEqual(expected, _closed_form(cfg))

  def test_full_variant_has_no_eviction_head(self):
    raw = importlib.import_module("configs.nosa_8b").get_config("variant=full")
    cfg = config_lib.ExperimentConfig.from_dict(raw.to_dict()).model
    _, params = model.abstract_params(cfg)
    self.assertEqual(model.count_params(params), 8_185_270_336 - 32 * 514)


class ForwardTest(parameterized.TestCase):

  @parameterized.parameters("full", "nosa", "infllmv2", "dma")
  def test_causal(self, variant):
    """Changing token t+1 never changes the logits at positions <= t."""
    cfg = testing.tiny_model_config(variant)
    graphdef, params = model.init(cfg, 0)
    if cfg.sparse.has_eviction_head:  # make the bias non-trivial
      params = jax.tree.map_with_path(
          lambda p, x: x + 0.5 if "evict_a" in jax.tree_util.keystr(p)
          else x, params)
    fwd = jax.jit(lambda t: model.apply(graphdef, params, t)[0])
    tokens = testing.random_tokens(jax.random.key(0), 2, 100)
    base = fwd(tokens)
    for t in (0, 17, 63, 98):
      changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 259)
      out = fwd(changed)
      np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
      self.assertFalse(np.allclose(out[:, t + 1], base[:, t + 1]))

  def test_bf16_compute_keeps_fp32_params(self):
    cfg = testing.tiny_model_config("full", dtype="bfloat16")
    graphdef, params = model.init(cfg, 0)
    self.assertTrue(all(x.dtype == jnp.float32
                        for x in jax.tree.leaves(params)))
    logits, _ = model.apply(graphdef, params, jnp.zeros((1, 8), jnp.int32))
    self.assertEqual(logits.dtype, jnp.float32)

  @parameterized.parameters("full", "dots")
  def test_remat_same_gradients(self, policy):
    cfg = testing.tiny_model_config("full")
    graphdef, params = model.init(cfg, 0)
    graphdef_r, _ = model.init(testing.tiny_model_config("full", remat=policy),
                               0)
    batch = testing.random_tokens(jax.random.key(1), 2, 33)
    grad = lambda g: jax.jit(jax.grad(
        lambda p: train.loss_fn(p, g, cfg, batch)[0]))(params)
    for a, b in zip(jax.tree.leaves(grad(graphdef)),
                    jax.tree.leaves(grad(graphdef_r)), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name` in a jaxpr, nested jaxprs included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          n += _count_primitive(sub, name)
  return n


class RematSelectionTest(parameterized.TestCase):
  """Remat keeps the selection's block mask: the backward does not repeat
  the selection (its top-k, counted in the grad jaxpr)."""

  @staticmethod
  @functools.cache  # the baseline counts repeat across the product below
  def _top_k_in_grad(**overrides):
    cfg = testing.tiny_model_config("nosa", **overrides)
    graphdef, params = model.init(cfg, 0)
    batch = testing.random_tokens(jax.random.key(1), 2, 97)
    grad = jax.grad(lambda p: train.loss_fn(p, graphdef, cfg, batch)[0])
    return _count_primitive(jax.make_jaxpr(grad)(params).jaxpr, "top_k")

  @parameterized.product(remat=["full", "dots"], scan_layers=[False, True])
  def test_backward_does_not_repeat_the_selection(self, remat, scan_layers):
    once = self._top_k_in_grad(scan_layers=scan_layers)
    # nosa's phase-1 top-k, once per layer (the final mask needs none).
    self.assertEqual(once, 1 if scan_layers else 2)
    self.assertEqual(
        self._top_k_in_grad(remat=remat, scan_layers=scan_layers), once)
    # Without keeping the mask, the rematerialised backward selects again.
    self.assertEqual(
        self._top_k_in_grad(remat=remat, scan_layers=scan_layers,
                            remat_keeps_selection=False), 2 * once)

  def test_same_gradients_with_the_kept_selection(self):
    # The per-layer loop (scan_layers_test covers the scanned stack).
    batch = testing.random_tokens(jax.random.key(1), 2, 97)
    grads = []
    for overrides in ({}, {"remat": "full"}):
      cfg = testing.tiny_model_config("nosa", **overrides)
      graphdef, params = model.init(cfg, 0)
      grads.append(jax.jit(jax.grad(lambda p, g=graphdef, c=cfg: train.loss_fn(
          p, g, c, batch)[0]))(params))
    for a, b in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)

  def test_bad_flag_is_named(self):
    with self.assertRaisesRegex(ValueError, "model.remat_keeps_selection"):
      testing.tiny_model_config("nosa", remat_keeps_selection="yes")


class OverfitTest(absltest.TestCase):

  def test_overfits_a_repeated_sequence(self):
    """A tiny model memorises one sequence and greedily reproduces it."""
    _, graphdef, params, seq, first, last = testing.overfit_sequence("full")
    self.assertGreater(first, 5.0)
    self.assertLess(last, 0.05)
    # Greedy next-token predictions reproduce the sequence.
    logits, _ = jax.jit(lambda p, t: model.apply(graphdef, p, t))(
        params, jnp.asarray(seq[None, :-1]))
    np.testing.assert_array_equal(np.argmax(logits[0], -1), seq[1:])


if __name__ == "__main__":
  absltest.main()
