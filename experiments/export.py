r"""Export a training checkpoint as HF safetensors and params-only orbax.

  python -m experiments.export --workdir=/tmp/nosa_tiny --out=/tmp/nosa_hf
  python -m experiments.export --workdir=/tmp/run --out=/tmp/hf --step=2000 \
      --dtype=float32

Writes OUT/model.safetensors + OUT/config.json (HF Llama layout plus the
NOSA eviction head; `nosa_jax.hf_io.import_hf(OUT)` reads them back),
OUT/orbax_params/ (`hf_io.load_orbax_params`) and, when the run used a
`tokenizer.json`, a copy of it. Safe to run while training continues.
"""

import os
import shutil
import sys

from absl import flags

from experiments import cli
from nosa_jax import checkpoint
from nosa_jax import hf_io
from nosa_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", hf_io.EXPORT_DTYPES,
                           "Storage dtype of model.safetensors.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  train.quiet_library_logs()
  workdir = os.path.abspath(_WORKDIR.value)
  out = os.path.abspath(_OUT.value)
  ckpts = os.path.join(workdir, "checkpoints")
  if out == workdir or os.path.commonpath([out, ckpts]) == ckpts:
    raise ValueError(f"--out={out} clashes with the training workdir (its "
                     "config.json or checkpoints would be overwritten); "
                     "choose another directory")
  cfg, params, step = hf_io.load_workdir(workdir, _STEP.value)
  checkpoint.writable_dir(out, "--out")
  try:
    written = [hf_io.export_orbax_params(
        params, os.path.join(out, "orbax_params"))]
    written += hf_io.export_hf(params, cfg.model, out, _DTYPE.value)
    tok = os.path.expanduser(cfg.data.tokenizer)
    if cfg.data.tokenizer != "bytes":
      if os.path.isdir(tok):
        tok = os.path.join(tok, "tokenizer.json")
      dest = os.path.join(out, "tokenizer.json")
      if os.path.abspath(tok) != os.path.abspath(dest):
        written.append(shutil.copy(tok, dest))
  except (OSError, ValueError) as e:
    print(f"export error: {e}", file=sys.stderr, flush=True)
    # A failed orbax save leaves threads waiting for a signal that never
    # comes, which would block the interpreter's exit for many minutes;
    # the checks above catch the inputs known to get here.
    os._exit(1)
  print(f"Exported step {step} of {_WORKDIR.value} "
        f"({cfg.model.sparse.variant}, {_DTYPE.value}):")
  for path in written:
    print(f"  {path}")


if __name__ == "__main__":
  cli.run(main, "export")
