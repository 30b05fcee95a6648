"""Each invalid config value gives a one-line error naming the field."""

import dataclasses
import json
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from nosa_jax import config as config_lib

REPO = __file__.rsplit("/tests/", 1)[0]


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("unknown_variant", {"model": {"sparse": {"variant": "dense"}}},
       "model.sparse.variant"),
      ("block_not_divisible", {"model": {"sparse": {"block_size": 60}}},
       "model.sparse.block_size"),
      ("heads_not_divisible", {"model": {"num_heads": 6, "num_kv_heads": 4}},
       "model.num_heads"),
      ("nonpositive_lr", {"train": {"learning_rate": 0.0}},
       "train.learning_rate"),
      ("nonpositive_steps", {"train": {"num_steps": 0}}, "train.num_steps"),
      ("budget_below_forced", {"model": {"sparse": {"query_topk_blocks": 10}}},
       "model.sparse.query_topk_blocks"),
      ("topk_below_query_topk", {"model": {"sparse": {"topk_blocks": 20}}},
       "model.sparse.topk_blocks"),
      ("kernel_below_stride", {"model": {"sparse": {"compress_kernel": 8}}},
       "model.sparse.compress_kernel"),
      ("window_too_short_for_pooling_reach",
       {"model": {"sparse": {"window_blocks": 0, "query_topk_blocks": 33}}},
       "model.sparse.window_blocks"),
      ("bad_impl", {"model": {"sparse": {"implementation": "cuda"}}},
       "model.sparse.implementation"),
      ("zero_penalty_fraction",
       {"model": {"sparse": {"locality_sample_fraction": 0.0}}},
       "model.sparse.locality_sample_fraction"),
      ("penalty_fraction_above_one",
       {"model": {"sparse": {"locality_sample_fraction": 1.5}}},
       "model.sparse.locality_sample_fraction"),
      ("penalty_fraction_as_bool",
       {"model": {"sparse": {"locality_sample_fraction": True}}},
       "model.sparse.locality_sample_fraction"),
      ("odd_head_dim", {"model": {"head_dim": 15}}, "model.head_dim"),
      ("bad_dtype", {"model": {"dtype": "fp8"}}, "model.dtype"),
      ("unknown_field", {"train": {"lenght": 3}}, "train.lenght"),
      ("bool_as_int", {"train": {"batch_size": True}}, "train.batch_size"),
      ("int_as_bool", {"model": {"scan_layers": 1}}, "model.scan_layers"),
      ("bad_holdout", {"data": {"holdout_fraction": 0.0}},
       "data.holdout_fraction"),
      ("warmup_too_long", {"train": {"warmup_steps": 100, "num_steps": 50}},
       "train.warmup_steps"),
      ("unknown_rope_type", {"model": {"rope_scaling": {
          "rope_type": "dynamic"}}}, "model.rope_scaling.rope_type"),
      ("longrope_without_factors", {"model": {"rope_scaling": {
          "rope_type": "longrope", "original_max_position_embeddings": 8}}},
       "model.rope_scaling.long_factor"),
      ("factors_for_linear", {"model": {"rope_scaling": {
          "rope_type": "linear", "long_factor": [1.0]}}},
       "model.rope_scaling.long_factor"),
      ("yarn_without_original", {"model": {"rope_scaling": {
          "rope_type": "yarn", "factor": 4.0}}},
       "model.rope_scaling.original_max_position_embeddings"),
      ("nonpositive_residual_scale", {"model": {"residual_scale": 0.0}},
       "model.residual_scale"),
      ("bias_as_int", {"model": {"attention_bias": 1}},
       "model.attention_bias"),
  )
  def test_invalid_value_names_field(self, overrides, field):
    with self.assertRaises(config_lib.ConfigError) as cm:
      config_lib.ExperimentConfig.from_dict(overrides)
    msg = str(cm.exception)
    self.assertStartsWith(msg, field)
    self.assertNotIn("\n", msg)

  def test_defaults_are_the_paper_constants(self):
    s = config_lib.SparseConfig()
    self.assertEqual(
        (s.block_size, s.compress_kernel, s.compress_stride, s.topk_blocks,
         s.query_topk_blocks, s.sink_blocks, s.window_blocks,
         s.locality_weight, s.locality_sample_fraction),
        (64, 32, 16, 64, 33, 1, 16, 0.0, 1.0))

  def test_penalty_fraction_may_change_on_resume(self):
    # It changes the noise of the penalty's estimate, not its expectation
    # nor any shape; the weight changes the objective and stays fixed.
    changes = {"model.sparse.locality_sample_fraction": (1.0, 0.04),
               "model.sparse.locality_weight": (0.0, 0.1)}
    self.assertEqual(config_lib.resume_conflicts(changes),
                     ["model.sparse.locality_weight"])

  def test_variant_predicates(self):
    # (is_sparse, query_aware, has_eviction_head) of each variant (§2.5).
    want = {"full": (False, False, False), "infllmv2": (True, True, False),
            "dma": (True, False, True), "nosa": (True, True, True)}
    self.assertEqual(set(want), set(config_lib.VARIANTS))
    for variant, flags in want.items():
      sp = config_lib.SparseConfig(variant=variant)
      self.assertEqual((sp.is_sparse, sp.query_aware, sp.has_eviction_head),
                       flags, variant)

  def test_rope_scaling_json_round_trip(self):
    # A workdir's config.json stores the factors as lists; they come back
    # as the tuples of a hashable config.
    cfg = config_lib.ExperimentConfig.from_dict({"model": {
        "attention_bias": True, "embed_scale": 12.0, "rope_scaling": {
            "rope_type": "longrope", "short_factor": [1.0, 2.0],
            "long_factor": [3.0, 4.0], "long_factor_above": 16,
            "original_max_position_embeddings": 16}}})
    again = config_lib.ExperimentConfig.from_dict(
        json.loads(json.dumps(dataclasses.asdict(cfg))))
    self.assertEqual(again, cfg)
    self.assertEqual(hash(again.model), hash(cfg.model))

  def test_configs_are_hashable_static_args(self):
    cfg = config_lib.ExperimentConfig.from_dict({})
    self.assertEqual(hash(cfg.model), hash(config_lib.ModelConfig()))

  def test_entry_point_prints_one_line_not_a_traceback(self):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain",
         "--config=configs/tiny.py", "--workdir=/tmp/unused",
         "--config.model.sparse.variant=dense"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    self.assertNotEqual(proc.returncode, 0)
    self.assertNotIn("Traceback", proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    self.assertEqual(
        last, "config error: model.sparse.variant='dense' is invalid: must "
        "be one of full, infllmv2, dma, nosa")


if __name__ == "__main__":
  absltest.main()
