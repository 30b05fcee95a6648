"""configs/recall.py, experiments/study.py and experiments/recall_study.py."""

import json
import os
from unittest import mock

from absl.testing import absltest
import numpy as np
import pytest

from configs import recall as recall_config
from experiments import study
from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import evaluation
from nosa_jax import model
from nosa_jax import recall
from tests import entry_points

BUCKETS = [n for n, _ in recall.BUCKETS]


def _unit(name, seed, *, nll=1.0, rec=0.95, gamma=0.9):
  variant = name.split("_loc")[0]
  weight = float(name.split("_loc")[1]) if "_loc" in name else 0.0
  return {
      "unit": {"name": name, "variant": variant, "locality_weight": weight,
               "seed": seed},
      "perplexity": {"nll": nll},
      "recall": {"beyond_window": rec, "beyond_window_answer_nll": 0.5,
                 "accuracy": {b: rec for b in BUCKETS}},
      "gamma": (None if variant == "full" else
                {"mean": gamma, "per_layer": [gamma - 0.01, gamma + 0.01]}),
      "passkey": {"overall": 0.5}, "train_tok_s": 1000.0 + seed,
      "tokens": 1024, "context": 256,
      "stamp": {"device": "H100", "commit": "abc1234"}}


def _write(units, d):
  for u in units:
    unit = study.Unit(**u["unit"])
    with open(os.path.join(d, unit.result_file), "w") as f:
      json.dump(u, f)


class UnitsTest(absltest.TestCase):

  def test_plan_is_seed_major(self):
    keys = [u.key for u in study.plan_units("full:2,nosa:1,nosa_loc0.1:2")]
    self.assertEqual(keys, ["full_s0", "nosa_s0", "nosa_loc0.1_s0",
                            "full_s1", "nosa_loc0.1_s1"])
    units = study.parse_units("full@0, nosa_loc0.03@2")
    self.assertEqual(units[1], study.Unit("nosa_loc0.03", "nosa", 0.03, 2))
    self.assertEqual(units[1].result_file, "unit_nosa_loc0.03_s2.json")
    for bad, call in (("full:0", study.plan_units),
                      ("nosa:x", study.plan_units),
                      ("full_loc0.1:2", study.plan_units),
                      ("nosa", study.parse_units)):
      with self.assertRaises(config_lib.ConfigError, msg=bad):
        call(bad)

  def test_the_configs_plan(self):
    units = study.plan_units(recall_config.PLAN)
    self.assertEqual(units[0].key, "full_s0")  # the gate runs first
    seeds = {}
    for u in units:
      seeds[u.name] = seeds.get(u.name, 0) + 1
    for name in ("full", "nosa", "nosa_loc0.1"):
      self.assertGreaterEqual(seeds[name], 3)
    for name in ("infllmv2", "dma"):
      self.assertGreaterEqual(seeds[name], 2)
    sweep = {u.locality_weight for u in units if u.variant == "nosa"}
    self.assertEqual(sweep, {0.0, 0.03, 0.1, 0.3})

  def test_configs(self):
    for arg in ("", "runlocal"):
      d = recall_config.get_config(arg).to_dict()
      spec, ecfg = d.pop("study"), study.eval_config(d.pop("eval"))
      cfg = config_lib.ExperimentConfig.from_dict(d)
      self.assertGreater(cfg.data.recall_fraction, 0)
      self.assertGreater(ecfg.recall_trials, 0)
      self.assertNotEmpty(study.plan_units(spec["plan"]))
      n = model.count_params(model.abstract_params(cfg.model)[1])
      if arg:
        self.assertLessEqual(cfg.train.seq_len, 256)
        self.assertLess(n, 2e5)
      else:
        self.assertBetween(n, 20e6, 30e6)
        self.assertEqual(spec["gate"], 0.9)
        self.assertEqual(cfg.train.seq_len, 8192)
        # Seeds change only the seed: the same tokens for every variant.
        a = study.variant_config(d, "full", 0.0, seed=2)
        b = study.variant_config(d, "nosa", 0.1, seed=2)
        self.assertEqual((a.train, a.data), (b.train, b.data))
        self.assertEqual(a.train.seed, 2)


  def test_gate_probe_config(self):
    d = recall_config.get_config("gate_probe").to_dict()
    spec, _ = d.pop("study"), d.pop("eval")
    self.assertEqual([u.key for u in study.plan_units(spec["plan"])],
                     ["full_s0"])
    cfg = config_lib.ExperimentConfig.from_dict(d)
    self.assertGreater(cfg.train.num_steps, 1500)
    self.assertGreater(cfg.data.recall_segment_tokens, 0)
    self.assertEqual(cfg.data.passkey_fraction + cfg.data.recall_fraction,
                     1.0)

  def test_real_config_buckets(self):
    # The device config's geometry: every bucket but "window" lies beyond
    # the forced blocks, each ctx_ bucket at its share of the context
    # (numpy only: a perfect predictor, so only the geometry is computed).
    d = recall_config.get_config().to_dict()
    cfg = config_lib.ExperimentConfig.from_dict(
        {k: v for k, v in d.items() if k not in ("eval", "study")})
    ctx = cfg.train.seq_len
    res = evaluation.recall_by_distance(
        lambda t: (np.roll(t, -1, axis=1), np.zeros(t.shape)),
        data.ByteTokenizer(), np.arange(50_000) % 90 + 32, context=ctx,
        trials=2, distractors=4, seed=1, batch_size=2, sparse=cfg.model.sparse)
    self.assertEqual(res["outside_forced"],
                     {b: float(b != "window") for b in BUCKETS})
    self.assertEqual(res["beyond_window"], 1.0)
    for b, share in (("ctx_1/4", 0.25), ("ctx_1/2", 0.5), ("ctx_1", 1.0),
                     ("ctx_2x", 2.0)):
      self.assertAlmostEqual(res["distance"][b] / ctx, share, delta=0.01)


class ClaimsTest(absltest.TestCase):

  def test_dense_gate_stops_the_comparison(self):
    s = study.summarize([_unit("full", 0, rec=0.5), _unit("full", 1, rec=0.6),
                         _unit("nosa", 0)])
    verdict, found = study.claims(s, 0.9)
    self.assertEqual(
        verdict, "the dense baseline does not retrieve (0.550 < 0.90 held-out "
        "recall beyond the window, mean of 2 seed(s)): the comparison stops "
        "here")
    self.assertEqual(found, {})
    self.assertIsNone(study.dense_gate(study.summarize([_unit("nosa", 0)]),
                                       0.9)[0])

  def test_claims_from_the_spread(self):
    units = [
        _unit("full", 0, nll=1.00, rec=0.95), _unit("full", 1, nll=1.01,
                                                    rec=0.97),
        _unit("nosa", 0, nll=1.005, rec=0.94, gamma=0.90),
        _unit("nosa", 1, nll=1.01, rec=0.96, gamma=0.92),
        _unit("infllmv2", 0, gamma=0.80), _unit("infllmv2", 1, gamma=0.85),
        _unit("dma", 0, rec=0.97), _unit("dma", 1, rec=0.99),
        _unit("nosa_loc0.1", 0, rec=0.99)]
    s = study.summarize(units)
    self.assertEqual(s["variants"]["nosa"]["heldout_nll"], [1.005, 1.01])
    self.assertEqual(s["variants"]["full"]["decode_gamma"], [None, None])
    verdict, found = study.claims(s, 0.9)
    self.assertTrue(verdict.startswith("the dense baseline retrieves (0.960"))
    status = {k: c["status"] for k, c in found.items()}
    self.assertEqual(status, {
        "nosa_nll_within_2pct_of_full": "holding",
        "nosa_recall_within_5pts_of_full": "holding",
        "nosa_gamma_above_infllmv2": "holding",
        "dma_retrieves_less_than_nosa": "not holding",
        "penalty_lifts_recall": "inconclusive"})  # one seed
    # Ranges that straddle the line.
    s = study.summarize(units[:2] + [
        _unit("nosa", 0, nll=1.0), _unit("nosa", 1, nll=1.05)])
    self.assertEqual(study.claims(s, 0.9)[1][
        "nosa_nll_within_2pct_of_full"]["status"], "inconclusive")

  def test_merge_writes_the_schema_tables_and_plots(self):
    d = self.create_tempdir().full_path
    out = os.path.join(d, "summary")
    units = [_unit("full", 0), _unit("full", 1), _unit("nosa", 0),
             _unit("nosa_loc0.1", 0, gamma=0.95), _unit("nosa_loc0.3", 1)]
    units[0]["dense_check"] = {"trials": 8, "beyond_window": {
        "trained_path": 0.5, "xla_fp32": 0.625}}
    units[1]["dense_check"] = {"error": "XlaRuntimeError: out of memory"}
    _write(units, d)
    with open(os.path.join(d, study.PENALTY_FILE), "w") as f:
      json.dump({"weight": 0.1, "overhead": 0.25, "steps": 10,
                 "step_seconds": {"nosa": 1.0, "nosa_loc0.1": 1.25},
                 "stamp": {"device": "H100"}}, f)
    verdict = study.merge([d], out, 0.9)
    self.assertTrue(verdict.startswith("the dense baseline retrieves"))
    with open(os.path.join(out, "summary.json")) as f:
      summary = json.load(f)
    self.assertEqual(set(summary), {"tokens", "context", "device", "commit",
                                    "variants"})
    self.assertEqual((summary["tokens"], summary["context"],
                      summary["device"], summary["commit"]),
                     (1024, 256, "H100", "abc1234"))
    self.assertEqual(summary["variants"]["full"], {
        "seeds": [0, 1], "heldout_nll": [1.0, 1.0],
        "recall_beyond_window": [0.95, 0.95], "decode_gamma": [None, None],
        "train_tok_s": [1000.0, 1001.0]})
    with open(os.path.join(out, "study.json")) as f:
      detail = json.load(f)
    self.assertEqual(detail["variants"]["nosa_loc0.1"]["recall_by_bucket"][
        "ctx_2x"], [0.95])
    with open(os.path.join(out, "summary.md")) as f:
      md = f.read()
    self.assertIn("| nosa_loc0.3 | 1 |", md)
    self.assertIn("Verdict: the dense baseline retrieves", md)
    self.assertIn("the first 8 documents per bucket): seed 0: as trained "
                  "0.500, XLA fp32 0.625.", md)
    self.assertIn("Locality penalty (weight 0.1): +25.0% of nosa's step "
                  "time, one process on H100: not holding against <= 10%.",
                  md)
    self.assertEqual(detail["penalty_overhead"]["overhead"], 0.25)
    self.assertEqual(detail["claims"]["penalty_lifts_passkey"]["status"],
                     "inconclusive")  # one seed of each
    for png in ("recall.png", "sweep.png"):
      with open(os.path.join(out, png), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    # A second directory's units are merged; the first directory's win.
    d2 = self.create_tempdir().full_path
    _write([_unit("full", 1, nll=9.0), _unit("dma", 0)], d2)
    found = study.finished([d, d2])
    self.assertEqual(found["full_s1"], os.path.join(d, "unit_full_s1.json"))
    self.assertIn("dma_s0", found)
    self.assertEqual(study.summarize(study.load_units([d, d2]))["variants"][
        "full"]["heldout_nll"], [1.0, 1.0])


class PenaltyOverheadTest(absltest.TestCase):

  def test_times_nosa_then_the_sampled_and_the_exact_penalty(self):
    d = recall_config.get_config().to_dict()
    d.pop("study"), d.pop("eval")
    seconds = {(0.0, 1.0): 1.0, (0.1, 0.04): 1.05, (0.1, 1.0): 2.0}
    seen = []

    def fake_measure(cfg, steps):
      sp = cfg.model.sparse
      seen.append((sp.variant, sp.locality_weight,
                   sp.locality_sample_fraction, steps))
      return seconds[seen[-1][1:3]]

    with mock.patch.object(study, "measure_step_seconds", fake_measure):
      res = study.penalty_overhead(d, steps=3)
      self.assertEqual(seen, [("nosa", 0.0, 1.0, 3), ("nosa", 0.1, 0.04, 3),
                              ("nosa", 0.1, 1.0, 3)])
      self.assertEqual(res["step_seconds"], {
          "nosa": 1.0, "nosa_loc0.1": 1.05, "nosa_loc0.1_exact": 2.0})
      self.assertAlmostEqual(res["overhead"], 0.05)
      self.assertAlmostEqual(res["overhead_exact"], 1.0)
      self.assertEqual(res["sample_fraction"], 0.04)
      self.assertEqual(
          study.penalty_line(dict(res, stamp={"device": "H100"})),
          "Locality penalty (weight 0.1, sampled at fraction 0.04): +5.0% "
          "of nosa's step time (exact penalty: +100.0%), one process on "
          "H100: holding against <= 10%.")
      # A config with the exact penalty times it once.
      d["model"]["sparse"]["locality_sample_fraction"] = 1.0
      seen.clear()
      res = study.penalty_overhead(d, steps=3)
    self.assertEqual(len(seen), 2)
    self.assertEqual(res["overhead"], res["overhead_exact"])


class RecallStudyTest(absltest.TestCase):

  def _run(self, *args, timeout=400):
    return entry_points.run("recall_study", *args, timeout=timeout)

  @pytest.mark.slow  # ~1-2 min on 2 cores
  def test_runlocal_resumes_skips_and_merges(self):
    out = self.create_tempdir().full_path
    work = self.create_tempdir().full_path
    # A unit cut short: 4 of its 8 steps (checkpointed), then the full run
    # resumes it from step 4.
    run = self._run("--config=configs/recall.py:runlocal",
                    "--config.train.num_steps=4", "--units=nosa@1",
                    "--penalty_overhead",
                    f"--out_dir={out}", f"--work_dir={work}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    os.remove(os.path.join(out, "unit_nosa_s1.json"))
    run = self._run("--runlocal", f"--out_dir={out}", f"--work_dir={work}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertIn("Resumed from step 4", run.stderr)
    names = sorted(os.listdir(out))
    self.assertEqual(names, [
        "penalty_overhead.json", "recall.png", "study.json", "summary.json",
        "summary.md",
        "sweep.png", "unit_full_s0.json", "unit_nosa_loc0.1_s0.json",
        "unit_nosa_s0.json", "unit_nosa_s1.json"])
    with open(os.path.join(out, "summary.json")) as f:
      summary = json.load(f)
    self.assertEqual(summary["variants"]["nosa"]["seeds"], [0, 1])
    self.assertEqual(summary["tokens"], 8 * 4 * 256)
    for v in summary["variants"].values():
      self.assertTrue(np.all(np.isfinite(v["heldout_nll"])))
      self.assertTrue(all(0 <= r <= 1 for r in v["recall_beyond_window"]))
    with open(os.path.join(out, "unit_nosa_s1.json")) as f:
      unit = json.load(f)
    self.assertEqual(unit["step"], 8)
    self.assertEqual(unit["recall"]["buckets"], BUCKETS)
    with open(os.path.join(out, "unit_full_s0.json")) as f:
      check = json.load(f)["dense_check"]
    # On the CPU the model is fp32 and XLA's: both paths are one path.
    self.assertEqual(check["accuracy"]["trained_path"],
                     check["accuracy"]["xla_fp32"])
    with open(os.path.join(out, "summary.md")) as f:
      md = f.read()
    self.assertIn("Dense path check", md)
    self.assertIn("Locality penalty (weight 0.1): ", md)
    # Rerun: everything is done, nothing trains; the merge is rebuilt.
    os.remove(os.path.join(out, "summary.md"))
    run = self._run("--runlocal", f"--out_dir={out}", f"--work_dir={work}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertEqual(run.stderr.count("done, skipped"), 4)
    self.assertNotIn("training", run.stderr)
    self.assertTrue(os.path.exists(os.path.join(out, "summary.md")))

  def test_dense_gate_stops_before_sparse_units(self):
    out = self.create_tempdir().full_path
    _write([_unit("full", 0, rec=0.2)], out)
    run = self._run("--config=configs/recall.py:runlocal",
                    "--config.study.gate=0.9", f"--out_dir={out}",
                    f"--work_dir={self.create_tempdir().full_path}",
                    timeout=120)
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertIn("the comparison stops here; nosa_s0 not run", run.stderr)
    self.assertIn("Verdict: the dense baseline does not retrieve", run.stdout)
    self.assertFalse(os.path.exists(os.path.join(out, "unit_nosa_s0.json")))

  def test_bad_units_is_one_line(self):
    run = self._run("--runlocal", "--units=nosa", "--out_dir=/nonexistent",
                    timeout=120)
    self.assertEqual(run.returncode, 1)
    self.assertEqual(run.stderr.strip().splitlines()[-1],
                     "config error: units='nosa' is invalid: 'nosa' must be "
                     "name@seed, e.g. nosa@1")


if __name__ == "__main__":
  absltest.main()
