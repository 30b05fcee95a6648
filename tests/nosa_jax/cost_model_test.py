"""Decode cost model against hand-computed figures (PERFORMANCE.md)."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized

from nosa_jax import config as config_lib
from nosa_jax import cost_model as cm
from nosa_jax import model as model_lib

MIB = 2**20
PAPER = config_lib.SparseConfig(
    variant="nosa", block_size=64, compress_kernel=32, compress_stride=16,
    topk_blocks=64, query_topk_blocks=33, sink_blocks=1, window_blocks=16)
SMALL = config_lib.SparseConfig(
    variant="nosa", block_size=16, compress_kernel=8, compress_stride=4,
    topk_blocks=8, query_topk_blocks=5, sink_blocks=1, window_blocks=2)


def _paper_like(layers, kv_heads, dtype="bfloat16"):
  return config_lib.ModelConfig(
      num_layers=layers, model_dim=1024, num_heads=32, num_kv_heads=kv_heads,
      head_dim=128, mlp_dim=2048, dtype=dtype, sparse=PAPER)


def _small(variant="nosa", tie=False):
  # L=2, M=64, H=4, K=2, D=16, F=192, V=259, fp32: every figure by hand.
  return config_lib.ModelConfig(
      num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=192, vocab_size=259, tie_embeddings=tie, dtype="float32",
      sparse=dataclasses.replace(SMALL, variant=variant))


class SizesTest(parameterized.TestCase):

  def test_selected_kv_bytes_performance_md(self):
    # "64 MiB for a 16-layer, 2-KV-head model; 512 MiB for 32 layers, 8".
    self.assertEqual(cm.selected_kv_bytes(_paper_like(16, 2)), 64 * MIB)
    self.assertEqual(cm.selected_kv_bytes(_paper_like(32, 8)), 512 * MIB)

  def test_selected_kv_bytes_dtype_and_budget(self):
    self.assertEqual(cm.selected_kv_bytes(_paper_like(16, 2, "float32")),
                     128 * MIB)
    self.assertEqual(cm.selected_kv_bytes(_paper_like(16, 2), 32), 32 * MIB)

  def test_pcie_bytes_per_step(self):
    cfg = _paper_like(16, 2)
    self.assertEqual(cm.pcie_bytes_per_step(cfg, 4, 0.75), 64 * MIB)
    self.assertEqual(cm.pcie_bytes_per_step(cfg, 1, 1.0), 0.0)
    # A 1,000-token context has 16 blocks of 64, so only 16 can be missing.
    self.assertEqual(cm.pcie_bytes_per_step(cfg, 1, 0.0, context_len=1000),
                     16 * MIB)

  def test_paper_gammas_halve_the_traffic(self):
    # PERFORMANCE.md: gamma 0.944 (NOSA) vs 0.889 (InfLLMv2), half the bytes.
    cfg = _paper_like(16, 2)
    ratio = (cm.pcie_bytes_per_step(cfg, 8, 0.944)
             / cm.pcie_bytes_per_step(cfg, 8, 0.889))
    self.assertAlmostEqual(ratio, 0.056 / 0.111)

  @parameterized.parameters(("full", False, False), ("infllmv2", True, True),
                            ("dma", False, True), ("nosa", True, False),
                            ("nosa", False, True))
  def test_num_params_matches_model(self, variant, tie, biases):
    cfg = dataclasses.replace(_small(variant, tie), attention_bias=biases,
                              mlp_bias=biases)
    _, params = model_lib.abstract_params(cfg)
    self.assertEqual(cm.num_params(cfg), model_lib.count_params(params))

  def test_num_params_by_hand(self):
    # attn 2*64*4*16 + 2*64*2*16 + A 2 + delta 32*2; MLP 3*64*192; norms 128.
    layer = 12288 + 2 + 64 + 36864 + 128
    self.assertEqual(cm.num_params(_small()), 2 * layer + 2 * 259 * 64 + 64)
    # The untied embedding is a gather, not read whole; the LM head is.
    self.assertEqual(cm.weight_bytes_read(_small()),
                     (2 * layer + 259 * 64 + 64) * 4)
    self.assertEqual(cm.weight_bytes_read(_small(tie=True)),
                     cm.weight_bytes(_small(tie=True)))

  def test_memory_per_sequence(self):
    cfg = _small()
    # 100 tokens -> 112 (7 blocks of 16); W = (112 - 8) // 4 + 1 = 27.
    dense = 2 * 2 * 112 * 2 * 16 * 4
    self.assertEqual(cm.gpu_bytes_per_sequence(cfg, 100, "full"), dense)
    state = 2 * 2 * (112 * 4 + 27 * 4 + 27 * 16 * 4)
    self.assertEqual(cm.selection_state_bytes(cfg, 100), state)
    self.assertEqual(cm.gpu_bytes_per_sequence(cfg, 100, "sparse_resident"),
                     dense + state)
    # P_eff = min(8, 7) = 7 slots, slot map, 8-key rolling buffer.
    slots = 2 * 2 * 7 * 16 * 2 * 16 * 4
    offload = slots + 2 * 2 * 7 * 4 + 2 * 2 * 8 * 16 * 4 + state
    self.assertEqual(cm.gpu_bytes_per_sequence(cfg, 100, "offload"), offload)
    self.assertEqual(cm.host_bytes(cfg, 3, 100), 3 * dense)
    # infllmv2 keeps no bias or window means; dma no compressed keys.
    self.assertEqual(cm.selection_state_bytes(_small("infllmv2"), 100),
                     2 * 2 * 27 * 16 * 4)
    self.assertEqual(cm.selection_state_bytes(_small("dma"), 100),
                     2 * 2 * (112 + 27) * 4)

  def test_max_batch(self):
    cfg = _small()
    w = cm.weight_bytes(cfg)
    for mode in cm.MODES:
      per_seq = cm.gpu_bytes_per_sequence(cfg, 1000, mode)
      self.assertEqual(cm.max_batch(cfg, 1000, w + 3.5 * per_seq, mode), 3)
      self.assertEqual(cm.max_batch(cfg, 1000, w - 1, mode), 0)

  def test_offload_fits_larger_batches_at_long_context(self):
    cfg = _paper_like(16, 2)
    gpu = 0.9 * 80 * 2**30
    full = cm.max_batch(cfg, 65536, gpu, "full")
    resident = cm.max_batch(cfg, 65536, gpu, "sparse_resident")
    offload = cm.max_batch(cfg, 65536, gpu, "offload")
    self.assertLessEqual(resident, full)
    # 1 GiB of dense K/V per sequence vs 64 MiB of slots + 64 MiB of fp32
    # compressed keys + 8 MiB of bias: 71 vs 535 sequences.
    self.assertEqual((full, offload), (71, 535))


class DecodeCostTest(absltest.TestCase):

  def test_full_mode_by_hand(self):
    cfg = _small("full")
    hw = cm.Hardware(hbm_bytes_per_s=1e6, pcie_bytes_per_s=1e5,
                     peak_flops=1e9)
    cost = cm.decode_cost(cfg, 2, 100, 0.3, hw, mode="full")
    weights = (2 * (12288 + 36864 + 128) + 259 * 64 + 64) * 4  # 460,800
    kv = 2 * 2 * 100 * 2 * 16 * 4  # the whole context, per sequence
    self.assertEqual(cost.hbm_bytes_per_step, weights + 2 * kv)
    self.assertEqual(cost.flops_per_step,
                     2 * 2 * weights / 4 + 4 * 2 * 2 * 4 * 16 * 100)
    self.assertAlmostEqual(cost.t_gpu_s, (weights + 2 * kv) / 1e6)
    self.assertEqual(cost.t_pcie_s, 0.0)
    self.assertAlmostEqual(cost.serial_tokens_per_s, 2 / cost.t_gpu_s)
    self.assertEqual(cost.overlapped_tokens_per_s, cost.serial_tokens_per_s)
    self.assertEqual(cost.pcie_ceiling_tokens_per_s, float("inf"))

  def test_flops_bound_roofline(self):
    hw = cm.Hardware(hbm_bytes_per_s=1e15, pcie_bytes_per_s=1e5,
                     peak_flops=1e6)
    cost = cm.decode_cost(_small("full"), 2, 100, 0.0, hw, mode="full")
    self.assertAlmostEqual(cost.t_gpu_s, cost.flops_per_step / 1e6)

  def test_offload_by_hand(self):
    cfg = _small("nosa")
    hw = cm.Hardware(hbm_bytes_per_s=1e9, pcie_bytes_per_s=1e8,
                     peak_flops=1e15)
    cost = cm.decode_cost(cfg, 4, 256, 0.5, hw, mode="offload")
    # P_eff = min(8, 256 / 16) = 8; W = (256 - 8) // 4 + 1 = 63.
    sel = 2 * 2 * 8 * 16 * 2 * 16 * 4  # 65,536
    kv_seq = sel + 2 * 2 * (8 * 16 + 63) * 4 + 2 * 2 * 63 * 16 * 4
    weights = (2 * (12288 + 66 + 36864 + 128) + 259 * 64 + 64) * 4
    self.assertEqual(cost.hbm_bytes_per_step, weights + 4 * kv_seq)
    self.assertEqual(cost.pcie_bytes_per_step, 4 * 0.5 * sel)
    t_gpu, t_pcie = (weights + 4 * kv_seq) / 1e9, 4 * 0.5 * sel / 1e8
    self.assertAlmostEqual(cost.t_gpu_s, t_gpu)
    self.assertAlmostEqual(cost.t_pcie_s, t_pcie)
    self.assertAlmostEqual(cost.serial_tokens_per_s, 4 / (t_gpu + t_pcie))
    self.assertAlmostEqual(cost.overlapped_tokens_per_s,
                           4 / max(t_gpu, t_pcie))
    self.assertAlmostEqual(cost.pcie_ceiling_tokens_per_s, 1e8 / (0.5 * sel))
    resident = cm.decode_cost(cfg, 4, 256, 0.5, hw, mode="sparse_resident")
    self.assertEqual(resident.t_gpu_s, cost.t_gpu_s)
    self.assertEqual(resident.t_pcie_s, 0.0)

  def test_h100_missed_byte_costs_sixty_resident_ones(self):
    ratio = cm.H100.hbm_bytes_per_s / cm.H100.pcie_bytes_per_s
    self.assertAlmostEqual(ratio, 61.6)
    cfg = _paper_like(16, 2)
    g = cm.gpu_bound_gamma(cfg, 64, 65536)
    self.assertLess(g, 1 - 1 / ratio)  # weights and state make T_gpu longer
    cost = cm.decode_cost(cfg, 64, 65536, g, mode="offload")
    self.assertAlmostEqual(cost.t_pcie_s / cost.t_gpu_s, 1.0)

  def test_throughput_ordering(self):
    cfg = _paper_like(16, 2)
    for gamma in (0.0, 0.9, 0.99, 1.0):
      cost = cm.decode_cost(cfg, 16, 32768, gamma, mode="offload")
      self.assertLessEqual(cost.serial_tokens_per_s,
                           cost.overlapped_tokens_per_s)
      self.assertLessEqual(cost.overlapped_tokens_per_s,
                           cost.pcie_ceiling_tokens_per_s)
    full = cm.decode_cost(cfg, 16, 32768, 1.0, mode="full")
    sparse = cm.decode_cost(cfg, 16, 32768, 1.0, mode="sparse_resident")
    self.assertGreater(sparse.overlapped_tokens_per_s,
                       full.overlapped_tokens_per_s)


class ErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("gamma_low", dict(gamma=-0.1), "gamma=-0.1 is invalid"),
      ("gamma_high", dict(gamma=1.5), "gamma=1.5 is invalid"),
      ("batch_zero", dict(batch=0), "batch=0 is invalid"),
      ("context_zero", dict(context_len=0), "context_len=0 is invalid"),
      ("mode", dict(mode="dense"),
       "mode='dense' is invalid: must be one of full, sparse_resident, "
       "offload"),
  )
  def test_decode_cost_errors(self, overrides, message):
    kwargs = dict(batch=1, context_len=100, gamma=0.5, mode="offload")
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, message) as ctx:
      cm.decode_cost(_small(), **kwargs)
    self.assertNotIn("\n", str(ctx.exception))

  def test_sparse_mode_needs_sparse_variant(self):
    with self.assertRaisesRegex(ValueError, "needs a sparse variant"):
      cm.max_batch(_small("full"), 100, 1e9, "offload")

  def test_other_errors(self):
    with self.assertRaisesRegex(ValueError, "gamma=2 is invalid"):
      cm.pcie_bytes_per_step(_small(), 1, 2)
    with self.assertRaisesRegex(ValueError, "topk_blocks=0 is invalid"):
      cm.selected_kv_bytes(_small(), 0)
    with self.assertRaisesRegex(ValueError, "gpu_bytes=-1 is invalid"):
      cm.max_batch(_small(), 100, -1, "full")
    with self.assertRaisesRegex(ValueError, "Hardware.pcie_bytes_per_s=0"):
      cm.Hardware(hbm_bytes_per_s=1.0, pcie_bytes_per_s=0, peak_flops=1.0)


if __name__ == "__main__":
  absltest.main()
