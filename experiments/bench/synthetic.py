"""Synthetic decode states and selections for benchmarks.

Random weights learn no locality, so decode benchmarks replace the model's
selection with `SyntheticSelection`, whose step-to-step overlap is a chosen
gamma (the paper's, for example), through the engine's `override` hook. The
model's selection is still computed, so a step costs what a real one does;
the logits are then not the model's. `synthetic_state` is a decode state as
if `context_len` tokens had been prefilled (prefill excluded from timings;
K/V values do not change the bytes a step moves).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax.inference import engine


def synthetic_selection(pos_B: jax.Array, kv: int, n: int,
                        sp: config_lib.SparseConfig, gamma: float,
                        salt: int = 0) -> jax.Array:
  """A selection of topk_blocks blocks whose step-to-step locality is gamma.

  The forced blocks (sinks, window, own block) are selected as the model
  does; the other F = topk - sink - window - 1 picks are lanes: lane j holds
  block sink + j + F * ((h_j + e) mod M) in epoch e, with M = floor(A / F)
  and A the blocks before the window, so lanes never collide and
  consecutive epochs differ. Lane j's epoch at position t is
  floor((t + j * period / F) / period) with period = F / m and
  m = (1 - gamma) * topk: on average m lanes change per step, staggered,
  so (1 - gamma) of the selection is new at each step. Deterministic and
  stateless: h_j mixes j, the KV head, the sequence and `salt` (the
  layer). Changes of M (every F blocks of growth) and the window's growth
  add rare extra misses.

  Returns:
    idx_BKP int32 [B, K, topk], ascending; requires A >= 2F for every
    sequence (`synthetic_min_length`).
  """
  p = sp.topk_blocks
  f = p - sp.sink_blocks - sp.window_blocks - 1
  c = sp.block_size
  own_B = (pos_B // c).astype(jnp.int32)
  avail_B = jnp.clip(own_B - sp.window_blocks - sp.sink_blocks, 0, n)
  m_B = jnp.maximum(avail_B // max(f, 1), 1)
  misses = max((1.0 - gamma) * p, 1e-6)
  period = f / misses
  j_1F = jnp.arange(f)[None, :]
  e_BF = jnp.floor((pos_B[:, None] + j_1F * (period / f)) / period).astype(
      jnp.int32)
  k_1K1 = jnp.arange(kv)[None, :, None]
  b_B11 = jnp.arange(pos_B.shape[0])[:, None, None]
  h_BKF = (j_1F[None] * 40503 + k_1K1 * 2654435 + b_B11 * 97
           + salt * 7919) % 1000003
  lane_BKF = (sp.sink_blocks + j_1F[None] + f * (
      (h_BKF + e_BF[:, None, :]) % m_B[:, None, None]))
  forced_BX = jnp.concatenate([
      jnp.broadcast_to(jnp.arange(sp.sink_blocks)[None, :],
                       (pos_B.shape[0], sp.sink_blocks)),
      own_B[:, None] - jnp.arange(sp.window_blocks, -1, -1)[None, :]], axis=1)
  forced_BKX = jnp.broadcast_to(forced_BX[:, None],
                                (pos_B.shape[0], kv, forced_BX.shape[1]))
  return jnp.sort(jnp.concatenate([forced_BKX, lane_BKF], -1),
                  axis=-1).astype(jnp.int32)


def synthetic_min_length(sp: config_lib.SparseConfig) -> int:
  """Shortest context `synthetic_selection` supports (A >= 2F blocks)."""
  f = sp.topk_blocks - sp.sink_blocks - sp.window_blocks - 1
  return (2 * f + sp.window_blocks + sp.sink_blocks + 1) * sp.block_size


@dataclasses.dataclass(frozen=True)
class SyntheticSelection:
  """The engine's selection override with locality gamma (hashable)."""

  sp: config_lib.SparseConfig
  gamma: float

  def __post_init__(self):
    if not 0.0 <= self.gamma < 1.0:
      raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")

  def __call__(self, idx_BKP, pos_B, n: int, layer: int) -> jax.Array:
    synth_BKP = synthetic_selection(pos_B, idx_BKP.shape[1], n, self.sp,
                                    self.gamma, salt=layer)
    # Keeps the model's selection alive (XLA cannot prove the condition),
    # so the step still pays for scoring.
    return jnp.where(jnp.min(idx_BKP) >= -1, synth_BKP, idx_BKP)


@dataclasses.dataclass(frozen=True)
class SyntheticGuess:
  """The engine's prefetch guess for a SyntheticSelection run (hashable):
  the selection the next layer makes at this step, with a fraction
  1 - accuracy of its lanes (the non-forced picks) moved by half the lane
  stride, to blocks the selection mostly does not hold; deterministic per
  (position, layer, lane). accuracy = 1 is an oracle. What a trained
  model's guesses reach is measured, not assumed
  (`selection.prefetch_coverage`)."""

  sp: config_lib.SparseConfig
  gamma: float
  accuracy: float = 1.0

  def __post_init__(self):
    if not 0.0 <= self.accuracy <= 1.0:
      raise ValueError(f"accuracy must be in [0, 1], got {self.accuracy}")

  def __call__(self, pred_BKP, pos_B, n: int, layer: int) -> jax.Array:
    sp = self.sp
    idx_BKP = synthetic_selection(pos_B, pred_BKP.shape[1], n, sp,
                                  self.gamma, salt=layer)
    if self.accuracy >= 1.0:
      return idx_BKP
    f = sp.topk_blocks - sp.sink_blocks - sp.window_blocks - 1
    window_B = pos_B // sp.block_size - sp.window_blocks
    lane_BKP = (idx_BKP >= sp.sink_blocks) & (
        idx_BKP < window_B[:, None, None])
    h_BKP = (pos_B[:, None, None] * 7919
             + jnp.arange(idx_BKP.shape[-1])[None, None, :] * 40503
             + jnp.arange(idx_BKP.shape[1])[None, :, None] * 97
             + layer * 2654435) % 1000
    wrong_BKP = lane_BKP & (h_BKP < 1000 * (1.0 - self.accuracy))
    return jnp.where(wrong_BKP, idx_BKP + max(f // 2, 1), idx_BKP)


def synthetic_state(params: Any, cfg: config_lib.ModelConfig, store: Any,
                    batch: int, context_len: int, max_len: int,
                    gamma: float | None = None) -> engine.DecodeState:
  """A decode state as if `context_len` tokens of zeros had been prefilled,
  every host-store slot empty (the first step is a cold start)."""
  store.check(cfg, batch, max_len)
  if gamma is not None and context_len < synthetic_min_length(cfg.sparse):
    raise ValueError(
        f"context_len={context_len} is too short for a synthetic gamma: "
        f"synthetic_selection needs >= {synthetic_min_length(cfg.sparse)} "
        "tokens")
  state = engine.empty_state(params, cfg, batch, context_len, max_len, store)
  return dataclasses.replace(state, lengths_B=jax.device_put(
      np.full((batch,), context_len, np.int32), jax.devices()[0]))


def measured_gamma(path: str, name: str = "nosa") -> float:
  """The decode gamma a quality study measured on its trained `name`.

  Reads the recall study's summary.json (`{"variants": {name:
  {"decode_gamma": [per seed]}}}`: the mean over seeds) or the issue-8
  study's quality.json (`{"rows": [{"name", "gamma"}]}`).

  Raises:
    ValueError: no gamma in [0, 1] for `name` in the file.
  """
  with open(path) as f:
    data = json.load(f)
  found: list = []
  if isinstance(data.get("variants"), dict):
    found = list(data["variants"].get(name, {}).get("decode_gamma") or [])
  elif isinstance(data.get("rows"), list):
    found = [r.get("gamma") for r in data["rows"] if r.get("name") == name]
  found = [g for g in found if isinstance(g, (int, float)) and 0 <= g <= 1]
  if not found:
    raise ValueError(f"{path}: no measured decode gamma of {name!r} (expected "
                     "a recall-study summary.json or a quality.json)")
  return float(np.mean(found))
