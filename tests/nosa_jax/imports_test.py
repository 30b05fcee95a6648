"""The import rules of STYLE.md, checked on the AST import graph.

Imports are one-way, `experiments -> nosa_jax -> pallas_kernels -> jax`, and
the `nosa_jax` modules import each other without a cycle. Every
`nosa_jax/**/*.py` file is parsed (nothing is imported, so a cycle that
would only fail at run time, or only on a lazy path, is still found) and
each import statement, at module level or inside a function, is an edge
`module -> module`, with modules named by dotted path (`nosa_jax.x.y`).

What counts as an edge:
  * `import nosa_jax.x`, `from nosa_jax.x import y` -> `nosa_jax.x`, or
    `nosa_jax.x.y` when `y` is itself a module; `from nosa_jax import x` ->
    `nosa_jax.x` (or the package `nosa_jax` when `x` is a name defined in
    its `__init__`); relative imports likewise, resolved against the file's
    package.
  * Imports under `if TYPE_CHECKING:` are left out: they never run.
  * The implicit import of a module's parent package (running
    `nosa_jax/__init__.py` before `nosa_jax/x.py`) is left out; an explicit
    import of the package is an edge to it.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Iterable, Mapping

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[2]

# Top-level packages each library layer must not import (STYLE.md rule 1).
FORBIDDEN = {
    "nosa_jax": ("experiments", "configs", "ml_collections"),
    "pallas_kernels": ("nosa_jax", "experiments", "configs",
                       "ml_collections"),
}


# ----------------------------------------------------------------------------
# Parsing: the import targets of one file.
# ----------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
  """Collects the dotted targets of every import statement, at any depth."""

  def __init__(self, package: str, modules: frozenset[str]):
    self.package = package  # the package relative imports resolve against
    self.modules = modules
    self.targets: set[str] = set()

  def visit_If(self, node: ast.If):
    if not _is_type_checking(node.test):
      for child in node.body:
        self.visit(child)
    for child in node.orelse:
      self.visit(child)

  def visit_Import(self, node: ast.Import):
    self.targets.update(alias.name for alias in node.names)

  def visit_ImportFrom(self, node: ast.ImportFrom):
    if node.level:
      parts = self.package.split(".")
      if node.level - 1 >= len(parts):
        raise ValueError(f"relative import beyond the top of {self.package}")
      base = ".".join(parts[:len(parts) - (node.level - 1)])
      source = f"{base}.{node.module}" if node.module else base
    else:
      source = node.module
    for alias in node.names:
      sub = f"{source}.{alias.name}"
      self.targets.add(sub if sub in self.modules else source)


def import_targets(source: str, module: str, is_package: bool,
                   modules: Iterable[str] = ()) -> set[str]:
  """Dotted names imported by the file of `module`, relative ones resolved.

  Args:
    source: the file's text.
    module: its dotted name (`nosa_jax.x`, or `nosa_jax` for its
      `__init__.py`).
    is_package: whether the file is a package's `__init__.py`.
    modules: the known module names; `from p import x` names `p.x` when
      `p.x` is one of them, else `p`.

  Returns:
    The imported names, e.g. {"jax.numpy", "nosa_jax.config"}.
  """
  package = module if is_package else module.rpartition(".")[0]
  visitor = _Imports(package, frozenset(modules))
  visitor.visit(ast.parse(source))
  return visitor.targets


def _module_files(package: str) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file under `package`."""
  out = {}
  for path in sorted((REPO / package).rglob("*.py")):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _owner(target: str, modules: Iterable[str]) -> str | None:
  """The longest known module that `target` is or lies inside."""
  best = None
  for m in modules:
    if (target == m or target.startswith(m + ".")) and (
        best is None or len(m) > len(best)):
      best = m
  return best


def package_imports(package: str) -> dict[str, set[str]]:
  """Every module of `package` -> the names it imports (any package)."""
  files = _module_files(package)
  return {m: import_targets(p.read_text(), m, p.name == "__init__.py", files)
          for m, p in files.items()}


def import_graph(package: str) -> dict[str, set[str]]:
  """Module -> the modules of the same package it imports."""
  imports = package_imports(package)
  graph = {}
  for m, targets in imports.items():
    # A name that `m` takes from its own package `__init__` is no edge.
    owners = {_owner(t, imports) for t in targets}
    graph[m] = {o for o in owners if o is not None and o != m}
  return graph


# ----------------------------------------------------------------------------
# Cycles.
# ----------------------------------------------------------------------------


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
  """One cycle per strongly connected component that has one.

  Tarjan's algorithm (iterative) finds the components; within each, a
  breadth-first search from its first member back to itself gives a
  shortest cycle through that member, e.g. ["a", "b", "a"].

  Args:
    graph: node -> successors; successors need not be keys.

  Returns:
    The cycles, each closed (last node = first), sorted.
  """
  succ = {n: sorted(set(s)) for n, s in graph.items()}
  for s in list(succ.values()):
    for n in s:
      succ.setdefault(n, [])
  index, low, on_stack, stack, comps = {}, {}, set(), [], []
  for root in sorted(succ):
    if root in index:
      continue
    work = [(root, iter(succ[root]))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, it = work[-1]
      child = next(it, None)
      if child is None:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          comp = []
          while True:
            n = stack.pop()
            on_stack.discard(n)
            comp.append(n)
            if n == node:
              break
          comps.append(sorted(comp))
      elif child not in index:
        index[child] = low[child] = len(index)
        stack.append(child)
        on_stack.add(child)
        work.append((child, iter(succ[child])))
      elif child in on_stack:
        low[node] = min(low[node], index[child])
  cycles = []
  for comp in comps:
    start = comp[0]
    if len(comp) == 1 and start not in succ[start]:
      continue
    members, parent, frontier = set(comp), {}, [start]
    while start not in parent:
      nxt = []
      for n in frontier:
        for c in succ[n]:
          if c in members and c not in parent:
            parent[c] = n
            nxt.append(c)
      frontier = nxt
    path, n = [start], parent[start]
    while n != start:
      path.append(n)
      n = parent[n]
    cycles.append([start] + path[1:][::-1] + [start])
  return sorted(cycles)


def _format(cycles: list[list[str]]) -> str:
  return "\n".join("  " + " -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


class FindCyclesTest(absltest.TestCase):
  """The checker itself, on graphs whose answer is known."""

  def test_finds_the_cycle_and_names_its_modules(self):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(),
             "e": {"a"}}
    self.assertEqual(find_cycles(graph), [["a", "b", "c", "a"]])

  def test_a_dag_has_none(self):
    graph = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}
    self.assertEqual(find_cycles(graph), [])

  def test_self_loop_and_two_separate_cycles(self):
    graph = {"a": {"a"}, "b": {"c"}, "c": {"b"}, "d": {"e"}, "e": {"f"},
             "f": {"d", "b"}}
    self.assertEqual(find_cycles(graph), [
        ["a", "a"], ["b", "c", "b"], ["d", "e", "f", "d"]])

  def test_shortest_cycle_through_the_first_member(self):
    # a -> b -> c -> a and a -> c -> a: the component is {a, b, c}.
    graph = {"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}
    self.assertEqual(find_cycles(graph), [["a", "c", "a"]])


class ImportTargetsTest(absltest.TestCase):
  """Every import form resolves to the module it loads."""

  MODULES = ("nosa_jax", "nosa_jax.config", "nosa_jax.model",
             "nosa_jax.inference", "nosa_jax.inference.engine",
             "nosa_jax.inference.store")

  def test_absolute_forms(self):
    source = "\n".join([
        "import jax.numpy as jnp",
        "import nosa_jax.config",
        "from nosa_jax import model as model_lib",
        "from nosa_jax import __version__",
        "from nosa_jax.inference.engine import generate",
        "from nosa_jax.inference import store",
    ])
    self.assertEqual(
        import_targets(source, "nosa_jax.train", False, self.MODULES),
        {"jax.numpy", "nosa_jax.config", "nosa_jax.model", "nosa_jax",
         "nosa_jax.inference.engine", "nosa_jax.inference.store"})

  def test_relative_forms_in_a_module_and_in_a_package_init(self):
    source = "\n".join([
        "from . import store",
        "from .store import Store",
        "from .. import config",
        "from ..model import Transformer",
    ])
    want = {"nosa_jax.inference.store", "nosa_jax.config", "nosa_jax.model"}
    self.assertEqual(import_targets(
        source, "nosa_jax.inference.engine", False, self.MODULES), want)
    self.assertEqual(import_targets(
        source, "nosa_jax.inference", True, self.MODULES), want)

  def test_function_level_imports_count_type_checking_ones_do_not(self):
    source = "\n".join([
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:",
        "  from nosa_jax import model",
        "else:",
        "  import numpy",
        "def f():",
        "  class A:",
        "    def g(self):",
        "      from nosa_jax import config",
    ])
    self.assertEqual(
        import_targets(source, "nosa_jax.train", False, self.MODULES),
        {"typing", "numpy", "nosa_jax.config"})


class ImportRulesTest(absltest.TestCase):
  """STYLE.md rule 1 on the files as they are now."""

  def test_the_graph_sees_top_level_and_lazy_imports(self):
    # Guards against a walker that silently finds nothing.
    graph = import_graph("nosa_jax")
    self.assertIn("nosa_jax.sharding", graph["nosa_jax.memory_plan"])
    self.assertIn("nosa_jax.model", graph["nosa_jax.memory_plan"])
    self.assertIn("nosa_jax.train", graph["nosa_jax.testing"])  # in a def

  def test_nosa_jax_has_no_import_cycle(self):
    cycles = find_cycles(import_graph("nosa_jax"))
    self.assertEqual(cycles, [], "import cycles among nosa_jax modules "
                     "(STYLE.md rule 1):\n" + _format(cycles))

  def test_sharding_does_not_import_the_model(self):
    self.assertNotIn("nosa_jax.model", import_graph("nosa_jax")[
        "nosa_jax.sharding"])

  def test_layers_import_only_downward(self):
    for package, banned in FORBIDDEN.items():
      bad = sorted(
          f"{m} imports {t}"
          for m, targets in package_imports(package).items()
          for t in targets if t.split(".")[0] in banned)
      self.assertEqual(bad, [], f"{package} must not import {banned} "
                       "(STYLE.md rule 1)")


if __name__ == "__main__":
  absltest.main()
