"""What every benchmark writes: a stamp and results files that never mislead.

  stamp(name)                       command, device, date, commit, jax, host
  write_results(out_dir, name, results, table=None)
                                    <name>.json atomically (a run cut short
                                    keeps the last complete file), and the
                                    markdown table beside it

A figure is only as good as its stamp: the commit says which code made it
(with "-dirty" when the tree had uncommitted changes), the device which
card, the date when. A copy of the tree without git (the device machine's)
names its commit through the environment: NOSA_COMMIT=<hash>.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import jax

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


COMMIT_ENV = "NOSA_COMMIT"


def commit() -> str:
  """$NOSA_COMMIT if set; else HEAD of this checkout, "-dirty" if it has
  changes; "n/a" without git."""
  if os.environ.get(COMMIT_ENV):
    return os.environ[COMMIT_ENV]
  def git(*args):
    return subprocess.run(["git", "-C", _REPO, *args], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  try:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return "n/a"
  return head + ("-dirty" if dirty else "")


def stamp(name: str, **extra: Any) -> dict:
  """The meta block of a results file: the exact command and where, when
  and with what code it ran (`extra` adds study-specific fields)."""
  dev = jax.devices()[0]
  return {
      "command": " ".join([f"python -m experiments.{name}"] + sys.argv[1:]),
      "device": getattr(dev, "device_kind", dev.platform),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="minutes"),
      "commit": commit(), "jax": jax.__version__, "host": platform.node(),
      **extra}


def write_results(out_dir: str, name: str, results: dict,
                  table: Optional[str] = None) -> str:
  """Writes out_dir/<name>.json (atomically) and, given, out_dir/table.md.

  Returns the JSON path.
  """
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, default=float)
  os.replace(tmp, path)
  if table is not None:
    with open(os.path.join(out_dir, "table.md"), "w") as f:
      f.write(table)
  return path
