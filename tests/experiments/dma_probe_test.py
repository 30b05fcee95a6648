"""experiments/dma_probe.py off the GPU, and the CUDA ABI of cuda_dma."""

import ctypes
import json
import os
import subprocess
import sys

from absl.testing import absltest

from experiments.bench import cuda_dma

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class DmaProbeTest(absltest.TestCase):

  def test_skips_off_the_gpu_with_the_reason(self):
    out = self.create_tempdir().full_path
    run = subprocess.run(
        [sys.executable, "-m", "experiments.dma_probe", f"--out_dir={out}"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=120)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    res = json.load(open(os.path.join(out, "dma_probe.json")))
    self.assertIn("needs a GPU", res["skipped"])
    self.assertEqual(res["rows"], [])

  def test_memcpy_attributes_layout(self):
    # cudaMemcpyAttributes: enum, two cudaMemLocation {int, int}, uint.
    self.assertEqual(ctypes.sizeof(cuda_dma._MemcpyAttributes), 24)  # pylint: disable=protected-access
    self.assertEqual(cuda_dma._MemcpyAttributes.flags.offset, 20)  # pylint: disable=protected-access


if __name__ == "__main__":
  absltest.main()
