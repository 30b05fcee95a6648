"""configs/quality.py and experiments/quality_study.py (issue 8 driver)."""

import glob
import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from configs import quality
from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import evaluation
from nosa_jax import model
from tests import entry_points


def _build(arg):
  d = quality.get_config(arg).to_dict()
  return (config_lib.ExperimentConfig.from_dict(d),
          evaluation.EvalConfig(**d["eval"]))


class QualityConfigTest(parameterized.TestCase):

  @parameterized.parameters("full", "infllmv2", "dma", "nosa")
  def test_real_config(self, variant):
    cfg, ecfg = _build(f"variant={variant}")
    sp = cfg.model.sparse
    self.assertEqual((sp.variant, sp.implementation), (variant, "pallas"))
    self.assertEqual(cfg.model.dtype, "bfloat16")
    n = model.count_params(model.abstract_params(cfg.model)[1])
    self.assertBetween(n, 20e6, 30e6)
    # The budget is 1/8 of the context.
    self.assertEqual(8 * sp.topk_blocks * sp.block_size, cfg.train.seq_len)
    self.assertGreater(cfg.data.passkey_fraction, 0)
    # Every evaluated needle but one control cell (2k, depth 0.9) lies
    # outside the forced sink + window blocks (numpy only: a perfect
    # predictor, so only the geometry is computed).
    res = evaluation.passkey_accuracy(
        lambda t: (np.roll(t, -1, axis=1), np.zeros(t.shape)),
        data.ByteTokenizer(),
        lengths=ecfg.passkey_lengths, depths=ecfg.passkey_depths, trials=1,
        batch_size=1, sparse=sp)
    outside = np.array(res["outside_forced"])
    self.assertEqual(outside[0, -1], 0.0)
    outside[0, -1] = 1.0
    self.assertEqual(outside.min(), 1.0)
    self.assertEqual(res["overall"], 1.0)
    self.assertLessEqual(max(ecfg.passkey_lengths), cfg.train.seq_len)

  def test_runlocal_is_cpu_sized(self):
    cfg, ecfg = _build("runlocal,variant=nosa")
    self.assertEqual(cfg.model.sparse.implementation, "xla")
    self.assertLessEqual(cfg.train.seq_len, 256)
    self.assertLessEqual(max(ecfg.passkey_lengths), cfg.train.seq_len)
    self.assertLess(model.count_params(model.abstract_params(cfg.model)[1]),
                    2e5)


class QualityStudyTest(absltest.TestCase):

  def _run(self, *args, timeout=240):
    return entry_points.run("quality_study", *args, timeout=timeout)

  @pytest.mark.slow  # ~40 s on 2 cores; the study's pieces are tested above
  def test_two_variants_end_to_end(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    run = self._run("--config=configs/quality.py:runlocal",
                    "--variants=full,nosa_loc0.1", f"--out_dir={out}",
                    f"--work_dir={work}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    names = sorted(os.listdir(out))
    self.assertEqual(names, ["gamma.png", "loss.png", "passkey.png",
                             "quality.json", "tradeoff.png",
                             "variant_full.json",
                             "variant_nosa_loc0.1.json"])
    for png in glob.glob(os.path.join(out, "*.png")):
      with open(png, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertLess(sum(os.path.getsize(os.path.join(out, n))
                        for n in names), 400_000)

    with open(os.path.join(out, "quality.json")) as f:
      rows = {r["name"]: r for r in json.load(f)["rows"]}
    full, nosa = rows["full"], rows["nosa_loc0.1"]
    self.assertEqual((full["variant"], nosa["variant"]), ("full", "nosa"))
    self.assertEqual((full["locality_weight"], nosa["locality_weight"]),
                     (0.0, 0.1))
    self.assertEqual(full["tokens"], nosa["tokens"])  # the same budget
    self.assertIsNone(full["gamma"])
    self.assertBetween(nosa["gamma"], 0.0, 1.0)
    for row in (full, nosa):
      self.assertBetween(row["passkey"], 0.0, 1.0)
      self.assertGreater(row["passkey_answer_nll"], 0.0)
      self.assertIn("passkey_outside_window", row)
    with open(os.path.join(out, "variant_nosa_loc0.1.json")) as f:
      res = json.load(f)
    self.assertEqual([s for s, _ in res["curves"]["eval/loss"]], [0, 4, 8])
    self.assertIn("locality/gamma", res["curves"])
    self.assertEqual(np.shape(res["passkey"]["accuracy"]), (1, 2))
    self.assertTrue(np.isfinite(res["perplexity"]["nll"]))

    # Merge mode: no training, summary and plots rebuilt from the JSONs.
    for name in ("quality.json", "loss.png"):
      os.remove(os.path.join(out, name))
    run = self._run("--config=configs/quality.py:runlocal", "--variants=",
                    f"--out_dir={out}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertTrue(os.path.exists(os.path.join(out, "loss.png")))
    self.assertIn("nosa_loc0.1 |", run.stdout)

  @pytest.mark.slow
  def test_minutes_per_variant_sizes_num_steps(self):
    out = self.create_tempdir().full_path
    run = self._run("--config=configs/quality.py:runlocal", "--variants=full",
                    "--minutes_per_variant=0.05", f"--out_dir={out}",
                    f"--work_dir={self.create_tempdir().full_path}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    with open(os.path.join(out, "variant_full.json")) as f:
      res = json.load(f)
    steps = res["config"]["train"]["num_steps"]
    self.assertEqual(res["step"], steps)
    self.assertGreater(steps, 8)  # 3 s of 4 x 256-token steps on a CPU
    self.assertLess(res["config"]["train"]["warmup_steps"], steps)

  def test_bad_variants_is_one_line(self):
    run = self._run("--config=configs/quality.py:runlocal",
                    "--variants=nosa,full_loc0.1", "--out_dir=/nonexistent")
    self.assertEqual(run.returncode, 1)
    self.assertEqual(
        run.stderr.strip().splitlines()[-1],
        "config error: variants='nosa,full_loc0.1' is invalid: "
        "'full_loc0.1' must be one of full, infllmv2, dma, nosa, optionally "
        "with _loc<weight> for a sparse variant (e.g. nosa_loc0.1), each "
        "listed once")


if __name__ == "__main__":
  absltest.main()
