r"""Pretrain a NOSA (or baseline) model.

  python -m experiments.pretrain --config=configs/tiny.py --workdir=/tmp/run
  python -m experiments.pretrain --config=configs/nosa_1b.py:variant=full \
      --workdir=/tmp/run --config.train.num_steps=2000

Running again with the same --workdir resumes from the latest checkpoint.
TensorBoard: tensorboard --logdir=/tmp/run/tensorboard
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from nosa_jax import config as config_lib
from nosa_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py[:variant=full].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard and config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  try:
    cfg = config_lib.ExperimentConfig.from_dict(_CONFIG.value.to_dict())
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  train.quiet_library_logs()
  logging.info("JAX %s on %s", jax.__version__, jax.devices())
  try:
    train.train_and_evaluate(cfg, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except train.TrainingDiverged as e:
    sys.exit(f"training stopped: {e}")


if __name__ == "__main__":
  app.run(main)
