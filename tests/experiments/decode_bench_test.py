"""experiments/decode_bench.py and its report: the verdict lines, and a CPU
smoke run."""

import json
import os

from absl.testing import absltest
import pytest
from experiments.bench import decode_report
from tests import entry_points


def _rec(system, ctx, batch, tps, pcie_ms=1.0):
  step_ms = 1e3 * batch / tps
  return {"system": system, "context": ctx, "batch": batch,
          "tokens_per_s": tps, "step_ms": step_ms, "model_t_pcie_ms": pcie_ms,
          "model_t_gpu_ms": 5.0, "step_over_max_gpu_pcie": step_ms / 5.0}


class VerdictTest(absltest.TestCase):

  def test_comparisons(self):
    recs = [_rec("nosa_gpu", 100, 4, 400.0), _rec("nosa_offload", 100, 4,
                                                   200.0),
            _rec("nosa_offload_fused", 100, 4, 250.0),
            _rec("infllmv2_offload", 100, 4, 100.0, pcie_ms=40.0),
            _rec("infllmv2_gpu", 100, 4, 50.0),
            _rec("full_gpu_max", 100, 9, 400.0)]
    got = decode_report.verdicts(recs)
    self.assertEqual(got, [
        "infllmv2_offload, L=100, B=4: offloaded beats GPU-resident (2.00x).",
        "infllmv2_offload, L=100, B=4: step 40.00 ms = 0.50 x max(T_gpu "
        "measured resident 80.00, T_pcie 40.00) ms; cost-model T_gpu 5.00 ms "
        "gives 8.00 x.",
        "nosa_offload, L=100, B=4: GPU-resident beats offloaded (2.00x).",
        "nosa_offload, L=100, B=4: step 20.00 ms = 2.00 x max(T_gpu measured "
        "resident 10.00, T_pcie 1.00) ms; cost-model T_gpu 5.00 ms gives "
        "4.00 x.",
        "NOSA / InfLLMv2, both offload, L=100, B=4: 2.00x.",
        "NOSA offload (B=4) / FullAttn at its largest batch (B=9), L=100: "
        "0.50x.",
        "nosa_offload_fused, L=100, B=4: GPU-resident beats offloaded "
        "(1.60x).",
        "nosa_offload_fused, L=100, B=4: step 16.00 ms = 1.60 x max(T_gpu "
        "measured resident 10.00, T_pcie 1.00) ms; cost-model T_gpu 5.00 ms "
        "gives 3.20 x.",
        "NOSA offload_fused (B=4) / FullAttn at its largest batch (B=9), "
        "L=100: 0.62x."])
    self.assertEqual(decode_report.verdicts([_rec("full_gpu", 1, 1, 1.0)]),
                     [])


class SmokeTest(absltest.TestCase):

  def test_bad_kv_heads_is_one_line_error(self):
    run = entry_points.run(
        "decode_bench", "--kv_heads=5",
        f"--out_dir={self.create_tempdir().full_path}", timeout=120)
    self.assertNotEqual(run.returncode, 0)
    self.assertIn("--kv_heads=5 must divide the 32 query heads", run.stderr)

  def test_runlocal(self):  # ~30 s on 2 cores
    # Each store and fetch mode once (resident, offloaded with the XLA copy
    # loop, offloaded with the fused kernel), and both query-aware variants
    # offloaded; B=2 and 1 + 2 steps (the fused kernel runs interpreted on
    # the CPU, at a cost per step that grows with B: ~0.65 s at B=4, ~0.2 s
    # at B=2). 2 of the tiny config's 4 layers, as the engine tests' model:
    # every program is half the size to compile (~30 s -> ~23 s).
    out = self.create_tempdir().full_path
    run = entry_points.run(
        "decode_bench", "--runlocal", f"--out_dir={out}", "--steps=2",
        "--warmup=1", "--batch=2", "--num_layers=2",
        "--systems=nosa_gpu,nosa_offload,nosa_offload_fused,"
        "infllmv2_offload",
        # The second locality point: the issue-8 study's trained nosa.
        "--gamma_nosa_from=experiments/results/quality/quality.json")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    res = json.load(open(os.path.join(out, "decode_bench.json")))
    self.assertAlmostEqual(res["meta"]["gamma_nosa"], 0.917, places=3)
    self.assertEqual(res["meta"]["num_layers_override"], 2)
    self.assertEqual([r["system"] for r in res["records"]],
                     ["infllmv2_offload", "nosa_gpu", "nosa_offload",
                      "nosa_offload_fused"])
    off, fused = res["records"][2:]
    self.assertTrue(0.0 < res["records"][0]["gamma"] < 1.0)
    self.assertGreater(off["fetched_blocks"], 0)
    self.assertTrue(0.0 < off["gamma"] < 1.0)
    self.assertEqual((off["fetch"], fused["fetch"]), ("loop", "fused"))
    # Same synthetic selection, so the same blocks move either way.
    self.assertEqual(fused["fetched_blocks"], off["fetched_blocks"])
    self.assertGreater(res["ceilings"]["pcie_bulk_bytes_per_s"], 0)
    self.assertEqual(res["gather"][-1]["method"], "xla_copy_loop")
    table = open(os.path.join(out, "table.md")).read()
    self.assertIn("nosa_offload_fused, L=400, B=2:", table)
    self.assertTrue(os.path.exists(os.path.join(out, "decode_bench.png")))
    self.assertTrue(os.path.exists(os.path.join(out, "scaling.png")))
    summary = json.load(open(os.path.join(out, "summary.json")))
    self.assertEqual(summary["commit"], res["meta"]["commit"])
    rows = {r["system"]: r for r in summary["rows"]}
    self.assertEqual(set(rows), {r["system"] for r in res["records"]})
    # Offload rows carry the resident step of the same batch as T_gpu and
    # their PCIe time at the bulk bandwidth measured in the run.
    self.assertEqual(rows["nosa_offload"]["t_gpu_ms"],
                     rows["nosa_gpu"]["step_ms"])
    self.assertIsNone(rows["infllmv2_offload"]["t_gpu_ms"])
    self.assertAlmostEqual(
        rows["nosa_offload"]["t_pcie_ms"],
        1e3 * off["pcie_bytes_per_step"]
        / res["ceilings"]["pcie_bulk_bytes_per_s"])
    self.assertIsNone(rows["nosa_gpu"]["t_pcie_ms"])
    bad = entry_points.run("decode_bench", "--runlocal", f"--out_dir={out}",
                           "--systems=nosa_warp")
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("--systems: unknown ['nosa_warp']", bad.stderr)

  @pytest.mark.slow  # ~15 s; the engine's prefetch: engine_test
  def test_runlocal_prefetch(self):
    # Half the guessed lanes wrong: some loads hit, some are wasted, and the
    # summary carries the counts.
    out = self.create_tempdir().full_path
    run = entry_points.run(
        "decode_bench", "--runlocal", f"--out_dir={out}", "--steps=4",
        "--warmup=2", "--batch=2", "--parts=decode",
        "--systems=nosa_offload_prefetch", "--prefetch_accuracy=0.5")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    (rec,) = json.load(open(os.path.join(out, "decode_bench.json")))[
        "records"]
    self.assertTrue(rec["prefetch"])
    self.assertEqual(rec["cache_blocks"], 2 * 8)  # tiny: topk 8
    self.assertGreater(rec["prefetch_hits"], 0)
    self.assertGreater(rec["wasted"], 0)
    (row,) = json.load(open(os.path.join(out, "summary.json")))["rows"]
    self.assertEqual((row["prefetch_hits"], row["misses"], row["wasted"]),
                     (rec["prefetch_hits"], rec["fetched_blocks"],
                      rec["wasted"]))

  @pytest.mark.slow  # ~25 s; chunked prefill: engine_test
  def test_runlocal_prefill(self):
    out = self.create_tempdir().full_path
    run = entry_points.run("decode_bench", "--runlocal", f"--out_dir={out}",
                           "--parts=prefill", "--prefill_batch=2")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    res = json.load(open(os.path.join(out, "decode_bench.json")))
    self.assertEqual([r["system"] for r in res["prefill"]],
                     ["prefill_device", "prefill_host",
                      "prefill_device_chunked", "prefill_host_chunked"])
    for r in res["prefill"]:
      self.assertEqual((r["context"], r["batch"]), (400, 2))
      self.assertGreater(r["prefill_tokens_per_s"], 0)
    self.assertEqual(res["prefill"][-1]["chunk"], 32)  # 2 blocks of 16
    self.assertNotIn("failed", res)


if __name__ == "__main__":
  absltest.main()
