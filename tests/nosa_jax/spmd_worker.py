"""Subprocess body of sharding_test: trains the tiny config on one mesh.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX
starts, which is why it is a separate process:
  python -m tests.nosa_jax.spmd_worker WORKDIR CACHE MESH VARIANT STEPS [STOP]
MESH is like 2,4,1; with STOP the run is interrupted (Ctrl-C, which saves a
checkpoint) once STOP steps are done. With NOSA_COORDINATOR=host:port,
NOSA_NUM_PROCESSES and NOSA_PROCESS_ID set, the process joins a multi-process
run (CPU collectives over gloo), as `experiments.pretrain` does with flags.
"""

import os
import sys

import jax

from nosa_jax import testing
from nosa_jax import train


def main(workdir, cache, mesh, variant, steps, stop=None):
  cfg = testing.tiny_config(
      variant, cache_dir=cache, num_steps=int(steps), batch_size=8,
      log_every=1, checkpoint_every=0,
      mesh_shape=tuple(int(x) for x in mesh.split(",")))
  if stop is None:
    train.train_and_evaluate(cfg, workdir)
    return
  with testing.training_interrupted_at(int(stop) * cfg.train.batch_size):
    try:
      train.train_and_evaluate(cfg, workdir)
    except KeyboardInterrupt:
      pass


if __name__ == "__main__":
  if os.environ.get("NOSA_COORDINATOR"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["NOSA_COORDINATOR"],
                               int(os.environ["NOSA_NUM_PROCESSES"]),
                               int(os.environ["NOSA_PROCESS_ID"]))
  main(*sys.argv[1:])
