"""`ModelConfig.scan_layers`: the scanned layer stack equals the Python loop.

Same parameters, same logits, locality penalty and training-loss gradients
for each variant with and without remat; and the lowered program holds the
block once (one while loop) instead of once per layer.
"""

import dataclasses
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from nosa_jax import model
from nosa_jax import sharding
from nosa_jax import sparse_attention
from nosa_jax import testing
from nosa_jax import train
from tests import tolerances


def _cfg(variant: str, remat: str, scan_layers: bool = False):
  """Tiny model with non-trivial selection and the penalty switched on."""
  cfg = testing.tiny_model_config(variant, init_std=0.1, remat=remat,
                                  scan_layers=scan_layers)
  sparse = dataclasses.replace(cfg.sparse, query_chunk=256,
                               locality_weight=0.5)
  return dataclasses.replace(cfg, sparse=sparse)


def _params(cfg):
  graphdef, params = model.init(cfg, 0)
  if cfg.sparse.has_eviction_head:  # A = 0 at init would zero the bias
    params = jax.tree.map_with_path(
        lambda p, x: x + 1.0 if "evict_a" in jax.tree_util.keystr(p) else x,
        params)
  return graphdef, params


def _run(graphdef, params, cfg, batch_BT1, with_grads):
  """Forward logits and aux penalty, and optionally d(train loss)/d(params)."""

  def run(p):
    logits_BTV, aux = model.apply(graphdef, p, batch_BT1[:, :-1])
    if not with_grads:
      return logits_BTV, aux["locality_penalty"], None
    grads = jax.grad(lambda q: train.loss_fn(q, graphdef, cfg, batch_BT1)[0]
                     )(p)
    return logits_BTV, aux["locality_penalty"], grads

  return jax.jit(run)(params)


class ScanLayersEquivalenceTest(parameterized.TestCase):

  # The reference is the Python loop without remat (the loop's own remat is
  # checked in model_test). Every variant runs scanned with remat on and
  # off; gradients are compared for the dense variant (no remat, dots) and
  # for nosa with full remat (the 1B setting) only, because each compile of
  # a sparse backward costs 5-10 s on a CPU. Each remat setting appears in
  # at least one scanned run; the set is kept small for the CI's 2 cores.
  # nosa's case is test_biases_and_mup (its biases and muP multipliers
  # only add terms to the same code path; one pair of sparse backward
  # compiles instead of two).
  @parameterized.named_parameters(
      ("full", "full", ("dots",), ("none",)),
      ("infllmv2", "infllmv2", (), ("full",)),
  )
  def test_scan_equals_loop(self, variant, grad_remats, forward_remats):
    self._check_scan_equals_loop(variant, grad_remats, forward_remats)

  def _check_scan_equals_loop(self, variant, grad_remats, forward_remats,
                              base=None, batch_BT1=None):
    """Scanned vs looped stack; returns the loop's (params, outputs)."""
    with_grads = bool(grad_remats)
    cfg_loop = dataclasses.replace(_cfg(variant, "none"), **(base or {}))
    graphdef_loop, params = _params(cfg_loop)
    if base:  # every parameter non-trivial, the biases and A included
      keys = jax.random.split(jax.random.key(4),
                              len(jax.tree.leaves(params)))
      params = jax.tree.unflatten(jax.tree.structure(params), [
          x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
          for k, x in zip(keys, jax.tree.leaves(params), strict=True)])
    if batch_BT1 is None:
      # 96 tokens = 6 blocks of 16: from block 5 on, a query has two free
      # (neither sink nor window) blocks, so the locality penalty is
      # non-zero.
      batch_BT1 = testing.random_tokens(jax.random.key(1), 1, 97)
    want = _run(graphdef_loop, params, cfg_loop, batch_BT1, with_grads)
    if cfg_loop.sparse.query_aware:
      self.assertGreater(float(want[1]), 0.0)  # the penalty is exercised
    tol = tolerances.tol(np.float32)
    for remat in grad_remats + forward_remats:
      cfg_scan = dataclasses.replace(_cfg(variant, remat, scan_layers=True),
                                     **(base or {}))
      graphdef_scan, params_scan = _params(cfg_scan)
      # The layout is unchanged: the same per-layer parameter tree.
      self.assertEqual(jax.tree.structure(params),
                       jax.tree.structure(params_scan))
      got = _run(graphdef_scan, params, cfg_scan, batch_BT1,
                 remat in grad_remats)
      np.testing.assert_allclose(got[0], want[0], **tol,
                                 err_msg=f"logits, remat={remat}")
      np.testing.assert_allclose(got[1], want[1], **tol,
                                 err_msg=f"penalty, remat={remat}")
      if remat not in grad_remats:
        continue
      leaves_want = jax.tree_util.tree_leaves_with_path(want[2])
      for (path, w), g in zip(leaves_want, jax.tree.leaves(got[2]),
                              strict=True):
        np.testing.assert_allclose(
            g, w, **tol,
            err_msg=f"grad {jax.tree_util.keystr(path)}, remat={remat}")
      # Every layer gets its own gradient back through the stack.
      for i in range(cfg_loop.num_layers):
        norm = sum(float(np.abs(x).sum())
                   for x in jax.tree.leaves(got[2]["blocks"][i]))
        self.assertGreater(norm, 0.0, msg=f"layer {i}, remat={remat}")
    return params, want

  def test_penalty_key_per_layer_in_scan_and_loop(self):
    """Layer i gets the penalty key fold_in(key, i) in the loop (here
    through nnx.remat) and in the scan alike. The attention is a stand-in
    whose penalty is uniform(key), so only the plumbing compiles; the
    sampled penalty itself is tested in selection_test."""

    def fake_nosa_attention(q_BTHD, k_BTKD, v_BTKD, bias_BTK, sp,
                            penalty_key=None):
      del k_BTKD, v_BTKD, bias_BTK, sp
      return q_BTHD, {"locality_penalty": jax.random.uniform(penalty_key)}

    batch_BT1 = testing.random_tokens(jax.random.key(1), 1, 17)
    # Any values do; the same tree for both layouts.
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          model.abstract_params(_cfg("nosa", "none"))[1])
    key = jax.random.key(7)
    want = np.mean([jax.random.uniform(jax.random.fold_in(key, i))
                    for i in range(2)])
    with mock.patch.object(sparse_attention, "nosa_attention",
                           fake_nosa_attention):
      for remat, scan in (("full", False), ("none", True)):
        cfg = _cfg("nosa", remat, scan_layers=scan)
        got = jax.jit(lambda p, k, cfg=cfg: model.apply(
            model.abstract_params(cfg)[0], p, batch_BT1[:, :-1],
            penalty_key=k)[1]["locality_penalty"])(params, key)
        self.assertAlmostEqual(float(got), float(want), places=6,
                               msg=f"remat={remat}, scan={scan}")

  def test_bf16_stack_holds_bf16_weights_and_changes_nothing(self):
    """With bf16 compute the stacked matmul weights are bf16 (half the
    copy), and logits and fp32 gradients equal those of an fp32 stack bit
    for bit (the weights are cast where they are used either way)."""
    cfg = testing.tiny_model_config("full", dtype="bfloat16",
                                    scan_layers=True)
    graphdef, params = model.init(cfg, 0)
    batch_BT1 = testing.random_tokens(jax.random.key(3), 1, 33)
    got = _run(graphdef, params, cfg, batch_BT1, True)
    with mock.patch.object(model, "MATMUL_WEIGHTS", ()):
      want = _run(graphdef, params, cfg, batch_BT1, True)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(g, w)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(
        graphdef, p, batch_BT1[:, :-1])[0])(params)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    stacked = [v.aval for v in eqn.invars if v.aval.ndim in (3, 4)
               and v.aval.shape[0] == cfg.num_layers]  # not the carry
    self.assertLen(stacked, 7)  # [L, ...] wq wk wv wo w_gate w_up w_down
    self.assertTrue(all(a.dtype == np.dtype("bfloat16") for a in stacked))

  def test_biases_and_mup(self):
    """nosa with every bias and MiniCPM's muP multipliers: the scan equals
    the loop (gradients with full remat, the 1B setting; forward without
    remat), every bias gets a gradient, and the sharding rules name every
    parameter."""
    base = dict(attention_bias=True, mlp_bias=True, embed_scale=3.0,
                residual_scale=0.5, logits_scale=0.25)
    # 96 tokens, as in test_scan_equals_loop: the penalty is non-zero.
    params, want = self._check_scan_equals_loop(
        "nosa", ("full",), ("none",), base=base,
        batch_BT1=testing.random_tokens(jax.random.key(5), 1, 97))
    for i in range(len(want[2]["blocks"])):
      blk = want[2]["blocks"][i]
      for name in ("bq", "bk", "bv", "bo", "evict_delta_b"):
        self.assertGreater(float(np.abs(blk["attn"][name][...]).sum()), 0,
                           msg=f"layer {i} {name}")
      for name in ("b_gate", "b_up", "b_down"):
        self.assertGreater(float(np.abs(blk["mlp"][name][...]).sum()), 0,
                           msg=f"layer {i} {name}")
    sharding.param_specs(params, {"data": 1, "fsdp": 2, "tensor": 2})

  def test_collect_stats_keeps_the_loop(self):
    """collect_stats returns one dict per layer even with scan_layers."""
    cfg = _cfg("full", "full", scan_layers=True)
    graphdef, params = _params(cfg)
    tokens_BT = testing.random_tokens(jax.random.key(2), 1, 16)
    fwd = jax.jit(lambda p: model.apply(graphdef, p, tokens_BT,
                                        collect_stats=True)[1])
    self.assertLen(fwd(params)["layers"], cfg.num_layers)


class ScanLayersCompileTest(absltest.TestCase):

  def test_block_is_lowered_once(self):
    """12 layers lower to one loop over the block, not 12 copies of it.

    Structural, not timed: compile time follows program size. The `full`
    variant has no loops of its own, so its while loops are exactly the
    layer scan (forward) and the scan plus its transpose (gradient). (The
    nosa variant's attention has inner loops; its gradient program measured
    5.6x smaller, 36 -> 5 while loops, but takes 2 s more to lower.)
    """
    batch_BT1 = testing.random_tokens(jax.random.key(0), 1, 33)

    def lowered(scan_layers):
      cfg = testing.tiny_model_config("full", num_layers=12, remat="full",
                                      scan_layers=scan_layers)
      graphdef, params = model.init(cfg, 0)
      fwd = lambda p: model.apply(graphdef, p, batch_BT1[:, :-1])[0]
      loss = lambda p: train.loss_fn(p, graphdef, cfg, batch_BT1)[0]
      return (jax.jit(fwd).lower(params).as_text(),
              jax.jit(jax.grad(loss)).lower(params).as_text())

    (fwd_loop, grad_loop), (fwd_scan, grad_scan) = lowered(False), lowered(True)
    self.assertEqual(fwd_loop.count("stablehlo.while"), 0)
    self.assertEqual(fwd_scan.count("stablehlo.while"), 1)
    self.assertEqual(grad_scan.count("stablehlo.while"), 2)
    # Measured: 3.9x (forward) and 4.2x (gradient) smaller.
    for name, loop, scan in (("forward", fwd_loop, fwd_scan),
                             ("gradient", grad_loop, grad_scan)):
      self.assertLess(3 * len(scan), len(loop),
                      f"{name}: scan {len(scan)} vs loop {len(loop)} chars")


if __name__ == "__main__":
  absltest.main()
