"""experiments.generate: the CLI on both stores, and its one-line errors."""

from absl.testing import absltest
import pytest

from tests import entry_points


class GenerateCliTest(absltest.TestCase):

  @pytest.mark.slow  # subprocess starts + compiles
  def test_generate_cli(self):
    cmd = ["--config=configs/tiny.py", "--prompt=def f(", "--offload=host",
           "--max_new_tokens=20"]
    generate = lambda *extra: entry_points.run("generate", *cmd, *extra,
                                               timeout=180)
    run = generate()
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    self.assertIn("offload=host", run.stdout)
    self.assertRegex(run.stdout, r"20 tokens; decode [0-9.]+ tokens/s .* "
                     r"block-cache hit rate per layer: ([0-9.]+ ){3}[0-9.]+")
    # Chunked prefill and prefetch into spare slots: the same text.
    fast = generate("--cache_blocks=16", "--prefetch", "--prefill_chunk=16")
    self.assertEqual(fast.returncode, 0, fast.stderr[-2000:])
    text = lambda out: out.split("\n\n")[0]
    self.assertEqual(text(fast.stdout), text(run.stdout))
    self.assertRegex(fast.stdout, r"prefetch: \d+ blocks loaded ahead, \d+ "
                     r"of them attended \(\d+ wasted\)")
    bad = generate("--cache_blocks=3")
    self.assertEqual(bad.returncode, 1)
    self.assertEqual(bad.stderr.strip().splitlines()[-1],
                     "generate error: HostStore.cache_blocks=3 is below "
                     "topk_blocks=8; the cache must hold a whole selection")


if __name__ == "__main__":
  absltest.main()
