"""Runs a notebook's code cells top to bottom without Jupyter.

The CI machine installs only `.[dev]` (no jupyter / nbclient), so the
notebooks are checked by executing their code cells in order in one fresh
namespace, as a kernel would:

  * the `.ipynb` is read as plain nbformat-4 JSON;
  * lines starting with `%` or `!` (line magics, shell commands, i.e. the
    install cells) are skipped, and so are whole `%%` cell magics;
  * matplotlib uses the Agg backend and every figure is closed after its
    cell; the value of a cell's last expression is printed, as Jupyter
    would display it;
  * the working directory is the notebook's directory during the run.

Usage:

  NOSA_NOTEBOOK_SMOKE=1 NOSA_NOTEBOOK_OUT=/tmp/figs \
      python -m nosa_jax.notebook_runner notebooks/01_*.ipynb
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import time
from typing import Any, Iterator, Mapping


class NotebookError(RuntimeError):
  """A cell raised; the message names the notebook and the cell."""


def code_cells(path: str) -> list[str]:
  """The source of every code cell of the notebook at `path`, in order."""
  with open(path) as f:
    nb = json.load(f)
  if nb.get("nbformat") != 4:
    raise ValueError(f"{path}: not an nbformat 4 notebook")
  out = []
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      src = cell["source"]
      out.append(src if isinstance(src, str) else "".join(src))
  return out


def strip_magics(source: str) -> str:
  """The cell without `%` / `!` lines; empty for a `%%` cell magic."""
  if source.lstrip().startswith("%%"):
    return ""
  kept = [line for line in source.splitlines()
          if not line.lstrip().startswith(("%", "!"))]
  return "\n".join(kept)


@contextlib.contextmanager
def _environment(env: Mapping[str, str], cwd: str) -> Iterator[None]:
  saved = {k: os.environ.get(k) for k in env}
  old_cwd = os.getcwd()
  os.environ.update(env)
  os.chdir(cwd)
  try:
    yield
  finally:
    os.chdir(old_cwd)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _close_figures() -> None:
  if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close("all")


def _run_cell(source: str, filename: str, namespace: dict) -> None:
  tree = ast.parse(source, filename)
  last = None
  if tree.body and isinstance(tree.body[-1], ast.Expr):
    last = ast.Expression(tree.body.pop().value)
  exec(compile(tree, filename, "exec"), namespace)  # pylint: disable=exec-used
  if last is not None:
    value = eval(compile(last, filename, "eval"), namespace)  # pylint: disable=eval-used
    if value is not None and not type(value).__module__.startswith(
        "matplotlib"):
      print(repr(value))


def run_notebook(path: str, env: Mapping[str, str] | None = None,
                 *, verbose: bool = True) -> dict[str, Any]:
  """Executes the code cells of `path`; returns the final namespace.

  Args:
    path: an `.ipynb` file.
    env: environment variables set during the run (restored afterwards).
    verbose: print a line per cell with its wall time.

  Raises:
    NotebookError: a cell raised (chained to the original exception).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  path = os.path.abspath(path)
  name = os.path.basename(path)
  namespace: dict[str, Any] = {"__name__": "__main__"}
  with _environment(dict(env or {}), os.path.dirname(path)):
    for i, source in enumerate(code_cells(path)):
      source = strip_magics(source)
      if not source.strip():
        continue
      t0 = time.time()
      try:
        _run_cell(source, f"<{name} cell {i}>", namespace)
      except Exception as e:
        first = source.strip().splitlines()[0]
        raise NotebookError(f"{name}: code cell {i} ({first!r}) raised "
                            f"{type(e).__name__}: {e}") from e
      finally:
        _close_figures()
      if verbose:
        print(f"[{name}] cell {i} done in {time.time() - t0:.1f} s",
              flush=True)
  return namespace


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print("usage: python -m nosa_jax.notebook_runner NOTEBOOK.ipynb ...",
          file=sys.stderr)
    return 2
  for path in argv[1:]:
    t0 = time.time()
    run_notebook(path)
    print(f"[{os.path.basename(path)}] ok in {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
