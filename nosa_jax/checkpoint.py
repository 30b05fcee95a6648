"""orbax checkpoints of the training state, crash-safe and resumable.

A checkpoint is one orbax step directory holding `state` (params, optimizer
state, step, RNG key; StandardSave) and `meta` (JSON: data position, step,
config). orbax writes a step into a temporary directory and renames it into
place only when complete, so a process killed mid-save leaves the previous
checkpoint as the latest usable one; leftover temporary directories are
removed on the next start (`cleanup_tmp_directories`).

A checkpoint found bad (one a diverging run wrote, or one that fails to
restore) is never deleted: `set_aside` moves it to `<workdir>/set_aside/`,
out of orbax's sight, so the newest remaining step is the one resumed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

# What a finished step holds besides the array data (orbax 0.12 layout).
_REQUIRED_FILES = ("state/_METADATA", "meta/metadata")


class CheckpointError(OSError):
  """A run's checkpoints do not restore (damaged files); one-line message."""


class Checkpointer:
  """A thin `ocp.CheckpointManager` wrapper for (state, meta) pairs."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def set_aside(self, step: int, reason: str) -> str:
    """Moves checkpoint `step` out of the directory; returns where to.

    It goes to `set_aside/<step>.<reason>` beside the checkpoint directory
    (a suffix `.2`, `.3`, ... if that exists), so nothing is lost and the
    newest remaining step becomes the latest.
    """
    self.wait()
    dest_dir = os.path.join(os.path.dirname(self.directory), "set_aside")
    os.makedirs(dest_dir, exist_ok=True)
    dest = base = os.path.join(dest_dir, f"{step}.{reason}")
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = f"{base}.{n}"
    if jax.process_index() == 0:  # one rename on a shared filesystem
      os.replace(os.path.join(self.directory, str(step)), dest)
    self._mgr.reload()
    return dest

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving (asynchronously); `wait()` blocks until committed."""
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                   force=True)

  def restore(self, step: int | None, like: Any) -> tuple[Any, dict]:
    """Restores `step` (default latest) into the structure of `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_intact(self, like: Any) -> tuple[Any, dict]:
    """Restores the newest step that restores into the structure of `like`.

    Each newer step that fails is reported in one line with its cause and
    set aside as `<step>.corrupt` (the caller has checked that the config
    matches, so a failure means damaged files, not another model).

    Raises:
      CheckpointError: no step restores (all are then set aside).
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except
        # orbax / TensorStore raise many types for damaged files.
        cause = failure_cause(e, os.path.join(self.directory, str(step)))
        dest = self.set_aside(step, "corrupt")
        logging.warning("checkpoint step %d does not restore (%s); set "
                        "aside as %s, falling back to the next older step",
                        step, cause, dest)
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores (damaged ones are in "
        f"{os.path.dirname(self.directory)}/set_aside); a rerun starts from "
        "step 0")

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()


def failure_cause(e: BaseException, step_dir: str) -> str:
  """One line saying why the checkpoint in `step_dir` did not restore."""
  missing = [f for f in _REQUIRED_FILES
             if not os.path.exists(os.path.join(step_dir, f))]
  if missing:
    return f"{', '.join(missing)} missing"
  while e.__cause__ or e.__context__:  # the innermost error says the most
    e = e.__cause__ or e.__context__
  line = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {line[:200]}"


def writable_dir(path: str, flag: str) -> str:
  """Creates directory `path` if needed and checks a file can be written in
  it, before any slow or threaded writer touches it; returns its absolute
  path.

  Raises:
    OSError: one line naming `flag` and the cause (a file in the way, a
      missing or read-only parent, no permission).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise OSError(f"{flag}: {path} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise OSError(f"{flag}: {path} is not a writable directory: "
                  f"{e.strerror or type(e).__name__}") from None
  return path


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON through a temp file + rename, never leaving half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
