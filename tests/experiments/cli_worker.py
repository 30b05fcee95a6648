"""Runs one entry point on several command lines in one process (cli_test).

  python -m tests.experiments.cli_worker MODULE '[["--flag=v", ...], ...]'

prints one JSON line per command line: [exit code, the line it exits with
(else its stdout and stderr)].
One process per module: the entry points define flags of the same names.
With CLI_WORKER_INTERRUPT_AT=<data position>, training gets a Ctrl-C there.
"""

import contextlib
import importlib
import io
import json
import os
import sys

from absl import flags
from absl import logging

from experiments import cli
from nosa_jax import testing


def main():
  name, runs = sys.argv[1], json.loads(sys.argv[2])
  module = importlib.import_module(f"experiments.{name}")
  for argv in runs:
    flags.FLAGS.unparse_flags()
    for flag in list(flags.FLAGS):  # config_flags adds these per parse
      if flag.startswith("config."):
        delattr(flags.FLAGS, flag)
    sys.argv = [name] + argv
    at = os.environ.get("CLI_WORKER_INTERRUPT_AT")
    out = io.StringIO()
    logging.get_absl_handler().python_handler.stream = out  # warnings too
    try:
      with (testing.training_interrupted_at(int(at)) if at else
            contextlib.nullcontext()), contextlib.redirect_stderr(
                out), contextlib.redirect_stdout(out):
        cli.run(module.main, name)
    except SystemExit as e:  # what sys.exit(...) would print and return
      code, text = ((1, e.code) if isinstance(e.code, str) else
                    (e.code or 0, out.getvalue().strip()))
    print(json.dumps([code, text]), flush=True)


if __name__ == "__main__":
  main()
