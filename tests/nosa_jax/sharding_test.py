"""SPMD on 8 virtual CPU devices: meshes follow the 1-device trajectory."""

import glob
import json
import os
import socket
import subprocess
import sys

from absl.testing import absltest
import pytest
from jax.sharding import PartitionSpec as P
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from nosa_jax import config as config_lib
from nosa_jax import model
from nosa_jax import sharding
from nosa_jax import testing
from tests.nosa_jax import spmd_worker

REPO = __file__.rsplit("/tests/", 1)[0]


def _xla_flags(devices: int) -> str:
  """The test session's XLA_FLAGS (conftest.py) plus the device count."""
  return (f"{os.environ.get('XLA_FLAGS', '')} "
          f"--xla_force_host_platform_device_count={devices}").strip()


def _losses(workdir):
  events = glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
  out = {}
  for path in sorted(events):
    acc = event_accumulator.EventAccumulator(path)
    acc.Reload()
    out.update({e.step: e.value for e in acc.Scalars("train/loss")})
  return np.array([out[s] for s in sorted(out)])


class SpecTest(absltest.TestCase):

  def test_rules(self):
    _, params = model.abstract_params(testing.tiny_model_config("nosa"))
    specs = sharding.param_specs(params, {"data": 2, "fsdp": 4, "tensor": 2})
    blk = specs["blocks"][0]
    self.assertEqual(blk["attn"]["wq"].get_value(), P("fsdp", "tensor", None))
    self.assertEqual(blk["attn"]["wk"].get_value(), P("fsdp", None, None))
    self.assertEqual(blk["mlp"]["w_down"].get_value(), P("tensor", "fsdp"))
    # 259 is not divisible by 2: the vocabulary is replicated, not split.
    self.assertEqual(specs["embed"].get_value(), P(None, "fsdp"))

  def test_mesh_shape_errors(self):
    with self.assertRaisesRegex(config_lib.ConfigError, "train.mesh_shape"):
      sharding.resolve_mesh_shape((3, -1, 1), 8)
    with self.assertRaisesRegex(config_lib.ConfigError, "train.mesh_shape"):
      sharding.resolve_mesh_shape((2, 2, 1), 8)
    self.assertEqual(sharding.resolve_mesh_shape((2, -1, 2), 8), (2, 2, 2))


class BatchParallelTest(absltest.TestCase):
  """The Pallas kernels run per batch / head shard under a mesh (4 CPU
  devices)."""

  def test_kernel_sees_its_shard_and_matches_the_unsharded_call(self):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.nosa_jax.batch_parallel_worker"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=_xla_flags(4)))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(got["sharded"], 2)  # batch 8 over data 2 x fsdp 2
    self.assertEqual(got["no_mesh"], 8)
    self.assertEqual(got["indivisible"], 6)  # 6 % 4: left whole
    self.assertEqual(got["tensor_only"], 8)  # no batch axis > 1
    self.assertTrue(got["scores_mask_equal"])
    # (1, 2, 2): batch over fsdp, H and K over tensor (GQA groups intact);
    # heads left whole when tensor does not divide K.
    self.assertEqual(got["heads_tp"], [4, 2, 1])
    self.assertEqual(got["heads_tp_indivisible"], [4, 3, 1])
    self.assertLess(got["attention_max_abs_diff_tp"], 1e-4)
    self.assertTrue(got["scores_mask_equal_tp"])


class MeshTrajectoryTest(absltest.TestCase):
  """Each multi-device run is its own process (the device count is fixed at
  JAX start); one-device runs are in this one."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cache = os.path.join(absltest.get_default_test_tmpdir(), "spmd_cache")

  def _run(self, devices, mesh, steps=6, stop=None, workdir=None,
           variant="full"):
    workdir = workdir or self.create_tempdir().full_path
    args = [workdir, self.cache, mesh, variant, str(steps)]
    args += [str(stop)] if stop else []
    if devices == 1 and stop is None:  # this process has one CPU device
      spmd_worker.main(*args)
      return workdir
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=_xla_flags(devices))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.nosa_jax.spmd_worker", *args], cwd=REPO,
        env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    return workdir

  _base = None

  def _baseline(self):
    """The one-device trajectory, computed once for the class."""
    if MeshTrajectoryTest._base is None:
      MeshTrajectoryTest._base = _losses(self._run(1, "1,1,1"))
    return MeshTrajectoryTest._base

  def _check_meshes(self, meshes):
    base = self._baseline()
    self.assertLen(base, 6)
    self.assertLess(base[-1], base[0])
    for mesh in meshes:
      got = _losses(self._run(8, mesh))
      np.testing.assert_allclose(got, base, rtol=2e-5, atol=2e-5,
                                 err_msg=f"mesh {mesh}")

  def test_data_parallel_follows_one_device(self):
    # (2, 4, 1) and (2, 2, 2) are in the checkpoint test below.
    self._check_meshes(("8,1,1",))

  @pytest.mark.slow
  def test_meshes_follow_one_device(self):
    self._check_meshes(("8,1,1", "2,4,1", "2,2,2"))

  @pytest.mark.slow  # 45 s; the two-process test also restores on a new mesh
  def test_checkpoint_restores_on_another_mesh(self):
    base = self._baseline()
    workdir = self._run(8, "2,4,1", stop=3)
    self._run(8, "2,2,2", workdir=workdir)
    np.testing.assert_allclose(_losses(workdir), base, rtol=2e-5, atol=2e-5)

  @pytest.mark.slow
  def test_two_processes_save_then_one_process_restores(self):
    """Multi-host: 2 processes x 4 devices (gloo), then 1 process x 8."""
    base = _losses(self._run(1, "1,1,1", steps=4))
    workdir = self.create_tempdir().full_path
    with socket.socket() as sock:
      sock.bind(("localhost", 0))
      port = sock.getsockname()[1]
    procs = []
    for pid in range(2):
      env = dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=_xla_flags(4),
                 NOSA_COORDINATOR=f"localhost:{port}", NOSA_NUM_PROCESSES="2",
                 NOSA_PROCESS_ID=str(pid))
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "tests.nosa_jax.spmd_worker", workdir,
           self.cache, "2,4,1", "full", "4", "2"], cwd=REPO, env=env,
          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
      _, err = proc.communicate(timeout=600)
      self.assertEqual(proc.returncode, 0, err[-3000:])
    self._run(8, "2,2,2", steps=4, workdir=workdir)
    np.testing.assert_allclose(_losses(workdir), base, rtol=2e-5, atol=2e-5)

  @pytest.mark.slow
  def test_sparse_variant_on_a_mesh(self):
    base = _losses(self._run(1, "1,1,1", steps=3, variant="nosa"))
    got = _losses(self._run(8, "2,2,2", steps=3, variant="nosa"))
    np.testing.assert_allclose(got, base, rtol=2e-5, atol=2e-5)


if __name__ == "__main__":
  absltest.main()
