"""Sampling and prompt packing of the generate loop (shared by both stores).

  sample_tokens   greedy or temperature + nucleus (top-p) sampling
  next_token      one sampling step of the loop state (EOS / pad handling)
  check_sampling  the range of temperature and top_p
  prepare_prompts validation and right-padding of a batch of prompts
  trim_at_eos     per-sequence token lists from the per-step arrays
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32
_INF = float("inf")


def capacity(max_len: int, block_size: int) -> int:
  """Cache capacity S: max_len rounded up to whole blocks."""
  return -(-max_len // block_size) * block_size


def check_sampling(temperature: float, top_p: float) -> None:
  """Raises a one-line ValueError for a temperature < 0 or a top_p outside
  (0, 1] (NaN included), which would otherwise sample silently."""
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature} is invalid: must be >= 0 "
                     "(0 = greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} is invalid: must be in (0, 1] (1 = "
                     "off)")


def sample_tokens(logits_BV: jax.Array, key: jax.Array,
                  temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Greedy (temperature <= 0) or temperature + nucleus (top-p) sampling.

  Top-p keeps the most likely tokens whose cumulative probability before
  them is < top_p (at least one). temperature and top_p are traced, so
  changing them does not recompile.

  Returns:
    tokens_B int32.
  """
  logits_BV = logits_BV.astype(_F32)
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p) | (top_p >= 1)
  thresh_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, _INF), axis=-1,
                      keepdims=True)
  masked_BV = jnp.where(scaled_BV >= thresh_B1, scaled_BV, -_INF)
  sampled_B = jax.random.categorical(key, masked_BV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def next_token(state: dict, logits_BV: jax.Array, temperature, top_p,
               eos_id, pad_id) -> dict:
  """Samples the next tokens into the loop state (key, tok_B, done_B)."""
  key, sub = jax.random.split(state["key"])
  tok_B = sample_tokens(logits_BV, sub, temperature, top_p)
  tok_B = jnp.where(state["done_B"], pad_id, tok_B)  # finished: emit pad
  return dict(state, key=key, tok_B=tok_B,
              done_B=state["done_B"] | (tok_B == eos_id))


def prepare_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    block_size: int, *, max_len: Optional[int] = None,
                    eos_id: Optional[int] = None,
                    pad_id: Optional[int] = None):
  """Validates a batch of prompts and right-pads it to whole blocks.

  Returns:
    (tokens_BT, lengths_B, capacity S, pad_id, eos) where eos is -1 for
    "never"; tokens and lengths are device arrays.
  """
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("generate needs at least one prompt, none empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  lengths = np.array([len(p) for p in prompts], np.int32)
  # The last sampled token is never fed back, hence the -1.
  need = int(lengths.max()) + max_new_tokens - 1
  if max_len is not None and need > max_len:
    raise ValueError(f"max_len={max_len} is too small: the longest prompt "
                     f"({lengths.max()}) + max_new_tokens - 1 = {need}")
  s = capacity(max_len or need, block_size)
  pad_id = pad_id if pad_id is not None else (eos_id or 0)
  eos = -1 if eos_id is None else eos_id
  # Prompts are padded to whole blocks so that few prompt shapes compile.
  tokens = np.full((len(prompts), capacity(int(lengths.max()), block_size)),
                   pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return jnp.asarray(tokens), jnp.asarray(lengths), s, pad_id, eos


def trim_at_eos(step_tokens: Sequence[jax.Array], eos: int) -> list:
  """Per-sequence token lists from per-step [B] arrays, cut after EOS."""
  toks = np.asarray(jnp.stack(step_tokens, axis=1))
  results = []
  for row in toks.tolist():
    if eos in row:
      row = row[:row.index(eos) + 1]
    results.append(row)
  return results
