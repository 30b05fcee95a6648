"""Llama building blocks: RMSNorm, RoPE, SwiGLU, as pure functions + NNX shells.

NOSA's backbone is a plain Llama decoder (NOSA_SPEC.md §1.1): pre-RMSNorm,
SwiGLU MLP `down(silu(gate(x)) * up(x))`, NeoX-style (rotate-half) RoPE with
the HF `rope_scaling` types of `config.RopeScaling`, optional biases.
Parameters are stored in `param_dtype` (fp32) and cast to the compute
`dtype` (bf16 on GPU) at use.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from nosa_jax import config as config_lib


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (x32 * inv * scale).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Optional[config_lib.RopeScaling] = None
                     ) -> tuple[np.ndarray, Optional[np.ndarray], float]:
  """Static RoPE frequencies of `scaling` (config.RopeScaling's formulas).

  Computed in float64 numpy (they depend on the config only) and used in
  fp32.

  Returns:
    (freq [D/2], long_freq [D/2] or None, attention_factor): long_freq is
    LongRoPE's frequencies for sequences longer than `long_factor_above`
    (freq is then its short set).
  """
  sc = scaling or config_lib.RopeScaling()
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64)
                        / head_dim)
  t = sc.rope_type
  if t == "longrope":
    short, long = (np.asarray(f, np.float64) for f in
                   (sc.short_factor, sc.long_factor))
    if short.shape != inv.shape:
      raise ValueError(f"rope_scaling longrope factors have {short.size} "
                       f"entries; head_dim={head_dim} needs {inv.size}")
    return inv / short, inv / long, sc.attention_factor
  if t == "linear":
    inv = inv / sc.factor
  elif t == "llama3":
    wavelen = 2 * math.pi / inv
    orig = sc.original_max_position_embeddings
    smooth = ((orig / wavelen - sc.low_freq_factor)
              / (sc.high_freq_factor - sc.low_freq_factor))
    inv = np.where(wavelen > orig / sc.low_freq_factor, inv / sc.factor,
                   np.where(wavelen < orig / sc.high_freq_factor, inv,
                            (1 - smooth) * inv / sc.factor + smooth * inv))
  elif t == "yarn":
    # Dim index (of D) at which a frequency makes `rot` rotations over the
    # original context; the ramp runs between the beta_fast / beta_slow
    # dims (floor / ceil, clipped to [0, D-1]).
    def dim_at(rot):
      return (head_dim * math.log(sc.original_max_position_embeddings
                                  / (rot * 2 * math.pi))
              / (2 * math.log(theta)))
    lo = max(math.floor(dim_at(sc.beta_fast)), 0)
    hi = min(math.ceil(dim_at(sc.beta_slow)), head_dim - 1)
    hi = hi + 0.001 if hi == lo else hi
    ramp = np.clip((np.arange(head_dim // 2) - lo) / (hi - lo), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep inv_freq; 0: divide by factor
    inv = inv / sc.factor * (1 - extrapolate) + inv * extrapolate
  return inv, None, sc.attention_factor


def rope_angles(positions_BT: jax.Array, head_dim: int, theta: float,
                scaling: Optional[config_lib.RopeScaling] = None
                ) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the RoPE angles, each [B, T, D/2], fp32.

  Both include `scaling.attention_factor`. For LongRoPE each row b uses the
  long factors iff its sequence length, max_t positions_BT[b, t] + 1,
  exceeds `long_factor_above` (as HF and MiniCPM choose per forward pass;
  a decode step's row is its one new position).
  """
  freq, long_freq, attn = rope_frequencies(head_dim, theta, scaling)
  freq_B1d = jnp.asarray(freq, jnp.float32)[None, None]
  if long_freq is not None:
    seq_len_B = jnp.max(positions_BT, axis=1) + 1
    use_long_B11 = (seq_len_B > scaling.long_factor_above)[:, None, None]
    freq_B1d = jnp.where(use_long_B11,
                         jnp.asarray(long_freq, jnp.float32)[None, None],
                         freq_B1d)
  ang_BTd = positions_BT.astype(jnp.float32)[..., None] * freq_B1d
  cos_BTd, sin_BTd = jnp.cos(ang_BTd), jnp.sin(ang_BTd)
  if attn != 1.0:
    cos_BTd, sin_BTd = cos_BTd * attn, sin_BTd * attn
  return cos_BTd, sin_BTd


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float,
               scaling: Optional[config_lib.RopeScaling] = None
               ) -> jax.Array:
  """Rotate-half (NeoX / HF Llama) RoPE: pairs are (i, i + D/2)."""
  cos_BTd, sin_BTd = rope_angles(positions_BT, x_BTHD.shape[-1], theta,
                                 scaling)
  cos_BT1d, sin_BT1d = cos_BTd[:, :, None, :], sin_BTd[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate(
      [x1 * cos_BT1d - x2 * sin_BT1d, x2 * cos_BT1d + x1 * sin_BT1d], axis=-1)
  return out.astype(x_BTHD.dtype)


def swiglu(x_BTM: jax.Array, w_gate_MF: jax.Array, w_up_MF: jax.Array,
           w_down_FM: jax.Array, b_gate_F: Optional[jax.Array] = None,
           b_up_F: Optional[jax.Array] = None,
           b_down_M: Optional[jax.Array] = None) -> jax.Array:
  """down(silu(gate(x)) * up(x)), each projection with its optional bias."""
  gate_BTF = jnp.einsum("BTM,MF->BTF", x_BTM, w_gate_MF)
  up_BTF = jnp.einsum("BTM,MF->BTF", x_BTM, w_up_MF)
  if b_gate_F is not None:
    gate_BTF = gate_BTF + b_gate_F.reshape((1,) * (x_BTM.ndim - 1) + (-1,))
    up_BTF = up_BTF + b_up_F.reshape((1,) * (x_BTM.ndim - 1) + (-1,))
  out_BTM = jnp.einsum("BTF,FM->BTM", jax.nn.silu(gate_BTF) * up_BTF,
                       w_down_FM)
  if b_down_M is None:
    return out_BTM
  return out_BTM + b_down_M.reshape((1,) * (x_BTM.ndim - 1) + (-1,))


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
  """SwiGLU MLP shell over `swiglu`; biases (zero at init) with `bias`."""

  def __init__(self, model_dim: int, mlp_dim: int, std: float, dtype,
               param_dtype, *, rngs: nnx.Rngs, bias: bool = False):
    self.w_gate = normal_param(rngs, (model_dim, mlp_dim), std, param_dtype)
    self.w_up = normal_param(rngs, (model_dim, mlp_dim), std, param_dtype)
    self.w_down = normal_param(rngs, (mlp_dim, model_dim), std, param_dtype)
    if bias:
      self.b_gate = nnx.Param(jnp.zeros((mlp_dim,), param_dtype))
      self.b_up = nnx.Param(jnp.zeros((mlp_dim,), param_dtype))
      self.b_down = nnx.Param(jnp.zeros((model_dim,), param_dtype))
    self.dtype = dtype

  def __call__(self, x_BTM: jax.Array) -> jax.Array:
    cast = lambda name: (getattr(self, name)[...].astype(self.dtype)
                         if hasattr(self, name) else None)
    return swiglu(x_BTM, *map(cast, ("w_gate", "w_up", "w_down", "b_gate",
                                     "b_up", "b_down")))
