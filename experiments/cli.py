"""What every entry point does with a bad input: one line and an exit code.

`cli.run(main, "generate")` replaces `absl.app.run(main)`. A bad flag or
config override (an unknown field gets the nearest valid names, a missing
config file its path), an `OSError` / `ValueError` from the library (a
`ConfigError`, a missing file, a damaged checkpoint, data too small) and
any other failure each print one line, `<name> error: ...`, and exit 1;
Ctrl-C exits 130 with one line. `--debug` shows the traceback instead.
"""

import difflib
import os
import sys

from absl import app
from absl import flags

from nosa_jax import config as config_lib

_DEBUG = flags.DEFINE_bool("debug", False,
                           "Show the traceback of an error, not one line.")


def _known_fields() -> list[str]:
  return list(config_lib.flat_fields(config_lib.ExperimentConfig()))


def _first_line(e: BaseException) -> str:
  """The first line of the innermost error with a message (the cause)."""
  lines = []
  while e is not None:
    if str(e).strip():
      lines.append(str(e).strip().splitlines()[0])
    e = e.__cause__ or e.__context__
  return lines[-1] if lines else ""


def _parse_error(argv: list[str], e: Exception) -> str:
  """One line for a flag that does not parse."""
  for arg in argv[1:]:
    name, _, value = arg.lstrip("-").partition("=")
    if not name.startswith("config."):
      continue
    field = name[len("config."):]
    if field.split(".")[-1] not in str(e):
      continue
    if field in _known_fields():
      return f"--{name}={value}: {_first_line(e)}"
    near = difflib.get_close_matches(field, _known_fields(), n=3, cutoff=0.6)
    return (f"--{name}: {field} is not a config field"
            + (f"; did you mean {' or '.join(near)}?" if near else ""))
  return f"flag error: {_first_line(e)}"


def _flags_parser(argv: list[str]) -> list[str]:
  for arg in argv[1:]:  # config_flags defers a missing file's error
    name, _, value = arg.lstrip("-").partition("=")
    path = value.split(":", 1)[0]
    if name == "config" and path and not os.path.isfile(path):
      sys.exit(f"--config={value}: no such config file {path}")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if "--debug" in argv:
      raise
    sys.exit(_parse_error(argv, e))


def run(main, name: str) -> None:
  """`app.run(main)` with one line per error (`--debug`: the traceback)."""

  def wrapped(argv):
    if not _DEBUG.value:
      # After a damaged checkpoint's failed read, TensorStore callbacks find
      # asyncio's loop closed at exit and print "Event loop is closed"
      # tracebacks that Python ignores anyway; keep them off the terminal.
      sys.unraisablehook = lambda unraisable: None
    try:
      return main(argv)
    except KeyboardInterrupt:
      if _DEBUG.value:
        raise
      print(f"{name}: interrupted", file=sys.stderr, flush=True)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      if _DEBUG.value:
        raise
      kind = ("" if isinstance(e, (OSError, ValueError))
              else f"{type(e).__name__}: ")
      line = _first_line(e)
      sys.exit(f"{name} error: {kind}{line}"
               + ("" if kind == "" else " (--debug shows the traceback)"))

  app.run(wrapped, flags_parser=_flags_parser)
