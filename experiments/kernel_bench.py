r"""Kernel benchmark: NOSA's training and decode kernels on a GPU.

  python -m experiments.kernel_bench --out=/tmp/kbench [--parts=train,decode]

All figures of one invocation come from the same process, so ratios compare
like with like. Each part is a function of `experiments/bench/`, whose
docstring says what it measures:
  train, train_sweep, bwd_sweep, train_profile,
  fwd, fwd_bwd                                   bench/attention_kernels.py
  scores, scores_sweep, selection_profile        bench/selection_kernels.py
  decode, decode_sweep                           bench/decode_kernels.py
  step                                           bench/train_step.py
Off the GPU the kernels run in the Pallas interpreter: the parts run (CI
smoke tests) but their figures mean nothing.

Writes results.json ({"info": stamp, "rows": [...]}) under --out after every
part (a failing part is a row with its error). Measured figures and the
commands that gave them: experiments/results/kernels/NOTES.md (and
training/NOTES.md for the step). For example, the backward variants:

  python -m experiments.kernel_bench --out=/tmp/kb --parts=bwd_sweep \
      --lengths=32768,16384 --masks=local --iters=5
"""

import functools
import json

from absl import flags

from experiments import cli
from experiments.bench import attention_kernels
from experiments.bench import decode_kernels
from experiments.bench import harness
from experiments.bench import selection_kernels
from experiments.bench import train_step

_OUT = flags.DEFINE_string("out", "/tmp/kernel_bench", "Output directory.")
_PARTS = flags.DEFINE_list("parts", ["train", "decode", "step"],
                           "Which parts to run.")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536"],
                             "Sequence lengths of the train parts.")
_XLA_MAX = flags.DEFINE_integer("xla_max_len", 32768,
                                "Longest T for the xla sparse path.")
_MASKS = flags.DEFINE_list(
    "masks", ["random", "local"], "Selection inputs of the train parts: "
    "random queries, or slowly varying (local) ones.")
_BWD = flags.DEFINE_list(
    "bwd_variants", list(attention_kernels.BWD_VARIANTS)[:6],
    "Variants of bwd_sweep / train_profile, of "
    f"{list(attention_kernels.BWD_VARIANTS)}.")
_SCORE_LENGTHS = flags.DEFINE_list(
    "score_lengths", ["16384", "32768"], "Sequence lengths of the selection "
    "parts.")
_DECODE_BATCHES = flags.DEFINE_list(
    "decode_batches", ["16", "32", "64"], "Batch sizes of the decode parts.")
_STEP_LAYERS = flags.DEFINE_integer(
    "step_layers", 28, "Layers of the 1B-like model in the step part.")
_STEP_VARIANTS = flags.DEFINE_list(
    "step_variants", list(train_step.STEP_VARIANTS),
    f"Variants of the step part, of {list(train_step.STEP_VARIANTS)}.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations per figure.")


def _ints(flag) -> list[int]:
  try:
    return [int(x) for x in flag.value]
  except ValueError:
    raise ValueError(f"--{flag.name}={','.join(flag.value)}: integers "
                         "only") from None


def _check_choices(flag, allowed) -> None:
  unknown = sorted(set(flag.value) - set(allowed))
  if unknown:
    raise ValueError(f"--{flag.name}: unknown {unknown}; allowed: "
                         f"{list(allowed)}")


def _parts(save) -> dict:
  """Part name -> fn(rows), its options bound from the flags."""
  train = {"lengths": _ints(_LENGTHS), "masks": _MASKS.value}
  select = {"lengths": _ints(_SCORE_LENGTHS), "iters": _ITERS.value}
  dec = {"batches": _ints(_DECODE_BATCHES), "iters": _ITERS.value,
         "save": save}
  p = functools.partial
  return {
      "train": p(attention_kernels.train, **train, iters=_ITERS.value,
                 xla_max_len=_XLA_MAX.value),
      "train_sweep": p(attention_kernels.train_sweep, **train),
      "fwd": p(attention_kernels.fwd, **train, iters=_ITERS.value),
      "fwd_bwd": p(attention_kernels.fwd_bwd_mosaic, **train,
                   iters=_ITERS.value),
      "bwd_sweep": p(attention_kernels.bwd_sweep, **train, iters=_ITERS.value,
                     variants=_BWD.value, save=save),
      "train_profile": p(attention_kernels.train_profile, **train,
                         iters=_ITERS.value, variants=_BWD.value),
      "decode": p(decode_kernels.decode, **dec),
      "decode_sweep": p(decode_kernels.decode, **dec, sweep=True),
      "step": p(train_step.step, variants=_STEP_VARIANTS.value,
                layers=_STEP_LAYERS.value),
      "scores": p(selection_kernels.scores, **select),
      "scores_sweep": p(selection_kernels.scores_sweep, **select),
      "selection_profile": p(selection_kernels.selection_profile, **select),
  }


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  rows = []
  info = harness.stamp("kernel_bench")

  def save():
    harness.write_results(_OUT.value, "results", {"info": info, "rows": rows})

  parts = _parts(save)
  _check_choices(_PARTS, parts)
  _check_choices(_BWD, attention_kernels.BWD_VARIANTS)
  _check_choices(_STEP_VARIANTS, train_step.STEP_VARIANTS)
  print(info, flush=True)
  for part, fn in parts.items():
    if part not in _PARTS.value:
      continue
    try:
      fn(rows)
    except Exception as e:  # keep the other parts' figures
      print(f"part {part} failed: {type(e).__name__}: {e}"[:2000], flush=True)
      rows.append({"part": part, "error": f"{type(e).__name__}: {e}"[:2000]})
    save()
  print("\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
  cli.run(main, "kernel_bench")
