"""experiments/dma_probe.py off the GPU, and the CUDA ABI of cuda_dma."""

import ctypes
import json
import os

from absl.testing import absltest

from experiments.bench import cuda_dma
from tests import entry_points


class DmaProbeTest(absltest.TestCase):

  def test_skips_off_the_gpu_with_the_reason(self):
    out = self.create_tempdir().full_path
    run = entry_points.run("dma_probe", f"--out_dir={out}", timeout=120)
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
