"""Training loop: resume == uninterrupted, divergence stops, kill -9 safety."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import jax
import pytest
import numpy as np

from tensorboard.backend.event_processing import event_file_loader

from nosa_jax import analysis
from nosa_jax import checkpoint
from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import evaluation
from nosa_jax import hf_io
from nosa_jax import testing
from nosa_jax import train

REPO = __file__.rsplit("/tests/", 1)[0]


def _final_params(workdir, cfg):
  _, like, _ = train.init_state(cfg)
  state, meta = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints")).restore(None, like)
  return state, meta


def _tensorboard_text(workdir, tag):
  [path] = analysis.event_files(os.path.join(workdir, "tensorboard"))
  for event in event_file_loader.LegacyEventFileLoader(path).Load():
    for v in event.summary.value:
      if v.tag == tag:
        return v.tensor.string_val[0].decode()
  return None


class TrainTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.cache = self.create_tempdir().full_path

  def test_resumed_equals_uninterrupted(self):
    cfg = testing.tiny_config("full", cache_dir=self.cache, num_steps=6,
                              checkpoint_every=0)
    straight = self.create_tempdir().full_path
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(cfg, straight)
    logs = "\n".join(logs.output)
    # The config as resolved (its differences from the defaults), the first
    # loss at step 1 (log_every is 2), the config in TensorBoard.
    self.assertIn("Config (fields that differ from the defaults): "
                  "model.mlp_dim=128, model.sparse.variant='full', ", logs)
    self.assertIn("step 1/6 | loss 5.", logs)
    self.assertIn('"seq_len": 64', _tensorboard_text(straight, "config"))

    resumed = self.create_tempdir().full_path
    b = cfg.train.batch_size
    with testing.training_interrupted_at(3 * b):
      with self.assertRaises(KeyboardInterrupt):
        train.train_and_evaluate(cfg, resumed)
    state3, meta3 = _final_params(resumed, cfg)
    self.assertEqual((int(state3["step"]), meta3["data_position"]), (3, 3 * b))
    # What a save cut short by a kill leaves behind (KillTest, slow, kills
    # a real run) is ignored by the restore.
    ckdir = os.path.join(resumed, "checkpoints")
    os.makedirs(os.path.join(ckdir, "999999.orbax-checkpoint-tmp", "state"))
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(cfg, resumed)
    self.assertIn("Resumed from step 3", "\n".join(logs.output))
    self.assertEqual(checkpoint.Checkpointer(ckdir).latest_step(), 6)
    with open(os.path.join(resumed, "config.json")) as f:  # each start
      self.assertEqual([h["step"] for h in json.load(f)["history"]], [0, 3])

    a, meta_a = _final_params(straight, cfg)
    r, meta_r = _final_params(resumed, cfg)
    self.assertEqual(int(a["step"]), 6)
    self.assertEqual(meta_a["data_position"], meta_r["data_position"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(r), strict=True):
      np.testing.assert_array_equal(x, y)
    # ...and the run really moved: step-6 params differ from step-3 params.
    self.assertFalse(np.array_equal(jax.tree.leaves(a["params"])[0],
                                    jax.tree.leaves(state3["params"])[0]))

    # A damaged newest checkpoint: one line with the cause, set aside, and
    # the run resumes from the step before it to the same result.
    testing.damage_checkpoint(os.path.join(ckdir, "6"))
    with self.assertLogs(level="INFO") as logs:
      train.train_and_evaluate(cfg, resumed)
    logs = "\n".join(logs.output)
    self.assertRegex(logs, r"checkpoint step 6 does not restore \(ValueError: "
                     r"OUT_OF_RANGE: .*\); set aside as "
                     rf"{resumed}/set_aside/6.corrupt, falling back")
    self.assertIn("Resumed from step 3", logs)
    r, _ = _final_params(resumed, cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(r), strict=True):
      np.testing.assert_array_equal(x, y)

    # num_steps at or below the checkpoint's step: nothing to do, no error;
    # the changed (allowed) fields are logged; config.json, which describes
    # the checkpoints, is left as it was.
    fewer = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, num_steps=4, log_every=1))
    with self.assertLogs(level="INFO") as logs:
      self.assertEqual(train.train_and_evaluate(fewer, straight), {})
    self.assertIn("train.log_every 2 -> 1, train.num_steps 6 -> 4",
                  "\n".join(logs.output))
    self.assertIn("Nothing to do: the checkpoint is at step 6",
                  "\n".join(logs.output))
    with open(os.path.join(straight, "config.json")) as f:
      stored = json.load(f)
    self.assertEqual([(h["step"], h["changes"]) for h in stored["history"]],
                     [(0, {})])
    self.assertEqual(stored["train"]["num_steps"], 6)

  def test_resume_refuses_fields_the_checkpoints_fix(self):
    cfg = testing.tiny_config("nosa", cache_dir=self.cache)
    workdir = self.create_tempdir().full_path
    with testing.training_interrupted_at(0), self.assertRaises(
        KeyboardInterrupt):
      train.train_and_evaluate(cfg, workdir)  # a checkpoint of step 0
    with open(os.path.join(workdir, "config.json")) as f:
      stored = f.read()
    changed = dataclasses.replace(
        cfg, model=testing.tiny_model_config("full", num_layers=3),
        train=dataclasses.replace(cfg.train, seq_len=32, grad_clip=0.0,
                                  learning_rate=1e-3))
    with self.assertRaisesRegex(
        config_lib.ResumeRefused,
        r"^cannot resume .* at step 0: model.num_layers 2 -> 3, "
        r"model.sparse.variant 'nosa' -> 'full', train.seq_len 64 -> 32, "
        r"train.grad_clip 1.0 -> 0.0 differ from its config.json .* start "
        r"fresh with another --workdir"):
      train.train_and_evaluate(changed, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
      self.assertEqual(f.read(), stored)  # not overwritten

  def test_divergence_keeps_a_checkpoint_that_evaluates_finite(self):
    # warmup 1: step 1 has lr 0, step 2 applies lr 1e30; a step or two
    # later the parameters or the loss are inf/nan.
    cfg = testing.tiny_config("full", cache_dir=self.cache, num_steps=8,
                              learning_rate=1e30, warmup_steps=1,
                              log_every=1, checkpoint_every=1, grad_clip=0.0)
    workdir = self.create_tempdir().full_path
    with self.assertRaisesRegex(train.TrainingDiverged,
                                "Last good checkpoint: step") as cm:
      train.train_and_evaluate(cfg, workdir)
    good = cm.exception.first_bad - 1
    self.assertBetween(good, 1, 5)
    # The kept checkpoint is the newest, finite, and evaluates finite.
    run_cfg, params, step = hf_io.load_workdir(workdir)
    self.assertEqual(step, good)
    for x in jax.tree.leaves(params):
      self.assertTrue(np.all(np.isfinite(x)))
    batches = data.eval_batches(data.load_datasets(cfg.data, 64, 0).eval,
                                64, 4, 1)
    nll = evaluation.heldout_perplexity(params, run_cfg.model, batches)
    self.assertTrue(np.isfinite(nll["nll"]), nll)

  def test_rollback_resumes_with_a_scaled_learning_rate(self):
    cfg = testing.tiny_config(
        "full", cache_dir=self.cache, num_steps=4, learning_rate=1e30,
        warmup_steps=1, log_every=1, checkpoint_every=1, grad_clip=0.0,
        on_divergence="rollback", rollback_lr_scale=1e-32, max_rollbacks=1)
    workdir = self.create_tempdir().full_path
    with self.assertLogs(level="WARNING") as logs:
      last = train.train_and_evaluate(cfg, workdir)
    self.assertIn("Rollback 1/1: learning rate 1e+30 -> 0.01",
                  "\n".join(logs.output))
    self.assertTrue(np.isfinite(last["loss"]), last)
    self.assertEqual(checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints")).latest_step(), 4)

  def test_warns_of_a_budget_that_covers_every_block_and_interpret_mode(self):
    cfg = testing.tiny_config("nosa", seq_len=64)  # 4 blocks of 16, top-8
    [dense] = train.config_warnings(cfg)
    self.assertEqual(dense, "model.sparse.variant=nosa selects topk_blocks=8 "
                     "of the 4 block(s) of train.seq_len=64 (block_size 16): "
                     "every block is selected, so attention is exactly dense; "
                     "raise seq_len or lower topk_blocks")
    self.assertEqual(train.config_warnings(testing.tiny_config(
        "nosa", seq_len=256)), [])
    self.assertEqual(train.config_warnings(testing.tiny_config("full")), [])
    pallas = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, sparse=dataclasses.replace(cfg.model.sparse,
                                              implementation="pallas")),
                                 train=dataclasses.replace(cfg.train,
                                                           seq_len=256))
    [slow] = train.config_warnings(pallas)
    self.assertEqual(slow, "model.sparse.implementation=pallas: the Pallas "
                     "kernels run in interpret mode on cpu (correct, but many "
                     "times slower than xla); use xla off the GPU")

  def test_checkpoints_from_the_first_bad_state_are_set_aside(self):
    ok = {"loss": np.float32(2.0), "grad_norm": np.float32(1.0),
          "state_finite": np.bool_(True)}
    nan = dict(ok, loss=np.float32(np.nan))
    # A non-finite loss at step 5 condemns the state it came from (step 4);
    # non-finite parameters after step 5 condemn step 5.
    with self.assertRaises(train.TrainingDiverged) as cm:
      train._check_finite([ok, ok, nan], 5)
    self.assertEqual(cm.exception.first_bad, 4)
    with self.assertRaises(train.TrainingDiverged) as cm:
      train._check_finite([ok, dict(ok, state_finite=np.bool_(False))], 5)
    self.assertEqual(cm.exception.first_bad, 5)

    ckdir = os.path.join(self.create_tempdir().full_path, "checkpoints")
    ckpt = checkpoint.Checkpointer(ckdir, keep=5)
    for step in (2, 4, 5):
      ckpt.save(step, {"x": np.zeros(2)}, {"step": step})
    e = train._set_aside_diverged(train.TrainingDiverged("boom", 4), ckpt)
    self.assertRegex(str(e), r"boom; stopping\. Set aside checkpoint\(s\) "
                     r"4, 5 .*Last good checkpoint: step 2")
    self.assertEqual(ckpt.all_steps(), [2])
    self.assertEqual(sorted(os.listdir(os.path.join(
        os.path.dirname(ckdir), "set_aside"))), ["4.diverged", "5.diverged"])


@pytest.mark.slow  # two CLI runs; TrainTest resumes past a cut-short save
class KillTest(absltest.TestCase):
  """kill -9 mid-run leaves a usable checkpoint; the rerun resumes."""

  def _cmd(self, workdir, cache, steps):
    return [sys.executable, "-m", "experiments.pretrain",
            "--config=configs/tiny.py:runlocal,variant=full",
            f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
            f"--config.train.num_steps={steps}",
            "--config.train.checkpoint_every=1", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.seq_len=64"]

  def test_kill_9_then_resume(self):
    workdir = self.create_tempdir().full_path
    cache = self.create_tempdir().full_path
    ckdir = os.path.join(workdir, "checkpoints")
    proc = subprocess.Popen(self._cmd(workdir, cache, 400), cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Checkpoints are written every step, so a kill lands during a save
    # or between saves, whichever the timing gives.
    while time.time() < deadline:
      steps = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(
          ckdir) else []
      if len(steps) >= 3:
        break
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    self.assertGreaterEqual(len(steps), 3, "no checkpoints before deadline")
    # A save cut short by the kill looks like this; plant one for certain.
    os.makedirs(os.path.join(ckdir, "999999.orbax-checkpoint-tmp", "state"))

    ckpt = checkpoint.Checkpointer(ckdir)
    killed_at = ckpt.latest_step()
    self.assertIsNotNone(killed_at)
    self.assertLess(killed_at, 999999)
    ckpt.close()

    done = subprocess.run(self._cmd(workdir, cache, killed_at + 3), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    self.assertIn(f"Resumed from step {killed_at}", done.stderr)
    self.assertEqual(checkpoint.Checkpointer(ckdir).latest_step(),
                     killed_at + 3)


if __name__ == "__main__":
  absltest.main()
