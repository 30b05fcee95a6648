"""experiments.generate: the CLI on both stores, and its one-line errors."""

import os
import subprocess
import sys

from absl.testing import absltest
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class GenerateCliTest(absltest.TestCase):

  @pytest.mark.slow  # subprocess starts + compiles
  def test_generate_cli(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.generate",
           "--config=configs/tiny.py", "--prompt=def f(", "--offload=host",
           "--max_new_tokens=20"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    self.assertIn("offload=host", run.stdout)
    self.assertRegex(run.stdout, r"20 tokens; decode [0-9.]+ tokens/s .* "
                     r"block-cache hit rate per layer: ([0-9.]+ ){3}[0-9.]+")
    # Chunked prefill and prefetch into spare slots: the same text.
    fast = subprocess.run(cmd + ["--cache_blocks=16", "--prefetch",
                                 "--prefill_chunk=16"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    self.assertEqual(fast.returncode, 0, fast.stderr[-2000:])
    text = lambda out: out.split("\n\n")[0]
    self.assertEqual(text(fast.stdout), text(run.stdout))
    self.assertRegex(fast.stdout, r"prefetch: \d+ blocks loaded ahead, \d+ "
                     r"of them attended \(\d+ wasted\)")
    bad = subprocess.run(cmd + ["--cache_blocks=3"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    self.assertEqual(bad.returncode, 1)
    self.assertEqual(bad.stderr.strip().splitlines()[-1],
                     "generate error: HostStore.cache_blocks=3 is below "
                     "topk_blocks=8; the cache must hold a whole selection")


if __name__ == "__main__":
  absltest.main()
