"""experiments/bench/decode_systems.py: which store each system runs, and the
plan of runs."""

from unittest import mock

from absl.testing import absltest
import jax
import pytest

from experiments.bench import decode_systems
from nosa_jax import cost_model
from nosa_jax import testing
from nosa_jax.inference import host_memory
from tests.nosa_jax.inference import fake_dma


class OffloadStoreTest(absltest.TestCase):

  def test_serial_systems_copy_then_attend(self):
    # "<v>_offload" is the serial engine on every backend; only "_fused"
    # fuses the fetch into the attention kernel.
    for backend, serial in (("gpu", "pallas"), ("cpu", "loop")):
      with mock.patch.object(jax, "default_backend", return_value=backend):
        self.assertEqual(
            decode_systems.offload_store("nosa_offload", 64, 2).fetch, serial)
        self.assertEqual(decode_systems.offload_store(
            "infllmv2_offload_fused", 64, 2).fetch, "fused")
    cache = decode_systems.offload_store("nosa_offload_cache", 64, 2)
    self.assertEqual(cache.cache_blocks, 128)
    dma = decode_systems.offload_store("nosa_offload_dma", 64, 2)
    self.assertEqual((dma.cache_blocks, dma.prefetch_copy), (128, "dma"))
    self.assertEqual(cache.prefetch_copy, "fetch")
    self.assertIsNone(
        decode_systems.offload_store("nosa_offload", 64, 2).cache_blocks)


@pytest.mark.skipif(not fake_dma.compilers_present(), reason="no C compiler")
class DmaRunTest(absltest.TestCase):

  def test_dma_system_reports_the_copy_engine_counts(self):
    # On the CPU over the memcpy stand-in runtime: the record carries the
    # copies the extension made per timed step, and none left pending.
    fake_dma.engine()
    cfg = testing.tiny_model_config("nosa")
    proto = decode_systems.Protocol(batch=2, steps=2, warmup=2,
                                    gamma=(("nosa", 0.9), ("infllmv2", 0.8)))
    (run,) = decode_systems.plan(["nosa_offload_dma"], cfg, cfg, [200],
                                 proto, small=True)[:1]
    params = decode_systems.random_params(cfg)
    hw = cost_model.Hardware(hbm_bytes_per_s=1e12, pcie_bytes_per_s=1e10,
                             peak_flops=1e14)
    rec = decode_systems.run_decode(run, cfg, params, hw, proto)
    self.assertTrue(rec["prefetch"])
    self.assertEqual(rec["dma_pending"], 0)
    self.assertEqual(rec["dma_waits_per_step"], cfg.num_layers - 1)
    loaded = rec["prefetch_hits"] + rec["wasted"]  # over the timed steps
    self.assertGreater(loaded, 0)
    self.assertEqual(rec["dma_copies_per_step"] * proto.steps, 2 * loaded)


class PlanTest(absltest.TestCase):

  def test_runs_per_system(self):
    cfg = testing.tiny_model_config("nosa")
    proto = decode_systems.Protocol(batch=4, offload_batches=(8,),
                                    gamma=(("nosa", 0.9), ("infllmv2", 0.8)))
    runs = decode_systems.plan(
        ["full_gpu", "full_gpu_max", "nosa_gpu", "infllmv2_offload",
         "nosa_offload_fused"], cfg, cfg, [100, 200], proto, small=True)
    got = [(r.system, r.context, r.batch, r.gamma_target) for r in runs]
    self.assertEqual(got[:7], [
        ("full_gpu", 100, 4, None), ("full_gpu_max", 100, 8, None),
        ("nosa_gpu", 100, 4, None), ("infllmv2_offload", 100, 4, 0.8),
        ("infllmv2_offload", 100, 8, 0.8), ("nosa_offload_fused", 100, 4, 0.9),
        ("nosa_offload_fused", 100, 8, 0.9)])
    self.assertLen(runs, 14)
    self.assertEqual(proto.max_len(100), 100 + 6 + 32 + 1)
    self.assertNotIn("store", runs[3].describe())

  def test_largest_batches_under_an_emulated_hbm(self):
    cfg = testing.tiny_model_config("nosa")
    proto = decode_systems.Protocol(batch=2, largest=True,
                                    emulated_hbm_gib=0.001)
    budget = 0.001 * 2**30
    self.assertEqual(proto.device_budget(), budget)
    ctx = 400
    runs = decode_systems.plan(["full_gpu_max", "nosa_gpu", "nosa_offload"],
                               cfg, cfg, [ctx], proto)
    got = {(r.system, r.batch) for r in runs}
    dense = cost_model.max_batch(cfg, proto.max_len(ctx), budget, "full")
    resident = cost_model.max_batch(cfg, proto.max_len(ctx), budget,
                                    "sparse_resident")
    offload = min(proto.host_batch(cfg, ctx), cost_model.max_batch(
        cfg, proto.max_len(ctx), budget, "offload"))
    self.assertGreater(offload, resident)  # what offload is for
    self.assertEqual(got, {("full_gpu_max", dense), ("nosa_gpu", 2),
                           ("nosa_gpu", resident), ("nosa_offload", 2),
                           ("nosa_offload", offload)})
    # The pinned pool is sized before the GPU client: by the host bound.
    self.assertEqual(
        decode_systems.largest_store_bytes(cfg, ["nosa_offload"], [ctx],
                                           proto),
        host_memory.host_store_bytes(cfg, proto.host_batch(cfg, ctx),
                                     proto.max_len(ctx)))


if __name__ == "__main__":
  absltest.main()
