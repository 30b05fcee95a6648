r"""Top GPU kernels of a `jax.profiler` trace: where a decode step's time goes.

  python -m experiments.trace_summary --trace_dir=OUT/profile/nosa_gpu_L65536_B4
      [--top=30] [--steps=32]

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(...,
create_perfetto_trace=True)` writes (decode_bench --profile does), sums the
duration of every event on the GPU device tracks by kernel name, prints the
`--top` names with their share and time per step (`--steps`: steps traced),
and writes `trace_summary.json` beside the trace.
"""

import gzip
import json
import os

from absl import flags

from experiments import cli
from experiments.bench import timing

_DIR = flags.DEFINE_string("trace_dir", None, "Directory a trace was "
                           "written to (searched recursively).")
_TOP = flags.DEFINE_integer("top", 30, "Kernel names to print.")
_STEPS = flags.DEFINE_integer("steps", 1, "Steps the trace covers.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not _DIR.value:
    raise ValueError("--trace_dir is required")
  if _STEPS.value < 1:
    raise ValueError(f"--steps={_STEPS.value} must be >= 1")
  path = timing.find_trace(_DIR.value)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  out = timing.summarize_trace(events)
  busy = sum(k["total_us"] for k in out["kernels"])
  out.update(trace=path, steps=_STEPS.value, busy_us=busy)
  print(f"{path}: GPU busy {busy / 1e3:.2f} ms over {_STEPS.value} steps "
        f"({busy / 1e3 / _STEPS.value:.3f} ms/step), tracks {out['tracks']}")
  for k in out["kernels"][:_TOP.value]:
    print(f"{k['total_us'] / _STEPS.value:9.1f} us/step "
          f"{100 * k['total_us'] / max(busy, 1e-9):5.1f}% "
          f"x{k['count'] // _STEPS.value:<5d} {k['name'][:110]}")
  with open(os.path.join(os.path.dirname(path), "trace_summary.json"),
            "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  cli.run(main, "trace_summary")
