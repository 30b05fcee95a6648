"""Tiny configurations and random inputs shared by tests and notebooks."""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp

from nosa_jax import config as config_lib

# Small sparse settings that still select (8 of up to 16 blocks of 16).
TINY_SPARSE = config_lib.SparseConfig(
    variant="nosa", block_size=16, compress_kernel=8, compress_stride=4,
    topk_blocks=8, query_topk_blocks=5, sink_blocks=1, window_blocks=2,
    query_chunk=64)


def tiny_model_config(variant: str = "full", **overrides
                      ) -> config_lib.ModelConfig:
  """2 layers, M=64, H=4, K=2, D=16, V=259."""
  sparse = dataclasses.replace(TINY_SPARSE, variant=variant)
  base = dict(vocab_size=259, num_layers=2, model_dim=64, num_heads=4,
              num_kv_heads=2, head_dim=16, mlp_dim=128, sparse=sparse)
  base.update(overrides)
  return config_lib.ModelConfig(**base)


def tiny_config(variant: str = "full", *, data_source: str = "stdlib",
                cache_dir: str = "", **train_overrides
                ) -> config_lib.ExperimentConfig:
  """A whole experiment small enough for a unit test (seconds on a CPU)."""
  train = dict(seq_len=64, batch_size=4, num_steps=6, learning_rate=3e-3,
               warmup_steps=1, log_every=2, eval_every=0, eval_batches=1,
               checkpoint_every=3, keep_checkpoints=5)
  train.update(train_overrides)
  return config_lib.ExperimentConfig(
      model=tiny_model_config(variant),
      data=config_lib.DataConfig(source=data_source, cache_dir=cache_dir),
      train=config_lib.TrainConfig(**train))


def random_tokens(key: jax.Array, batch: int, length: int,
                  vocab: int = 259) -> jax.Array:
  return jax.random.randint(key, (batch, length), 0, vocab, jnp.int32)


def overfit_sequence(variant: str, *, steps: int = 60, length: int = 48,
                     seed: int = 0):
  """Trains a tiny model on one repeated random byte sequence.

  60 steps reach a loss of ~0.0015 (below 0.05 from step ~23) for the
  full and nosa variants, at length 48 and the default seed.

  Returns:
    (cfg, graphdef, params, seq, first_loss, last_loss) where seq is the
    length + 1 memorised tokens as a numpy array.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nosa_jax import train  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(variant, num_steps=steps, learning_rate=1e-2,
                    warmup_steps=5, seq_len=length, batch_size=2)
  graphdef, state, tx = train.init_state(cfg)
  seq = np.random.default_rng(seed).integers(0, 256, size=length + 1)
  batch = jnp.asarray(np.tile(seq, (2, 1)), jnp.int32)
  step = jax.jit(lambda s, b: train.train_step(
      s, b, graphdef=graphdef, cfg=cfg.model, tx=tx))
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(m["loss"])
  return (cfg, graphdef, state["params"], seq, float(losses[0]),
          float(losses[-1]))


def tiny_model_with_bias(variant: str, a_K=(1.5, -1.0)):
  """A tiny model whose selection and eviction bias are non-trivial.

  init_std 0.1 makes the query-aware scores discriminate; the eviction
  gains A (zero at init, which would make b vanish) are set to `a_K`.

  Returns:
    (cfg, graphdef, params).
  """
  from nosa_jax import model  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(variant, init_std=0.1)
  # One query chunk: the same numbers, less to compile.
  cfg = dataclasses.replace(
      cfg, sparse=dataclasses.replace(cfg.sparse, query_chunk=256))
  graphdef, params = model.init(cfg, 0)
  if cfg.sparse.has_eviction_head:
    a = jnp.asarray(a_K, jnp.float32)
    params = jax.tree.map_with_path(
        lambda p, x: x + a if "evict_a" in jax.tree_util.keystr(p) else x,
        params)
  return cfg, graphdef, params


@contextlib.contextmanager
def training_interrupted_at(position: int):
  """Training in this block gets a Ctrl-C (KeyboardInterrupt) when it reads
  the training batch at data position `position`, as if stopped there:
  `train.train_and_evaluate` saves a checkpoint and re-raises. (Patches
  `data.load_datasets`; position 0 stops it before its first step.)"""
  from nosa_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  real = data_lib.load_datasets

  def load(*args, **kwargs):
    ds = real(*args, **kwargs)
    stream = ds.train

    class Stream:
      def batch_at(self, pos, batch_size):
        if pos == position:
          raise KeyboardInterrupt
        return stream.batch_at(pos, batch_size)

    return dataclasses.replace(ds, train=Stream())

  with mock.patch.object(data_lib, "load_datasets", load):
    yield


def damage_checkpoint(step_dir: str) -> None:
  """Truncates every array data file of an orbax step to half its bytes, as
  a disk or a copy cut short would."""
  import os  # pylint: disable=g-import-not-at-top
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) != "d":
      continue
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
