"""Every bad input at an entry point: one line, exit 1, no traceback."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
import pytest

from nosa_jax import testing
from nosa_jax import train

REPO = __file__.rsplit("/tests/", 1)[0]
TINY = "--config=configs/tiny.py:runlocal"


def run_entry_point(module: str, runs: list[list[str]], **env) -> list[tuple]:
  """[(exit code, printed line)] of `module` on each command line."""
  proc = subprocess.run(
      [sys.executable, "-m", "tests.experiments.cli_worker", module,
       json.dumps(runs)], cwd=REPO, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
  assert proc.returncode == 0 and len(lines) == len(runs), proc.stderr[-3000:]
  return [tuple(json.loads(ln)) for ln in lines]


class BadInputTest(absltest.TestCase):
  """input -> the one line it prints (exit code 1 for each)."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.file = os.path.join(self.tmp, "a_file")
    with open(self.file, "w") as f:
      f.write("hi")  # also a corpus of 3 tokens

  def check(self, module, cases):
    got = run_entry_point(module, [argv for argv, _ in cases])
    for (argv, want), (code, line) in zip(cases, got, strict=True):
      self.assertEqual(code, 1, (argv, line))
      self.assertRegex(line, want, argv)
      self.assertNotIn("\n", line)

  def test_pretrain(self):
    wd = f"--workdir={self.tmp}/run"
    self.check("pretrain", [
        ([TINY, wd, "--config.train.lenght=5"],
         r"^--config.train.lenght: train.lenght is not a config field; did "
         r"you mean train.seq_len"),
        ([TINY, wd, "--config.model.sparse.topk=4"],
         r"did you mean model.sparse.topk_blocks"),
        (["--config=configs/nope.py", wd],
         r"^--config=configs/nope.py: no such config file configs/nope.py$"),
        ([TINY, wd, "--config.train.seq_len=abc"],
         r"^--config.train.seq_len=abc: invalid literal for int"),
        ([TINY, wd, "--config.train.seq_len=-3"],
         r"^config error: train.seq_len=-3 is invalid: must be a positive "),
        ([TINY, f"--workdir={self.file}"],
         rf"^pretrain error: workdir {self.file} is a file, not a directory$"),
        ([TINY, wd, f"--config.data.source={self.file}",
          f"--config.data.cache_dir={self.tmp}/cache"],
         r"^pretrain error: train split has \d+ tokens, fewer than one "
         r"window of seq_len \+ 1 = 257; lower seq_len or use a larger"),
    ])

  def test_pretrain_ctrl_c_saves_and_prints_one_line(self):
    wd = f"{self.tmp}/run"
    [(code, text)] = run_entry_point(
        "pretrain", [[TINY, f"--workdir={wd}", "--config.train.seq_len=64",
                      f"--config.data.cache_dir={self.tmp}/cache"]],
        CLI_WORKER_INTERRUPT_AT="0")
    self.assertEqual(code, 130)
    self.assertEqual(text.splitlines()[-1], f"interrupted: checkpoint saved "
                     f"in {wd}; the same command resumes")
    self.assertNotIn("Traceback", text)
    self.assertEqual(os.listdir(os.path.join(wd, "checkpoints")), ["0"])

  def test_dry_run_without_a_device_memory_figure_warns(self):
    [(code, text)] = run_entry_point("pretrain", [[
        "--config=configs/nosa_8b.py", f"--workdir={self.tmp}", "--dry_run",
        "--num_devices=8", "--config.train.mesh_shape=(1,8,1)"]])
    self.assertEqual(code, 0)
    self.assertRegex(text, r"total +\d+\.\d\d GiB\n")
    self.assertEqual(text.splitlines()[-1], "warning: cpu reports no device "
                     "memory, so the plan is not checked against any; pass "
                     "--device_memory_gib")

  def test_generate(self):
    self.check("generate", [
        ([TINY, "--prompt=hi", "--temperature=-1"],
         r"^generate error: temperature=-1.0 is invalid: must be >= 0"),
        ([TINY, "--prompt=hi", "--top_p=5"],
         r"^generate error: top_p=5.0 is invalid: must be in \(0, 1\]"),
        ([TINY, "--prompt=hi", "--top_p=0"], r"top_p=0.0 is invalid"),
        ([TINY, "--prompt=hi", "--max_new_tokens=0"],
         r"^generate error: max_new_tokens=0 must be >= 1$"),
        ([f"--workdir={self.tmp}/none"],
         rf"^generate error: no config.json in {self.tmp}/none: not a "
         "training workdir$"),
    ])

  @pytest.mark.slow  # compiles a prefill and a decode step (~10 s)
  def test_generate_warns_of_a_prompt_past_the_trained_context(self):
    [(code, text)] = run_entry_point("generate", [
        [TINY, "--prompt=" + "x" * 300, "--max_new_tokens=1"]])
    self.assertEqual(code, 0, text)
    self.assertIn("the prompt (301 tokens) + --max_new_tokens=1 pass the "
                  "trained context of 256 tokens (train.seq_len): the model "
                  "never saw those positions", text)

  def test_evaluate(self):
    self.check("evaluate", [
        ([f"--workdir={self.tmp}/none"],
         r"^evaluate error: no config.json in .*/none: not a training"),
        ([f"--workdir={self.tmp}", f"--out_json={self.file}/eval.json"],
         rf"^evaluate error: --out_json: {self.file} is a file, not a "),
        ([f"--workdir={self.tmp}", "--passkey_depths=0.5,2"],
         r"^flag error: --passkey_depths=\(0\.5, 2\.0\) is invalid: must "
         r"be one or more numbers in \[0, 1\]$"),
    ])

  def test_export(self):
    workdir = f"{self.tmp}/run"
    with testing.training_interrupted_at(0), self.assertRaises(
        KeyboardInterrupt):  # a workdir with a checkpoint of step 0
      train.train_and_evaluate(testing.tiny_config(
          "full", cache_dir=f"{self.tmp}/cache"), workdir)
    self.check("export", [
        ([f"--workdir={self.tmp}/none", f"--out={self.tmp}/x"],
         rf"^export error: no config.json in {self.tmp}/none: not a training "
         "workdir$"),
        ([f"--workdir={workdir}", f"--out={self.file}"],  # once hung here
         rf"^export error: --out: {self.file} is a file, not a directory$"),
        ([f"--workdir={workdir}", f"--out={workdir}"],
         rf"^export error: --out={workdir} clashes with the training workdir"),
        ([f"--workdir={workdir}", f"--out={self.tmp}/x", "--step=7"],
         r"^export error: no checkpoint for step 7 in .*; steps: 0$"),
    ])

  def test_studies(self):
    self.check("quality_study", [
        (["--config=configs/quality.py:runlocal", "--variants=full",
          f"--out_dir={self.file}"],
         rf"^quality_study error: --out_dir: {self.file} is a file"),
        (["--config=configs/quality.py:runlocal", "--variants=dense",
          f"--out_dir={self.tmp}/q"],
         r"^config error: variants='dense' is invalid: 'dense' must be one "),
    ])
    self.check("scaling", [
        (["--runlocal", f"--out_dir={self.file}"],
         rf"^scaling error: --out_dir: {self.file} is a file"),
    ])


if __name__ == "__main__":
  absltest.main()
