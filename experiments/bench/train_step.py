"""The training step of a 1B-like model at 16k tokens: tokens/s and MFU.

Part `step` of `experiments.kernel_bench`, per `STEP_VARIANTS`: dense
(cuDNN), NOSA with the Pallas or xla attention, with the block_scores
kernel, and with a remat backward that repeats the selection.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax

from experiments.bench import attention_kernels
from nosa_jax import config as config_lib
from nosa_jax import metrics as metrics_lib
from nosa_jax import train as train_lib

# name -> (SparseConfig.variant, implementation, score_implementation[,
# ModelConfig.remat_keeps_selection, True if absent]).
STEP_VARIANTS = {
    "full": ("full", "xla", "xla"),  # cuDNN dense attention
    "nosa_pallas": ("nosa", "pallas", "xla"),
    "nosa_pallas_scores": ("nosa", "pallas", "pallas"),
    # The same, its remat backward repeating the selection (before s8).
    "nosa_pallas_scores_reselect": ("nosa", "pallas", "pallas", False),
    "nosa_xla": ("nosa", "xla", "xla"),
}
LENGTH = 16384
VOCAB = 73448


def model_config(name: str, layers: int) -> config_lib.ModelConfig:
  """The 1B-like model of variant `name` with `layers` layers."""
  variant, impl, scores, *keep = STEP_VARIANTS[name]
  sparse = dataclasses.replace(attention_kernels.PAPER, variant=variant,
                               implementation=impl,
                               score_implementation=scores)
  return config_lib.ModelConfig(
      vocab_size=VOCAB, num_layers=layers, model_dim=1536, num_heads=32,
      num_kv_heads=2, head_dim=128, mlp_dim=4096, tie_embeddings=True,
      dtype="bfloat16", remat="full", sparse=sparse, scan_layers=True,
      remat_keeps_selection=keep[0] if keep else True)


def step(rows, *, variants, layers, timed_steps=5):
  """One row per variant: median step seconds, tokens/s, MFU, compile."""
  for name in variants:
    model = model_config(name, layers)
    cfg = config_lib.ExperimentConfig(
        model=model, train=config_lib.TrainConfig(
            seq_len=LENGTH, batch_size=1, num_steps=10, warmup_steps=1))
    graphdef, state, tx = train_lib.init_state(cfg)
    run = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef,
                                    cfg=model, tx=tx), donate_argnums=0)
    batch = jax.random.randint(jax.random.key(0), (1, LENGTH + 1), 0, VOCAB)
    times = []
    for _ in range(1 + timed_steps):  # the first call compiles
      t0 = time.perf_counter()
      state, m = run(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    print(f"step {name}: compiled in {times[0]:.0f} s", flush=True)
    secs = statistics.median(times[1:])
    n = sum(x.size for x in jax.tree.leaves(state["params"]))
    flops = metrics_lib.flops_per_token(model, LENGTH, n) * LENGTH
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    row = {"part": "step", "name": name, "variant": model.sparse.variant,
           "implementation": model.sparse.implementation,
           "score_implementation": model.sparse.score_implementation,
           "remat_keeps_selection": model.remat_keeps_selection,
           "layers": layers, "T": LENGTH, "seconds": secs,
           "compile_s": times[0], "tokens_per_s": LENGTH / secs,
           "mfu": flops / secs / peak if peak else None,
           "loss": float(m["loss"])}
    print(row, flush=True)
    rows.append(row)
    del state
