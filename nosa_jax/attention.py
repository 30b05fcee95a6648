"""Dense causal GQA attention: the FullAttn baseline and the sparse oracle.

The `full` variant of NOSA_SPEC.md "Project decisions" 4. Sparse attention
whose selection covers every block must equal this (tests check it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nosa_jax import implementations


def causal_attention(q_BTHD: jax.Array, k_BTKD: jax.Array,
                     v_BTKD: jax.Array) -> jax.Array:
  """softmax(q.k / sqrt(D) + causal mask) v, GQA heads grouped by KV head.

  Args:
    q_BTHD: queries after RoPE.
    k_BTKD: keys after RoPE; H must be a multiple of K.
    v_BTKD: values.

  Returns:
    [B, T, H, D] in q's dtype.
  """
  # jax.nn.dot_product_attention handles GQA (H a multiple of K). Its XLA
  # path materialises [B, H, T, T] scores (80 GiB at 16k with 32 heads:
  # measured OOM on an H100), so half precision on a GPU asks for cuDNN's
  # fused flash attention explicitly (`implementations`: dense_attention).
  impl = implementations.resolve("dense_attention", "auto",
                                 dtype=q_BTHD.dtype)
  return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True,
                                      implementation=impl)


def causal_attention_reference(q_BTHD: jax.Array, k_BTKD: jax.Array,
                               v_BTKD: jax.Array) -> jax.Array:
  """The same computation written out in fp32 einsums (test oracle)."""
  b, t, h, d = q_BTHD.shape
  k = k_BTKD.shape[2]
  q_BTKGD = q_BTHD.reshape(b, t, k, h // k, d).astype(jnp.float32)
  logits_BKGTS = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD,
                            k_BTKD.astype(jnp.float32)) / jnp.sqrt(d)
  causal_TS = jnp.tril(jnp.ones((t, t), bool))
  logits_BKGTS = jnp.where(causal_TS, logits_BKGTS, -jnp.inf)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  out_BTKGD = jnp.einsum("BKGTS,BSKD->BTKGD", probs_BKGTS,
                         v_BTKD.astype(jnp.float32))
  return out_BTKGD.reshape(b, t, h, d).astype(q_BTHD.dtype)
