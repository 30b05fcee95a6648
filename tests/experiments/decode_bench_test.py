"""experiments/decode_bench.py: the verdict lines, and a CPU smoke run."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from experiments import decode_bench

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _rec(system, ctx, batch, tps):
  return {"system": system, "context": ctx, "batch": batch,
          "tokens_per_s": tps}


class VerdictTest(absltest.TestCase):

  def test_comparisons(self):
    recs = [_rec("nosa_gpu", 100, 4, 300.0), _rec("nosa_offload", 100, 4,
                                                   200.0),
            _rec("infllmv2_offload", 100, 4, 100.0),
            _rec("infllmv2_gpu", 100, 4, 50.0),
            _rec("full_gpu_max", 100, 9, 400.0)]
    got = decode_bench.verdicts(recs)
    self.assertEqual(got, [
        "infllmv2, L=100, B=4: offloaded beats GPU-resident (2.00x).",
        "nosa, L=100, B=4: GPU-resident beats offloaded (1.50x).",
        "NOSA offloaded / InfLLMv2 offloaded, L=100, B=4: 2.00x.",
        "NOSA offloaded (B=4) / FullAttn at its largest batch (B=9), L=100: "
        "0.50x."])
    self.assertEqual(decode_bench.verdicts([_rec("full_gpu", 1, 1, 1.0)]),
                     [])


class SmokeTest(absltest.TestCase):

  def test_runlocal(self):  # ~15-30 s on 2 cores
    out = self.create_tempdir().full_path
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "experiments.decode_bench", "--runlocal",
         f"--out_dir={out}", "--steps=3", "--warmup=2",
         "--systems=nosa_gpu,nosa_offload"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300)
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    res = json.load(open(os.path.join(out, "decode_bench.json")))
    self.assertEqual([r["system"] for r in res["records"]],
                     ["nosa_gpu", "nosa_offload"])
    off = res["records"][1]
    self.assertGreater(off["fetched_blocks"], 0)
    self.assertTrue(0.0 < off["gamma"] < 1.0)
    self.assertGreater(res["ceilings"]["pcie_bulk_bytes_per_s"], 0)
    self.assertEqual(res["gather"][-1]["method"], "xla_copy_loop")
    table = open(os.path.join(out, "table.md")).read()
    self.assertIn("nosa, L=400, B=16:", table)
    self.assertTrue(os.path.exists(os.path.join(out, "decode_bench.png")))
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.decode_bench", "--runlocal",
         f"--out_dir={out}", "--systems=nosa_warp"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300)
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("--systems: unknown 'nosa_warp'", bad.stderr)


if __name__ == "__main__":
  absltest.main()
