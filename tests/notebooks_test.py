"""The notebooks run top to bottom (smoke mode) and write their figures.

Each notebook runs in a subprocess through `nosa_jax.notebook_runner`
(no Jupyter on the CI machine), with NOSA_NOTEBOOK_SMOKE=1 and a persistent
JAX compilation cache shared by the three runs, so programs that repeat
across notebooks (same tiny model, same step) compile once.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from nosa_jax import notebook_runner

REPO = __file__.rsplit("/tests/", 1)[0]
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ("01_selection_locality_ablation.ipynb", "02_offload_tradeoffs.ipynb",
         "03_tensorboard_analysis.ipynb")


class NotebooksTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The test session's cache (tests/conftest.py), else one of our own.
    cls.cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    cls.own_cache = not cls.cache
    if cls.own_cache:
      cls.cache = tempfile.mkdtemp(prefix="nosa_nb_jax_cache_")

  @classmethod
  def tearDownClass(cls):
    if cls.own_cache:
      shutil.rmtree(cls.cache, ignore_errors=True)
    super().tearDownClass()

  def _run(self, name, **extra_env):
    out = self.create_tempdir().full_path
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NOSA_NOTEBOOK_", "NOSA_TB_", "NOSA_DECODE_"))}
    env.update(NOSA_NOTEBOOK_SMOKE="1", NOSA_NOTEBOOK_OUT=out,
               NOSA_NOTEBOOK_WORKDIR=self.create_tempdir().full_path,
               JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
               JAX_COMPILATION_CACHE_DIR=self.cache,
               PYTHONPATH=os.pathsep.join(
                   [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.update(extra_env)
    proc = subprocess.run(
        [sys.executable, "-m", "nosa_jax.notebook_runner",
         os.path.join(NOTEBOOKS, name)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0,
                     msg=f"{name} failed:\n{proc.stdout[-4000:]}\n"
                     f"{proc.stderr[-4000:]}")
    return sorted(os.listdir(out)), proc.stdout

  # 33 s on 2 cores (two tiny nosa trainings): its pieces are unit-tested
  # (train_and_evaluate with the locality statistics in sparse_model_test,
  # the readers and plots in analysis_test).
  @pytest.mark.slow
  def test_01_selection_locality_ablation(self):
    files, _ = self._run(NAMES[0])
    self.assertEqual(files, ["01_ablation.png", "01_curves.png"])

  def test_02_offload_tradeoffs_with_measured_points(self):
    # As experiments/decode_bench.py writes them (`context`, `mode`,
    # `variant`, null gamma, same-run ceilings), plus a minimal record and
    # one naming no known model.
    bench_records = [
        dict(system="full_gpu", variant="full", mode="full", model="8b",
             context=16384, batch=16, gamma=None, tokens_per_s=1677.0,
             step_ms=9.5, pcie_bytes_per_step=0.0),
        dict(system="nosa_offload", variant="nosa", mode="offload",
             model="8b", context=16384, batch=16, gamma=0.944,
             tokens_per_s=1121.7, step_ms=14.3, pcie_bytes_per_step=1.2e8,
             model_serial_tokens_per_s=1687.8,
             model_overlapped_tokens_per_s=2324.8),
        dict(system="nosa_offload", model="nosa_1b", context_len=32768,
             batch=8, gamma=0.9, tokens_per_s=900.0, step_ms=8.9,
             pcie_bytes_per_step=9e7),
        dict(system="other", model="70b", context_len=4096, batch=1,
             gamma=None, tokens_per_s=10.0, step_ms=100.0,
             pcie_bytes_per_step=0.0),
    ]
    bench = self.create_tempfile("bench.json", json.dumps({
        "ceilings": {"hbm_bytes_per_s": 2.7e12,
                     "pcie_bulk_bytes_per_s": 5.3e10},
        "gather": [{"bytes_per_s": 4.6e10}], "records": bench_records}))
    files, stdout = self._run(NAMES[1], NOSA_DECODE_BENCH=bench.full_path)
    self.assertEqual(files, [
        "02_measured_vs_model.png", "02_throughput_vs_gamma.png",
        "02_transfer_vs_gamma.png", "02_vs_context.png"])
    self.assertIn("4 measured records", stdout)
    self.assertIn("PCIe 46.0 GB/s", stdout)  # the fastest measured gather

  def test_02_offload_tradeoffs_without_measured_points(self):
    missing = os.path.join(self.create_tempdir().full_path, "none.json")
    files, stdout = self._run(NAMES[1], NOSA_DECODE_BENCH=missing)
    self.assertNotIn("02_measured_vs_model.png", files)
    self.assertIn("No measured points", stdout)

  @pytest.mark.slow  # 37 s; nosa_jax/analysis is unit-tested in analysis_test
  def test_03_tensorboard_analysis(self):
    files, stdout = self._run(NAMES[2])
    self.assertEqual(files, [
        "03_bias_nosa.png", "03_entering_blocks.png", "03_gamma_per_layer.png",
        "03_loss.png"])
    self.assertIn("2 runs under", stdout)

  def test_notebook_structure(self):
    for name in NAMES:
      with open(os.path.join(NOTEBOOKS, name)) as f:
        nb = json.load(f)
      self.assertEqual(nb["nbformat"], 4, name)
      first = "".join(nb["cells"][0]["source"])
      self.assertEqual(nb["cells"][0]["cell_type"], "markdown", name)
      for word in ("**Question.**", "**Config.**", "**Result"):
        self.assertIn(word, first, name)
      for cell in nb["cells"]:
        src = "".join(cell["source"])
        self.assertNotIn("PLACEHOLDER", src, name)
        if cell["cell_type"] == "code":
          self.assertEqual(cell["outputs"], [], f"{name}: outputs not stripped")
      install = "".join(nb["cells"][1]["source"])
      self.assertIn("%pip install", install, name)


class RunnerTest(absltest.TestCase):

  def _notebook(self, cells):
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": kind, "metadata": {}, "source": src,
         **({"outputs": [], "execution_count": None}
            if kind == "code" else {})} for kind, src in cells]}
    return self.create_tempfile("x.ipynb", json.dumps(nb)).full_path

  def test_strip_magics(self):
    self.assertEqual(notebook_runner.strip_magics(
        "%pip install x\n  !ls\nx = 1\n# %not a magic\n"),
                     "x = 1\n# %not a magic")
    self.assertEqual(notebook_runner.strip_magics("%%bash\necho hi\n"), "")

  def test_runs_cells_in_one_namespace(self):
    path = self._notebook([
        ("markdown", "# title"),
        ("code", ["%pip install nothing\n", "import os\n",
                  "x = int(os.environ['NB_TEST_VALUE'])\n"]),
        ("code", "%%bash\nexit 1\n"),
        ("code", "y = x + 1\ny * 10"),
    ])
    ns = notebook_runner.run_notebook(path, {"NB_TEST_VALUE": "4"},
                                      verbose=False)
    self.assertEqual((ns["x"], ns["y"]), (4, 5))
    self.assertNotIn("NB_TEST_VALUE", os.environ)

  def test_error_names_the_cell(self):
    path = self._notebook([("code", "a = 1"), ("code", "raise KeyError('k')")])
    with self.assertRaisesRegex(notebook_runner.NotebookError,
                                r"x\.ipynb: code cell 1 .*KeyError"):
      notebook_runner.run_notebook(path, verbose=False)


if __name__ == "__main__":
  absltest.main()
