r"""Evaluate a trained model: held-out perplexity, passkey, decode gamma.

  python -m experiments.evaluate --workdir=/tmp/nosa_tiny
  python -m experiments.evaluate --workdir=/tmp/run \
      --passkey_lengths=2048,8192 --passkey_depths=0.1,0.5,0.9 \
      --passkey_trials=8 --implementation=pallas
  # an HF export (model from its config.json; data from --config or defaults)
  python -m experiments.evaluate --hf_dir=/tmp/hf --workdir=/tmp/hf_eval \
      --config=configs/tiny.py

Reads the latest checkpoint of --workdir (or --step) without disturbing a
running training, and writes WORKDIR/eval.json (--out_json) and TensorBoard
scalars under WORKDIR/tensorboard/eval at the checkpoint's step. What each
number means: `nosa_jax.evaluation`.
"""

import dataclasses
import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli
from nosa_jax import checkpoint
from nosa_jax import config as config_lib
from nosa_jax import evaluation
from nosa_jax import metrics
from nosa_jax import train

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir to evaluate (and where results go).")
_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Evaluate this HF directory instead of the checkpoint.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config file overriding the run's config.json "
    "(data, seq_len; the model must fit the checkpoint).")
_HF_SPARSE = flags.DEFINE_bool(
    "hf_sparse_from_config", False, "With --hf_dir and --config: select with "
    "the config's model.sparse instead of the constants the checkpoint's "
    "architecture implies (see the import report in the results).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_IMPL = flags.DEFINE_enum("implementation", None, ["xla", "pallas"],
                          "Attention implementation (default: the config's).")
_OUT_JSON = flags.DEFINE_string("out_json", None,
                                "Results file (default WORKDIR/eval.json).")
_D = evaluation.EvalConfig()
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Perplexity T (0: the run's).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Batch (0: the run's).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0,
                                     "Held-out batches (0: the run's).")
_LENGTHS = flags.DEFINE_string("passkey_lengths", "", "Passkey context "
                               "lengths, e.g. 256,512 (empty: T/2,T).")
_DEPTHS = flags.DEFINE_string("passkey_depths", ",".join(
    map(str, _D.passkey_depths)), "Needle depths in [0, 1].")
_TRIALS = flags.DEFINE_integer("passkey_trials", _D.passkey_trials,
                               "Keys per (length, depth); 0 skips.")
_GAMMA_PROMPTS = flags.DEFINE_integer("gamma_prompts", _D.gamma_prompts,
                                      "Prompts decoded for gamma; 0 skips.")
_GAMMA_NEW = flags.DEFINE_integer("gamma_new_tokens", _D.gamma_new_tokens,
                                  "Tokens decoded per gamma prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Passkey keys.")
_RECALL = flags.DEFINE_integer(
    "recall_trials", 0, "Held-out recall documents per distance bucket "
    "(nosa_jax.recall); 0 skips.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  train.quiet_library_logs()
  try:
    ecfg = evaluation.EvalConfig(
        seq_len=_SEQ_LEN.value, batch_size=_BATCH.value,
        eval_batches=_EVAL_BATCHES.value, passkey_trials=_TRIALS.value,
        passkey_lengths=evaluation.parse_list(
            "passkey_lengths", _LENGTHS.value, int),
        passkey_depths=evaluation.parse_list(
            "passkey_depths", _DEPTHS.value, float),
        gamma_prompts=_GAMMA_PROMPTS.value,
        gamma_new_tokens=_GAMMA_NEW.value, seed=_SEED.value,
        recall_trials=_RECALL.value)
  except config_lib.ConfigError as e:
    sys.exit(f"flag error: --{e}")
  out = _OUT_JSON.value or os.path.join(_WORKDIR.value, "eval.json")
  try:
    checkpoint.writable_dir(os.path.dirname(os.path.abspath(out)),
                            "--out_json")
    cfg = (None if _CONFIG.value is None else
           config_lib.ExperimentConfig.from_dict(_CONFIG.value.to_dict()))
    if _HF_SPARSE.value and (cfg is None or not _HF_DIR.value):
      raise config_lib.ConfigError(
          "hf_sparse_from_config=True is invalid: needs --hf_dir and "
          "--config")
    report = []
    cfg, params, step = evaluation.load_model(
        workdir=None if _HF_DIR.value else _WORKDIR.value,
        hf_dir=_HF_DIR.value, cfg=cfg, step=_STEP.value,
        hf_sparse=cfg.model.sparse if _HF_SPARSE.value else None,
        report=report)
    for line in report:
      print(f"import: {line}")
    if _IMPL.value:
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(
          cfg.model, sparse=dataclasses.replace(
              cfg.model.sparse, implementation=_IMPL.value)))
    results = evaluation.evaluate(params, cfg, ecfg)
  except (OSError, ValueError) as e:  # ConfigError is a ValueError
    sys.exit(f"evaluate error: {e}")
  results["source"] = {"workdir": os.path.abspath(_WORKDIR.value),
                       "hf_dir": _HF_DIR.value, "step": step,
                       "import_report": report}
  results["eval_config"] = dataclasses.asdict(ecfg)
  checkpoint.write_json_atomic(out, results)
  writer = metrics.MetricWriter(
      os.path.join(_WORKDIR.value, "tensorboard", "eval"))
  evaluation.log_results(writer, step, results)
  writer.close()
  pk, gamma = results["passkey"], results["gamma"]
  print(f"step {step} ({cfg.model.sparse.variant}): held-out NLL "
        f"{results['perplexity']['nll']:.4f} (ppl "
        f"{results['perplexity']['ppl']:.2f})"
        + (f"; passkey {pk['overall']:.3f}" if pk else "")
        + (f"; gamma {gamma['mean']:.3f}" if gamma else "")
        + f"\nwrote {out}")


if __name__ == "__main__":
  cli.run(main, "evaluate")
