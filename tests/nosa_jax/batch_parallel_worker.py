"""Subprocess body of sharding_test's batch_parallel tests (4 CPU devices).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python -m tests.nosa_jax.batch_parallel_worker

Prints one JSON line: the batch each call of the wrapped function saw while
tracing, per case; the largest |difference| of the Pallas (interpret)
sparse attention, forward and gradients, between a (1, 2, 2) mesh (batch
over fsdp, heads over tensor: both splits in one run) and the same call
without a mesh (each interpret-mode compile of the backward costs ~20 s on
2 CPU cores, so it is not repeated on the (2, 2, 1) mesh, whose batch split
the first one contains); and whether selection with the block_scores
kernel picks the same blocks on both meshes.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config
from nosa_jax import selection
from nosa_jax import sharding
from nosa_jax import sparse_attention


def seen_batches(mesh, batch: int) -> list[int]:
  seen = []

  def fn(x, none, y):
    assert none is None
    seen.append(x.shape[0])
    return x * y

  x = jnp.ones((batch, 3))
  f = jax.jit(lambda x: sharding.batch_parallel(fn, x, None, 2 * x))
  out = (sharding.under_mesh(f, mesh) if mesh else f)(x)
  np.testing.assert_allclose(out, 2 * x)
  return seen[-1]  # the last trace is the one that runs


def seen_heads(mesh, heads: int, kv_heads: int) -> list[list[int]]:
  """[B, H, K] as the wrapped function saw them (heads split over tensor)."""
  seen = []

  def fn(q, none, k):
    seen.append([q.shape[0], q.shape[2], k.shape[2]])
    return q

  q, k = jnp.ones((8, 5, heads, 3)), jnp.ones((8, 5, kv_heads, 3))
  f = jax.jit(lambda q, k: sharding.batch_parallel(
      fn, q, None, k, head_dims=(2, 2, 2), out_head_dim=2))
  np.testing.assert_array_equal(sharding.under_mesh(f, mesh)(q, k), q)
  return seen[-1]


def attention_diff(mesh) -> float:
  b, t, h, k, d, c = 4, 48, 4, 2, 16, 16
  keys = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(keys[0], (b, t, h, d))
  kk = jax.random.normal(keys[1], (b, t, k, d))
  v = jax.random.normal(keys[2], (b, t, k, d))
  bias = jax.random.normal(keys[3], (b, t, k))
  n = t // c
  causal = jnp.arange(n)[None, :] <= (jnp.arange(t) // c)[:, None]
  mask = causal & jax.random.bernoulli(keys[4], 0.6, (b, k, t, n))
  mask = mask | (jnp.arange(n)[None, :] == (jnp.arange(t) // c)[:, None])
  cot = jax.random.normal(keys[5], (b, t, h, d))

  def loss(q, kk, v, bias):
    out = sparse_attention.sparse_attention(
        q, kk, v, bias, mask, block_size=c, query_chunk=16,
        implementation="pallas")
    return jnp.sum(out * cot), out

  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  ref = run(q, kk, v, bias)
  got = sharding.under_mesh(run, mesh)(q, kk, v, bias)
  return max(float(jnp.max(jnp.abs(a - r)))
             for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref),
                             strict=True))


def scores_mask_equal(mesh) -> bool:
  """Selection with the block_scores kernel: the same blocks on the mesh."""
  cfg = config.SparseConfig(
      variant="nosa", score_implementation="pallas", block_size=16,
      compress_kernel=8, compress_stride=4, topk_blocks=4,
      query_topk_blocks=3, window_blocks=1, query_chunk=32)
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (4, 64, 4, 16))
  k = jax.random.normal(keys[1], (4, 64, 2, 16))
  bias = jax.random.normal(keys[2], (4, 64, 2))
  run = jax.jit(lambda q, k, b: selection.block_mask(q, k, b, cfg))
  return bool(jnp.array_equal(run(q, k, bias),
                              sharding.under_mesh(run, mesh)(q, k, bias)))


def main():
  mesh = sharding.make_mesh((2, 2, 1))
  tp_mesh = sharding.make_mesh((1, 2, 2))
  print(json.dumps({
      "heads_tp": seen_heads(tp_mesh, 4, 2),
      "heads_tp_indivisible": seen_heads(tp_mesh, 3, 1),
      "attention_max_abs_diff_tp": attention_diff(tp_mesh),
      "scores_mask_equal_tp": scores_mask_equal(tp_mesh),
      "sharded": seen_batches(mesh, 8),
      "no_mesh": seen_batches(None, 8),
      "indivisible": seen_batches(mesh, 6),
      "tensor_only": seen_batches(sharding.make_mesh((1, 1, 4)), 8),
      "scores_mask_equal": scores_mask_equal(mesh),
  }))


if __name__ == "__main__":
  main()
