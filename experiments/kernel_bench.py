r"""Kernel benchmark: NOSA block-sparse attention and sparse decode on a GPU.

  python -m experiments.kernel_bench --out=/tmp/kbench [--parts=train,decode]

All figures of one invocation are measured in the same process, so ratios
compare like with like. Parts:
  train:  attention fwd+bwd at T = 8k..64k with 1B-like heads (H=32, K=2,
          D=128, bf16) and the paper's budget (64 blocks of 64): cuDNN dense
          causal attention vs the Pallas block-sparse kernel vs the `xla`
          sparse path; the NOSA selection (scores + top-k) timed on its own.
  decode: the split-K decode kernel at B = 16..64, budget 4096 tokens:
          achieved bandwidth on the bytes it must read, over the HBM
          bandwidth measured in the same run (a large device copy).
  step:   the training step of a 1B-like model at 16k tokens, `pallas`
          vs `full` (cuDNN): tokens/s and MFU.
Prints a table and writes results.json under --out.
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from nosa_jax import config as config_lib
from nosa_jax import metrics as metrics_lib
from nosa_jax import selection
from nosa_jax import sparse_attention
from nosa_jax import train

_OUT = flags.DEFINE_string("out", "/tmp/kernel_bench", "Output directory.")
_PARTS = flags.DEFINE_list("parts", ["train", "decode", "step"],
                           "Which parts to run.")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536"],
                             "Sequence lengths for the train part.")
_XLA_MAX = flags.DEFINE_integer("xla_max_len", 32768,
                                "Longest T for the xla sparse path.")
_STEP_LAYERS = flags.DEFINE_integer(
    "step_layers", 28, "Layers of the 1B-like model in the step part.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations per figure.")

PAPER = config_lib.SparseConfig(variant="nosa", query_chunk=1024)


def timeit(fn, *args, iters=None):
  """Median seconds per call after one compile/warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters or _ITERS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def hbm_bandwidth() -> float:
  """Bytes/s of a 4 GiB device-to-device copy (read + write counted)."""
  x = jnp.ones((2**31,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  return 2 * x.nbytes / timeit(copy, x)


def _qkvb(key, b, t, h, k, d, dtype=jnp.bfloat16):
  kq, kk, kv, kb = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, h, d), dtype)
  kk_ = jax.random.normal(kk, (b, t, k, d), dtype)
  v = jax.random.normal(kv, (b, t, k, d), dtype)
  bias = 0.5 * jax.random.normal(kb, (b, t, k), jnp.float32)
  return q, kk_, v, bias


def _fwd_bwd(attend):
  """jit(grad) of sum(attend(q, k, v, bias, mask)) w.r.t. q, k, v, bias."""
  def loss(q, kk, v, b, m):
    return jnp.sum(attend(q, kk, v, b, m).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _train_step_fn(graphdef, model, tx):
  return jax.jit(lambda s, b: train.train_step(
      s, b, graphdef=graphdef, cfg=model, tx=tx), donate_argnums=0)


def bench_train(rows):
  h, k, d = 32, 2, 128
  for t in (int(x) for x in _LENGTHS.value):
    q, kk, v, bias = _qkvb(jax.random.key(t), 1, t, h, k, d)
    select = jax.jit(lambda q, kk, b: selection.block_mask(q, kk, b, PAPER))
    mask = select(q, kk, bias)
    density = float(jnp.mean(mask)) * 2  # vs the causal half
    t_select = timeit(select, q, kk, bias)

    dense = _fwd_bwd(lambda q, kk, v, b, m: jax.nn.dot_product_attention(
        q, kk, v, is_causal=True, implementation="cudnn"))
    pallas = _fwd_bwd(lambda q, kk, v, b, m: sparse_attention.sparse_attention(
        q, kk, v, b, m, block_size=PAPER.block_size,
        query_chunk=PAPER.query_chunk, implementation="pallas"))
    args = (q, kk, v, bias, mask)
    row = {"part": "train", "T": t, "selected_fraction_of_causal": density,
           "dense_cudnn_s": timeit(dense, *args),
           "pallas_sparse_s": timeit(pallas, *args),
           "selection_s": t_select}
    if t <= _XLA_MAX.value:
      xla = _fwd_bwd(lambda q, kk, v, b, m: sparse_attention.sparse_attention(
          q, kk, v, b, m, block_size=PAPER.block_size,
          query_chunk=PAPER.query_chunk))
      row["xla_sparse_s"] = timeit(xla, *args, iters=3)
    row["speedup_vs_dense"] = row["dense_cudnn_s"] / row["pallas_sparse_s"]
    row["selection_share"] = t_select / (t_select + row["pallas_sparse_s"])
    print(row, flush=True)
    rows.append(row)


def bench_decode(rows):
  bw = hbm_bandwidth()
  k, g, d, p, c = 2, 16, 128, 64, 64
  for b in (16, 32, 64):
    keys = jax.random.split(jax.random.key(b), 4)
    q = jax.random.normal(keys[0], (b, k * g, d), jnp.bfloat16)
    kc = jax.random.normal(keys[1], (b, k, p * c, d), jnp.bfloat16)
    vc = jax.random.normal(keys[2], (b, k, p * c, d), jnp.bfloat16)
    bias = jax.random.normal(keys[3], (b, k, p * c), jnp.float32)
    slot_len = jnp.full((b, k, p), c, jnp.int32)
    run = jax.jit(lambda *a: sparse_attention.decode_attention(
        *a, c, implementation="pallas"))
    secs = timeit(run, q, kc, vc, bias, slot_len)
    nbytes = float(sparse_attention.decode_bytes_read(q, kc, vc, bias,
                                                      slot_len, c))
    row = {"part": "decode", "B": b, "seconds": secs, "bytes": nbytes,
           "achieved_GBps": nbytes / secs / 1e9, "hbm_GBps": bw / 1e9,
           "fraction_of_hbm": nbytes / secs / bw}
    print(row, flush=True)
    rows.append(row)


def bench_step(rows):
  import dataclasses  # pylint: disable=g-import-not-at-top
  t_len = 16384
  for variant, impl in (("full", "xla"), ("nosa", "pallas")):
    sparse = dataclasses.replace(PAPER, variant=variant, implementation=impl)
    model = config_lib.ModelConfig(
        vocab_size=73448, num_layers=_STEP_LAYERS.value, model_dim=1536,
        num_heads=32, num_kv_heads=2, head_dim=128, mlp_dim=4096,
        tie_embeddings=True, dtype="bfloat16", remat="full", sparse=sparse)
    cfg = config_lib.ExperimentConfig(
        model=model, train=config_lib.TrainConfig(
            seq_len=t_len, batch_size=1, num_steps=10, warmup_steps=1))
    graphdef, state, tx = train.init_state(cfg)
    step = _train_step_fn(graphdef, model, tx)
    batch = jax.random.randint(jax.random.key(0), (1, t_len + 1), 0, 73448)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    secs = statistics.median(times)
    n = sum(x.size for x in jax.tree.leaves(state["params"]))
    flops = metrics_lib.flops_per_token(model, t_len, n) * t_len
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    row = {"part": "step", "variant": variant, "implementation": impl,
           "layers": model.num_layers, "T": t_len, "seconds": secs,
           "compile_s": compile_s, "tokens_per_s": t_len / secs,
           "mfu": flops / secs / peak if peak else None,
           "loss": float(m["loss"])}
    print(row, flush=True)
    rows.append(row)
    del state


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  rows = []
  info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  print(info, flush=True)
  for part, fn in (("train", bench_train), ("decode", bench_decode),
                   ("step", bench_step)):
    if part in _PARTS.value:
      try:
        fn(rows)
      except Exception as e:  # keep the other parts' figures
        print(f"part {part} failed: {type(e).__name__}: {e}"[:2000],
              flush=True)
        rows.append({"part": part, "error": f"{type(e).__name__}: {e}"[:2000]})
      with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=2)
  print("\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
  app.run(main)
