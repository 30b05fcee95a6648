"""Tests for nosa_jax.evaluation and the experiments.evaluate CLI."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from configs import tiny as tiny_config

from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax.inference import engine
from nosa_jax import evaluation
from nosa_jax import hf_io
from nosa_jax import passkey
from nosa_jax import recall
from nosa_jax import testing
from nosa_jax import train
from tests import tolerances

REPO = __file__.rsplit("/tests/", 1)[0]
BYTES = data.ByteTokenizer()


def _oracle(tokens_BT):
  """A perfect retriever: predicts the actual next token everywhere."""
  return np.roll(tokens_BT, -1, axis=1), np.zeros(tokens_BT.shape)


def _blind(tokens_BT):
  """Predicts token 0 with a uniform distribution over the 10 digits."""
  return np.zeros_like(tokens_BT), np.full(tokens_BT.shape, np.log(10))


class PasskeyScoringTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.examples = passkey.make_examples(BYTES, [160, 200], [0.2, 0.8], 3)
    self.digits = evaluation.digit_token_mask(BYTES, BYTES.vocab_size)

  def _score(self, predict, **kw):
    return evaluation.score_passkey(
        predict, self.examples, batch_size=4, pad_id=BYTES.pad_id,
        pad_multiple=16, digit_mask=self.digits, **kw)

  def test_oracle_scores_one_and_blind_model_zero(self):
    self.assertTrue(all(s["correct"] for s in self._score(_oracle)))
    blind = self._score(_blind)
    self.assertFalse(any(s["correct"] for s in blind))
    self.assertEqual({s["token_accuracy"] for s in blind}, {0.0})

  def test_one_wrong_digit_or_an_extra_digit_is_a_miss(self):
    def wrong_last(tokens_BT):
      pred, nll = _oracle(tokens_BT)
      for row, toks in zip(pred, tokens_BT, strict=True):
        n = int(np.sum(toks != BYTES.pad_id))  # length L of the document
        if n:  # position L - 2 predicts the answer's last digit
          row[n - 2] = ord("0") if row[n - 2] != ord("0") else ord("1")
      return pred, nll

    def extra_digit(tokens_BT):
      pred, nll = _oracle(tokens_BT)
      for row, toks in zip(pred, tokens_BT, strict=True):
        n = int(np.sum(toks != BYTES.pad_id))
        if n:  # position L - 1 follows the answer: "7" continues the number
          row[n - 1] = ord("7")
      return pred, nll

    for fn in (wrong_last, extra_digit):
      scores = self._score(fn)
      self.assertFalse(any(s["correct"] for s in scores), fn.__name__)
    self.assertEqual({s["token_accuracy"] for s in self._score(wrong_last)},
                     {5 / 6})
    self.assertEqual({s["token_accuracy"] for s in self._score(extra_digit)},
                     {1.0})

  def test_padding_and_batching_do_not_change_scores(self):
    shapes = []

    def record(tokens_BT):
      shapes.append(tokens_BT.shape)
      return _oracle(tokens_BT)

    self._score(record)
    # 6 examples per length in batches of 4 -> 2 calls per length, all
    # padded to 4 rows and to whole 16-token blocks.
    self.assertEqual(sorted(shapes), [(4, 160)] * 2 + [(4, 208)] * 2)

  def test_passkey_accuracy_grid(self):
    kw = dict(lengths=[160, 300], depths=[0.1, 0.5, 0.9], trials=2,
              batch_size=3, sparse=testing.TINY_SPARSE)
    good = evaluation.passkey_accuracy(_oracle, BYTES, **kw)
    self.assertEqual(good["overall"], 1.0)
    self.assertEqual(np.shape(good["accuracy"]), (2, 3))
    bad = evaluation.passkey_accuracy(_blind, BYTES, **kw)
    self.assertEqual(bad["overall"], 0.0)
    self.assertEqual(good["overall_answer_nll"], 0.0)
    self.assertAlmostEqual(bad["overall_answer_nll"], np.log(10))
    # Shallow needles in the longer context lie outside sink + window.
    self.assertEqual(good["outside_forced"][1][0], 1.0)
    self.assertEqual(good["outside_forced"][0][2], 0.0)
    dist = np.array(good["distance"])
    self.assertTrue(np.all(np.diff(dist[1]) < 0))
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"passkey_lengths=\(100,\) is invalid"):
      evaluation.passkey_accuracy(_oracle, BYTES, **dict(kw, lengths=[100]))


class RecallByDistanceTest(absltest.TestCase):

  def test_oracle_blind_and_geometry(self):
    haystack = (np.arange(5000) % 90 + 32).astype(np.int32)
    kw = dict(context=256, trials=3, distractors=2, seed=1, batch_size=4,
              sparse=testing.TINY_SPARSE)
    good = evaluation.recall_by_distance(_oracle, BYTES, haystack, **kw)
    bad = evaluation.recall_by_distance(_blind, BYTES, haystack, **kw)
    json.dumps(good)
    names = [n for n, _ in recall.BUCKETS]
    self.assertEqual(good["buckets"], names)
    self.assertEqual(set(good["accuracy"].values()), {1.0})
    self.assertEqual(set(bad["accuracy"].values()), {0.0})
    self.assertEqual((good["beyond_window"], bad["beyond_window"]),
                     (1.0, 0.0))
    self.assertAlmostEqual(bad["beyond_window_answer_nll"], np.log(10))
    self.assertEqual(good["outside_forced"],
                     {n: float(n != "window") for n in names})
    self.assertEqual(good["length"]["ctx_2x"], 512.0)
    dist = [good["distance"][n] for n in names]
    self.assertEqual(dist, sorted(dist))
    self.assertGreater(dist[-1], 256)


class EvalConfigTest(absltest.TestCase):

  def test_errors_name_the_field(self):
    for kwargs, msg in [
        (dict(passkey_depths=(0.5, 1.5)),
         r"passkey_depths=\(0.5, 1.5\) is invalid: must be one or more "
         r"numbers in \[0, 1\]"),
        (dict(passkey_lengths=(0, 5)),
         r"passkey_lengths=\(0, 5\) is invalid: must be positive"),
        (dict(gamma_new_tokens=0), "gamma_new_tokens=0 is invalid"),
        (dict(passkey_trials=-1), "passkey_trials=-1 is invalid")]:
      with self.assertRaisesRegex(config_lib.ConfigError, msg):
        evaluation.EvalConfig(**kwargs)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"passkey_lengths='2k' is invalid"):
      evaluation.parse_list("passkey_lengths", "2k", int)
    self.assertEqual(evaluation.parse_list("x", "1, 2,", int), (1, 2))


class EvaluateTest(absltest.TestCase):
  """One tiny dense run (3 steps) shared by the library and CLI tests.

  Dense training is the cheapest to compile; `infllmv2` has the same
  parameters, so the run is also evaluated as a sparse model (a config
  override the evaluation allows), which exercises selection and gamma.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.workdir = os.path.join(cls.root, "run")
    cls.cache = os.path.join(cls.root, "cache")
    cls.cfg = _tiny_cfg("full", cls.cache)
    train.train_and_evaluate(cls.cfg, cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_library(self):
    cfg, params, step = evaluation.load_model(workdir=self.workdir)
    self.assertEqual((cfg, step), (self.cfg, 3))
    dense = evaluation.evaluate(params, cfg, evaluation.EvalConfig(
        passkey_lengths=(160,), passkey_depths=(0.5,), passkey_trials=2,
        recall_trials=1, recall_distractors=1))
    json.dumps(dense)  # JSON-ready
    # Default windows and batches: the trainer's own eval/loss at step 3.
    curves = evaluation.read_scalars(os.path.join(self.workdir,
                                                  "tensorboard"))
    self.assertEqual([s for s, _ in curves["eval/loss"]], [0, 3])
    np.testing.assert_allclose(dense["perplexity"]["nll"],
                               curves["eval/loss"][-1][1],
                               **tolerances.tol(np.float32))
    self.assertEqual(dense["passkey"]["accuracy"], [[0.0]])  # untrained
    self.assertIsNone(dense["gamma"])  # `full` selects nothing
    self.assertBetween(dense["recall"]["beyond_window"], 0.0, 1.0)
    self.assertEqual(dense["recall"]["length"]["ctx_2x"], 2 * cfg.train.seq_len)
    # Default passkey lengths (seq_len / 2, seq_len) shorter than the
    # passkey text are dropped (here both: skipped), not an error.
    short = evaluation.evaluate(params, cfg, evaluation.EvalConfig(
        seq_len=128, passkey_trials=1, gamma_prompts=0))
    self.assertIsNone(short["passkey"])

    # Teacher forcing == greedy decoding, with the real decode engine: an
    # answer that is the model's own greedy continuation scores correct;
    # changing its last token makes it a miss.
    ds = data.load_datasets(cfg.data, 160, 0)
    prompts = evaluation.heldout_prompts(ds.eval, 2, 154)
    greedy = engine.generate(params, cfg.model, prompts, 6)
    examples = []
    for prompt, cont in zip(prompts, greedy, strict=True):
      cont = np.array(cont)
      if examples:
        cont[-1] = (cont[-1] + 1) % 256
      examples.append(passkey.PasskeyExample(
          tokens=np.array(prompt + cont.tolist(), np.int32),
          answer_start=len(prompt), needle_start=0, needle_end=1, key="",
          depth=0.0))
    got = evaluation.score_passkey(
        evaluation.greedy_predict_fn(params, cfg.model), examples,
        batch_size=4, pad_id=BYTES.pad_id, pad_multiple=16)
    self.assertEqual([g["correct"] for g in got], [True, False])
    # The NLL is read at the answer positions: only the last token differs,
    # and the greedy one is the most likely.
    self.assertLess(got[0]["answer_nll"], got[1]["answer_nll"])

    # `infllmv2` has the dense parameters: evaluated as a sparse model.
    sparse_cfg, params, _ = evaluation.load_model(
        workdir=self.workdir, cfg=_tiny_cfg("infllmv2", self.cache))
    res = evaluation.evaluate(params, sparse_cfg, evaluation.EvalConfig(
        eval_batches=1, passkey_trials=0, gamma_prompts=2,
        gamma_new_tokens=4))
    self.assertEqual(res["model"]["variant"], "infllmv2")
    self.assertIsNone(res["passkey"])
    self.assertLen(res["gamma"]["per_layer"], 2)
    self.assertTrue(all(0.0 <= g <= 1.0 for g in res["gamma"]["per_layer"]))
    self.assertEqual(res["gamma"]["prompt_len"], 156)
    pred = res["gamma"]["next_layer_prediction"]
    self.assertEqual(pred["steps"], 2)  # 4 new tokens: 3 steps, 2 diffs
    self.assertLen(pred["misses_per_layer"], 2)
    self.assertLen(pred["extra_per_step_per_layer"], 2)
    for c in pred["coverage_per_layer"]:
      self.assertTrue(c is None or 0.0 <= c <= 1.0)
    json.dumps(res)  # JSON-ready
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "differ from the checkpoint's"):
      evaluation.load_model(workdir=self.workdir,
                            cfg=_tiny_cfg("nosa", self.cache))

    # An HF export loads back with its model config and the run's data.
    hf_dir = self.create_tempdir().full_path
    hf_io.export_hf(params, cfg.model, hf_dir, "float32")
    hf_cfg, hf_params, hf_step = evaluation.load_model(hf_dir=hf_dir, cfg=cfg)
    self.assertEqual((hf_cfg, hf_step), (cfg, 0))
    for x, y in zip(jax.tree.leaves(hf_params), jax.tree.leaves(params),
                    strict=True):
      np.testing.assert_array_equal(x, y)
    # Other selection constants than the export's, reported.
    report = []
    other = dataclasses.replace(cfg.model.sparse, topk_blocks=6,
                                query_topk_blocks=5)
    hf_cfg, _, _ = evaluation.load_model(hf_dir=hf_dir, cfg=cfg,
                                         hf_sparse=other, report=report)
    self.assertEqual(hf_cfg.model.sparse, other)
    self.assertIn("overridden: sparse", report)

  def _run(self, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.evaluate",
                           *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)

  def test_cli_end_to_end(self):
    out = os.path.join(self.create_tempdir().full_path, "e.json")
    run = self._run(
        f"--workdir={self.workdir}", f"--out_json={out}",
        "--passkey_lengths=192", "--passkey_depths=0.2,0.8",
        "--passkey_trials=1", "--eval_batches=1")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertIn(f"wrote {out}", run.stdout)
    with open(out) as f:
      res = json.load(f)
    self.assertEqual(res["source"]["step"], 3)
    self.assertEqual(res["passkey"]["lengths"], [192])
    self.assertEqual(res["perplexity"]["batches"], 1)
    self.assertIn("exceed the training seq_len 160", run.stderr)
    tb = evaluation.read_scalars(os.path.join(self.workdir, "tensorboard",
                                              "eval"))
    self.assertEqual(tb["passkey/len_192/depth_0.20"], [(3, 0.0)])
    self.assertEqual(tb["eval/nll"], [(3, res["perplexity"]["nll"])])

  # A bad flag value's one line: cli_test's test_evaluate (one process runs
  # all of evaluate's bad inputs).


def _tiny_cfg(variant, cache):
  """configs/tiny.py:runlocal (what the CLI test passes), 3 short steps."""
  d = tiny_config.get_config(f"runlocal,variant={variant}").to_dict()
  d["data"]["cache_dir"] = cache
  d["train"].update(seq_len=160, num_steps=3, warmup_steps=1, log_every=3,
                    eval_every=3, eval_batches=2, checkpoint_every=0)
  return config_lib.ExperimentConfig.from_dict(d)


if __name__ == "__main__":
  absltest.main()
