"""experiments/kernel_bench.py: CPU smoke runs of its parts.

The kernels run in the Pallas interpreter on CPU, so the figures mean
nothing; what is checked is that each part runs end to end, writes its rows
and compares variants on the same inputs. A subprocess, because the entry
point's absl flags would clash with other experiments' in one worker.
"""

import json
import os

from absl.testing import absltest
import pytest

from tests import entry_points


def _kernel_bench(*flags, timeout=600):
  return entry_points.run("kernel_bench", *flags, timeout=timeout)


@pytest.mark.slow
class KernelBenchTest(absltest.TestCase):

  def test_profile_bwd_sweep_and_scores_sweep(self):
    out = self.create_tempdir().full_path
    run = _kernel_bench(
        f"--out={out}", "--parts=bwd_sweep,train_profile,scores_sweep",
        "--lengths=256", "--score_lengths=256", "--masks=local", "--iters=1",
        "--bwd_variants=transposed_dq64rows_dkv64rows,"
        "transposed_dq64rows_dkv64rows_masked")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    errors = [r for r in rows if "error" in r]
    self.assertEqual(errors, [])
    sweep = [r for r in rows if r["part"] == "bwd_sweep"]
    self.assertEqual([r["full_fast_path"] for r in sweep], [True, False])
    # The masked kernels compute the same gradients (bf16 rounding aside).
    self.assertLess(sweep[1]["max_rel_diff_vs_first"], 1e-2)
    profile = [r["variant"] for r in rows if r["part"] == "train_profile"]
    self.assertEqual(profile, ["dense_cudnn", "transposed_dq64rows_dkv64rows",
                               "transposed_dq64rows_dkv64rows_masked"])
    scores = [r for r in rows if r["part"] == "scores_sweep"]
    self.assertLen(scores, 16)  # 8 tilings, chunked and whole-T
    for r in scores:
      self.assertLess(r["max_abs_diff_vs_first"], 1e-5, r)

  def test_train_and_selection_parts(self):
    out = self.create_tempdir().full_path
    run = _kernel_bench(
        f"--out={out}", "--parts=train,scores,selection_profile",
        "--lengths=256", "--score_lengths=256", "--masks=local", "--iters=1",
        "--xla_max_len=256")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    self.assertEqual([r for r in rows if "error" in r], [])
    self.assertEqual([r["part"] for r in rows],
                     ["train", "scores"] + 3 * ["selection_profile"])
    train = rows[0]
    self.assertTrue(train["selection_pallas_scores_same_mask"])
    # The tie statistics of selection.score_path_agreement (B=1, K=2).
    self.assertEqual(train["selection_pallas_scores_rows"], 2 * 256)
    self.assertEqual(train["selection_pallas_scores_mask_rows_differ"], 0)
    self.assertLessEqual(train["selection_pallas_scores_worst_gap_over_eps"],
                         2.0)
    self.assertIn("xla_sparse_s", train)
    self.assertTrue(all(r["same_masks_as_library"] for r in rows[2:]))
    self.assertLess(rows[1]["pallas_tf32_max_abs_diff_vs_xla"], 1e-4)

  def test_fwd_and_fwd_bwd_parts(self):
    out = self.create_tempdir().full_path
    run = _kernel_bench(f"--out={out}", "--parts=fwd,fwd_bwd",
                        "--lengths=128", "--masks=local", "--iters=1")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    fwd, fwd_bwd = json.load(open(os.path.join(out, "results.json")))["rows"]
    self.assertEqual((fwd["part"], fwd_bwd["part"]), ("fwd", "fwd_bwd"))
    for row in (fwd, fwd_bwd):
      self.assertNotIn("mosaic_error", row)
      self.assertGreater(row["mosaic_effective_tflops"], 0)
    self.assertIn("dense_cudnn_fwd_bwd_s", fwd_bwd)
    # The Mosaic and Triton kernels agree (bf16 rounding): outputs, and
    # the worst gradient relative to its largest entry.
    self.assertLess(fwd["mosaic_max_abs_diff_vs_pallas"], 2e-2)
    self.assertLess(fwd_bwd["mosaic_max_rel_diff_vs_pallas"], 2e-2)


class FlagsTest(absltest.TestCase):

  def test_unknown_part_is_one_line_error(self):
    run = _kernel_bench("--parts=trian",
                        f"--out={self.create_tempdir().full_path}",
                        timeout=120)
    self.assertEqual(run.returncode, 1)
    self.assertIn("--parts: unknown ['trian']", run.stderr)
    self.assertNotIn("Traceback", run.stderr)


if __name__ == "__main__":
  absltest.main()
