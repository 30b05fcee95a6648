"""Llama building blocks: RMSNorm, RoPE, SwiGLU, as pure functions + NNX shells.

NOSA's backbone is a plain Llama decoder (NOSA_SPEC.md §1.1): pre-RMSNorm,
SwiGLU MLP `down(silu(gate(x)) * up(x))`, NeoX-style (rotate-half) RoPE, no
biases. Parameters are stored in `param_dtype` (fp32) and cast to the compute
`dtype` (bf16 on GPU) at use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (x32 * inv * scale).astype(x.dtype)


def rope_angles(positions_BT: jax.Array, head_dim: int,
                theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the RoPE angles, each [B, T, D/2], fp32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, jnp.float32)
                              / head_dim))
  ang_BTd = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None]
  return jnp.cos(ang_BTd), jnp.sin(ang_BTd)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array,
               theta: float) -> jax.Array:
  """Rotate-half (NeoX / HF Llama) RoPE: pairs are (i, i + D/2)."""
  cos_BTd, sin_BTd = rope_angles(positions_BT, x_BTHD.shape[-1], theta)
  cos_BT1d, sin_BT1d = cos_BTd[:, :, None, :], sin_BTd[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate(
      [x1 * cos_BT1d - x2 * sin_BT1d, x2 * cos_BT1d + x1 * sin_BT1d], axis=-1)
  return out.astype(x_BTHD.dtype)


def swiglu(x_BTM: jax.Array, w_gate_MF: jax.Array, w_up_MF: jax.Array,
           w_down_FM: jax.Array) -> jax.Array:
  """down(silu(gate(x)) * up(x))."""
  gate_BTF = jnp.einsum("BTM,MF->BTF", x_BTM, w_gate_MF)
  up_BTF = jnp.einsum("BTM,MF->BTF", x_BTM, w_up_MF)
  return jnp.einsum("BTF,FM->BTM", jax.nn.silu(gate_BTF) * up_BTF, w_down_FM)


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
                 dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
  """Thin shell over `rms_norm`; the scale is initialised to one."""

  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    del rngs  # no random init
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


class MLP(nnx.Module):
  """SwiGLU MLP shell over `swiglu`."""

  def __init__(self, model_dim: int, mlp_dim: int, std: float, dtype,
               param_dtype, *, rngs: nnx.Rngs):
    self.w_gate = normal_param(rngs, (model_dim, mlp_dim), std, param_dtype)
    self.w_up = normal_param(rngs, (model_dim, mlp_dim), std, param_dtype)
    self.w_down = normal_param(rngs, (mlp_dim, model_dim), std, param_dtype)
    self.dtype = dtype

  def __call__(self, x_BTM: jax.Array) -> jax.Array:
    cast = lambda p: p[...].astype(self.dtype)
    return swiglu(x_BTM, cast(self.w_gate), cast(self.w_up),
                  cast(self.w_down))
