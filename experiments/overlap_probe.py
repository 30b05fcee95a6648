r"""Can a zero-copy host gather run beside decode-like GEMMs? (issue #5 probe)

  python -m experiments.overlap_probe --out_dir=/tmp/overlap
  python -m experiments.overlap_probe --runlocal --out_dir=/tmp/ov  # CPU smoke

The offload engine's transfers overlap only the attention of their own layer
(experiments/results/decode/NOTES.md); hiding them behind the projection /
MLP GEMMs needs the gather kernel (`pallas_kernels.gather_blocks`, reading
the pinned_host store on the SMs) to run *concurrently* with those GEMMs.
PERFORMANCE.md's earlier probe found no concurrency next to compute-bound
4096^3 matmuls, which fill every SM. A decode step's GEMMs are different:
M = batch = 16 rows, weight-streaming, memory-bound. This probe measures, in
one run:

  gemm      a chain of --layers (x @ W_up -> silu -> @ W_down), M = --batch,
            bf16 weights (model_dim x mlp_dim), alone;
  gather    --tiles scattered C x D tiles of a pinned_host store copied to
            the device, alone, for each --programs grid size;
  both      the two, independent, in one jit, default stream (XLA runs one
            stream: the expected result is serial);
  stream    the same with the gather under
            `compute_on(compute_type="gpu_stream:1")` (XLA's stream
            annotation), which is what an overlapped engine would use.

Per (arrangement, programs): ms, and overlap = (t_gemm + t_gather - t_both)
/ min(t_gemm, t_gather), 0 = serial, 1 = the shorter one fully hidden. An
arrangement that fails to compile or run is recorded with its error (and the
run goes on). Output: table.md and overlap_probe.json in --out_dir (the
measured ones: experiments/results/decode/s5_h100_overlap_probe/).
"""

from __future__ import annotations

import datetime
import json
import os
import platform

from absl import flags
import jax
from jax.experimental.compute_on import compute_on
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments.bench import ceilings
from experiments.bench import timing
from nosa_jax import implementations

_OUT = flags.DEFINE_string("out_dir", "/tmp/overlap_probe", "Output dir.")
_BATCH = flags.DEFINE_integer("batch", 16, "GEMM rows M (decode batch).")
_LAYERS = flags.DEFINE_integer("layers", 16, "GEMM chain length.")
_MODEL = flags.DEFINE_integer("model_dim", 4096, "Model width.")
_MLP = flags.DEFINE_integer("mlp_dim", 14336, "MLP width.")
_TILES = flags.DEFINE_integer("tiles", 2048, "Tiles gathered per call.")
_STORE = flags.DEFINE_integer("store_tiles", 16384, "Tiles in the store.")
_PROGRAMS = flags.DEFINE_list("programs", ["8", "16", "32", "132", "528"],
                              "Gather grid sizes.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per figure.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False,
                              "Tiny shapes, interpreted kernel (CPU smoke).")

_C, _D = 64, 128  # one K (or V) tile of one block and KV head


def _gather(src_RCD, rows_F, programs):
  dst = jnp.zeros((rows_F.shape[0],) + src_RCD.shape[1:], src_RCD.dtype)
  gather = implementations.kernel("block_fetch", "pallas", programs=programs)
  (out,) = gather(
      (src_RCD,), (dst,), rows_F, jnp.arange(rows_F.shape[0], dtype=jnp.int32),
      rows_F.shape[0])
  return out


def _on_stream(fn):
  """fn under XLA's stream annotation (gpu_stream:1)."""
  return compute_on(fn, compute_type="gpu_stream:1",
                    out_memory_spaces=jax.memory.Space.Device)


def run(out_dir: str) -> dict:
  local = _RUNLOCAL.value
  b, layers, m, f = ((2, 2, 64, 128) if local else
                     (_BATCH.value, _LAYERS.value, _MODEL.value, _MLP.value))
  tiles, store = (16, 64) if local else (_TILES.value, _STORE.value)
  programs = [2] if local else [int(p) for p in _PROGRAMS.value]
  iters = 2 if local else _ITERS.value
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  w_up = jax.random.normal(key, (layers, m, f), jnp.bfloat16) * 0.02
  w_down = jax.random.normal(key, (layers, f, m), jnp.bfloat16) * 0.02
  x = jnp.ones((b, m), jnp.bfloat16)
  src = jax.device_put(jnp.asarray(rng.normal(size=(store, _C, _D)),
                                   jnp.bfloat16), jax.memory.Space.Host)
  rows = jnp.asarray(rng.choice(store, tiles, replace=False), jnp.int32)

  res = {"meta": {
      "command": "python -m experiments.overlap_probe " + " ".join(
          f"--{k}={v.value}" for k, v in flags.FLAGS._flags().items()  # pylint: disable=protected-access
          if k in ("batch", "layers", "model_dim", "mlp_dim", "tiles",
                   "store_tiles", "runlocal")),
      "device": jax.devices()[0].device_kind, "host": platform.node(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="minutes"),
      "shapes": {"batch": b, "layers": layers, "model_dim": m, "mlp_dim": f,
                 "tiles": tiles, "store_tiles": store},
      "gemm_weight_bytes": 2 * w_up.nbytes, "gather_bytes":
      tiles * _C * _D * 2}, "rows": []}
  t_gemm = timing.timeit(jax.jit(ceilings.gemm_chain), x, w_up, w_down,
                         iters=iters)
  res["gemm_ms"] = t_gemm * 1e3
  for p in programs:
    gather = lambda s, r, p=p: _gather(s, r, p)
    t_gather = timing.timeit(jax.jit(gather), src, rows, iters=iters)
    arrangements = {
        "both": lambda *a, g=gather: (ceilings.gemm_chain(*a[:3]), g(*a[3:])),
        "stream": lambda *a, g=gather: (ceilings.gemm_chain(*a[:3]),
                                        _on_stream(g)(*a[3:])),
    }
    for name, fn in arrangements.items():
      row = {"arrangement": name, "programs": p,
             "gather_ms": t_gather * 1e3, "gemm_ms": t_gemm * 1e3,
             "gather_gb_s": res["meta"]["gather_bytes"] / t_gather / 1e9}
      try:
        t_both = timing.timeit(jax.jit(fn), x, w_up, w_down, src, rows,
                               iters=iters)
        row.update(both_ms=t_both * 1e3, overlap=(
            t_gemm + t_gather - t_both) / min(t_gemm, t_gather))
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      res["rows"].append(row)
      print(row, flush=True)
      _write(res, out_dir)
  return res


def _write(res: dict, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "overlap_probe.json"), "w") as f:
    json.dump(res, f, indent=1)
  lines = [f"`{res['meta']['command']}` on {res['meta']['device']}, "
           f"{res['meta']['date']}", "",
           f"GEMM chain alone: {res['gemm_ms']:.3f} ms "
           f"({res['meta']['gemm_weight_bytes'] / 1e6:.0f} MB of weights); "
           f"gather: {res['meta']['gather_bytes'] / 1e6:.1f} MB per call.", "",
           "| arrangement | programs | gather ms | GB/s | both ms | overlap |",
           "|---|---|---|---|---|---|"]
  for r in res["rows"]:
    both = (f"{r['both_ms']:.3f} | {r['overlap']:.2f}" if "both_ms" in r
            else f"- | {r['error']}")
    lines.append(f"| {r['arrangement']} | {r['programs']} | "
                 f"{r['gather_ms']:.3f} | {r['gather_gb_s']:.1f} | {both} |")
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv):
  del argv
  run(_OUT.value)
  print(open(os.path.join(_OUT.value, "table.md")).read())


if __name__ == "__main__":
  cli.run(main, "overlap_probe")
