"""Runs an entry point as a user does: `python -m experiments.<name> ARGS`
in a subprocess from the repository root, on the CPU. (A subprocess because
two entry points' absl flags would clash in one test worker.)"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name: str, *args: str, timeout: float = 300
        ) -> subprocess.CompletedProcess:
  """The finished process of `experiments.<name>` (text stdout / stderr)."""
  return subprocess.run(
      [sys.executable, "-m", f"experiments.{name}", *args], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=timeout)
