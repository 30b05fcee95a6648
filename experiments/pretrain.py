r"""Pretrain a NOSA (or baseline) model.

  python -m experiments.pretrain --config=configs/tiny.py --workdir=/tmp/run
  python -m experiments.pretrain --config=configs/nosa_1b.py:variant=full \
      --workdir=/tmp/run --config.train.num_steps=2000
  # memory plan only, for 8 GPUs of 141 GiB with (data, fsdp, tensor)=(1,8,1):
  python -m experiments.pretrain --config=configs/nosa_8b.py --workdir=/tmp/x \
      --dry_run --num_devices=8 --device_memory_gib=141 \
      --config.train.mesh_shape="(1,8,1)"

Running again with the same --workdir resumes from the latest checkpoint.
Multi-host: pass --coordinator_address, --num_processes and --process_id
on every host. TensorBoard: tensorboard --logdir=/tmp/run/tensorboard
"""

import sys

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import cli
from nosa_jax import config as config_lib
from nosa_jax import memory_plan
from nosa_jax import sharding
from nosa_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py[:variant=full].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard and config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (multi-host).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the per-device memory plan and stop.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Dry run: plan for this many devices (default: "
    "the devices present).")
_DEVICE_GIB = flags.DEFINE_float(
    "device_memory_gib", None, "Dry run: memory per device (default: read "
    "from the first device).")
flags.mark_flags_as_required(["config", "workdir"])


def dry_run(cfg: config_lib.ExperimentConfig) -> None:
  n = _NUM_DEVICES.value or jax.device_count()
  mesh = sharding.resolve_mesh_shape(cfg.train.mesh_shape, n)
  limit = (_DEVICE_GIB.value or 0) * 2**30 or (
      jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
  plan = memory_plan.memory_plan(cfg, mesh)
  print(memory_plan.format_plan(plan, limit))
  if not limit:
    print(f"warning: {jax.devices()[0].platform} reports no device memory, "
          "so the plan is not checked against any; pass --device_memory_gib")
  if limit and plan.total > limit:
    sys.exit(f"will not fit: {plan.total / 2**30:.1f} GiB per device needed, "
             f"{limit / 2**30:.1f} GiB available; use more devices, a larger "
             "fsdp axis, a smaller train.batch_size or model.remat=full")


def main(argv):
  del argv
  try:
    cfg = config_lib.ExperimentConfig.from_dict(_CONFIG.value.to_dict())
    if _DRY_RUN.value:
      return dry_run(cfg)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  train.quiet_library_logs()
  logging.info("JAX %s, process %d/%d, devices %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  try:
    train.train_and_evaluate(cfg, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except train.TrainingDiverged as e:
    sys.exit(f"training stopped: {e}")
  except KeyboardInterrupt:
    print(f"interrupted: checkpoint saved in {_WORKDIR.value}; the same "
          "command resumes", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  cli.run(main, "pretrain")
