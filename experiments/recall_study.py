r"""Quality study with recall (issue 24): resumable (variant, seed) units.

  # on the GPU machine: the plan's next units that are not done
  python -m experiments.recall_study --config=configs/recall.py \
      --out_dir=$OUT/units --done_dirs=experiments/results/quality/units \
      --work_dir=/tmp/recall_runs --stop_after_minutes=6
  # here: merge every finished unit into the summary, tables and plots
  python -m experiments.recall_study --config=configs/recall.py --units= \
      --out_dir=experiments/results/quality/units \
      --summary_dir=experiments/results/quality
  # the penalty's cost: nosa's step without it, with it exact and sampled
  # (the config's locality_sample_fraction), one process
  python -m experiments.recall_study --config=configs/recall.py --units= \
      --penalty_overhead --out_dir=$OUT/units
  # CPU smoke run of the whole pipeline on tiny shapes
  python -m experiments.recall_study --runlocal --out_dir=/tmp/recall

A unit is one (variant, seed): it trains in WORK_DIR/<name>_s<seed>
(resuming from its checkpoints there) and writes OUT_DIR/unit_<name>_s<seed>
.json; a unit whose file exists in OUT_DIR or a --done_dirs directory is
skipped. Units come from the config's `study.plan` (seed-major, `full`
first) or --units=name@seed,... . Before each sparse unit the dense gate is
checked: once full units exist and their mean held-out recall beyond the
window is below `study.gate`, the run stops (--ignore_gate overrides). At
the end (and with --units= alone) `study.merge` rebuilds SUMMARY_DIR's
summary.json, study.json, summary.md, recall.png and sweep.png from every
finished unit (experiments/study.py says what each holds).
"""

import os
import sys
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli
from experiments import study
from experiments.bench import harness
from nosa_jax import checkpoint
from nosa_jax import config as config_lib
from nosa_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/recall.py[:runlocal]", lock_config=True)
_RUNLOCAL = flags.DEFINE_bool(
    "runlocal", False, "Without --config: configs/recall.py:runlocal.")
_UNITS = flags.DEFINE_string(
    "units", None, "name@seed,... instead of the config's study.plan; "
    "empty: merge only.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Unit results (JSON).")
_DONE = flags.DEFINE_list("done_dirs", [], "More directories of finished "
                          "unit results: skipped, and merged.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/recall_runs",
                                "Training workdirs (checkpoints) per unit.")
_SUMMARY_DIR = flags.DEFINE_string("summary_dir", None,
                                   "Merged results (default: --out_dir).")
_STOP = flags.DEFINE_float("stop_after_minutes", 0.0, "Start no unit after "
                           "this many minutes (0: no limit).")
_IGNORE_GATE = flags.DEFINE_bool("ignore_gate", False, "Run sparse units "
                                 "even when the dense gate failed.")
_PENALTY = flags.DEFINE_bool(
    "penalty_overhead", False, "First time nosa's train step without "
    "locality_weight=0.1, with it exact and with it sampled as the config "
    "samples it, in this process (OUT_DIR/penalty_overhead.json, merged "
    "into study.json).")
_COMMIT = flags.DEFINE_string("commit", "", "Recorded commit (default: "
                              "git's, 'n/a' in a copy without .git).")
flags.mark_flags_as_required(["out_dir"])


def main(argv):
  del argv
  train.quiet_library_logs()
  if _CONFIG.value is None:
    if not _RUNLOCAL.value:
      sys.exit("flag error: --config is required (or --runlocal)")
    from configs import recall  # pylint: disable=g-import-not-at-top
    base = recall.get_config("runlocal").to_dict()
  else:
    base = _CONFIG.value.to_dict()
  try:
    spec = base.pop("study")
    ecfg = study.eval_config(base.pop("eval", {}))
    units = (study.plan_units(spec["plan"]) if _UNITS.value is None
             else study.parse_units(_UNITS.value))
  except (config_lib.ConfigError, KeyError) as e:
    sys.exit(f"config error: {e}")
  out = _OUT_DIR.value
  checkpoint.writable_dir(out, "--out_dir")
  dirs = [out, *_DONE.value]
  stamp = harness.stamp("recall_study", **(
      {"commit": _COMMIT.value} if _COMMIT.value else {}))
  if _PENALTY.value:
    res = dict(study.penalty_overhead(base), stamp=stamp)
    checkpoint.write_json_atomic(
        os.path.join(out, study.PENALTY_FILE), res)
    logging.info("locality penalty: %+.1f%% of nosa's step time sampled "
                 "(fraction %g), %+.1f%% exact", 100 * res["overhead"],
                 res["sample_fraction"], 100 * res["overhead_exact"])
  start = time.time()
  for unit in units:
    if unit.key in study.finished(dirs):
      logging.info("%s: done, skipped", unit.key)
      continue
    if _STOP.value and time.time() - start > 60 * _STOP.value:
      logging.info("%.1f minutes passed: %s and the units after it are "
                   "left for the next call", _STOP.value, unit.key)
      break
    if unit.variant != "full" and not _IGNORE_GATE.value:
      passed, verdict = study.dense_gate(
          study.summarize(study.load_units(dirs)), spec["gate"])
      if passed is False:
        logging.warning("%s; %s not run (--ignore_gate runs it)", verdict,
                        unit.key)
        break
    cfg = study.variant_config(base, unit.variant, unit.locality_weight,
                               seed=unit.seed)
    logging.info("%s: training %d steps in %s", unit.key,
                 cfg.train.num_steps, os.path.join(_WORK_DIR.value, unit.key))
    res = study.run_unit(unit, cfg, ecfg,
                         os.path.join(_WORK_DIR.value, unit.key), stamp=stamp)
    checkpoint.write_json_atomic(os.path.join(out, unit.result_file), res)
  study.merge(dirs, _SUMMARY_DIR.value or out, spec["gate"])


if __name__ == "__main__":
  cli.run(main, "recall_study")
