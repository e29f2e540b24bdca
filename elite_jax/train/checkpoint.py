"""Orbax checkpoints of a training run: train state, data-iterator state and config, saved atomically.

Orbax writes each step to a temporary directory and renames it when complete, so a crash during a save leaves the
previous checkpoints intact; saves are asynchronous (training continues while arrays are written) and the last K are
kept. Restores go straight into the shardings of the current mesh, which may differ from the one that saved.

What a crash or a bad disk leaves is handled here: a latest checkpoint that cannot be read (a truncated or missing
data file, bad metadata) is moved aside to WORKDIR/checkpoints.unreadable/, never deleted, with a one-line warning,
and the next older one is tried; a save that fails (disk full, permission lost) raises ``CheckpointWriteError`` and
leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from elite_jax.errors import InputError
from elite_jax.train import hosts

# Config fields that must match for a workdir's checkpoint to belong to this run.
IDENTITY = ("stage", "pretrained", "image_encoder", "global_mapper", "mapper.hidden_dim", "mapper.depth",
            "mapper.tapped_layers", "data.resolution")
# Orbax's words when the checkpoint is readable but holds other shapes or another tree than this config's.
_MISFIT = ("is not compatible with the stored shape", "tree structures do not match")


class CheckpointWriteError(RuntimeError):
  """A save failed (disk full, permission lost...); the checkpoints saved before it are intact."""


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return list(d) if isinstance(d, tuple) else d


def _why(e: BaseException) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {first[:200]}"


class Checkpointer:
  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
    self.folder = Path(os.path.abspath(os.path.join(workdir, "checkpoints")))
    self.aside = self.folder.with_name("checkpoints.unreadable")
    self.manager = ocp.CheckpointManager(
        str(self.folder), options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                                               enable_async_checkpointing=async_save, create=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
    try:
      return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             data=ocp.args.JsonSave(data_state),
                                                             config=ocp.args.JsonSave(config)), force=force)
    except Exception as e:  # noqa: BLE001 - also the error of an earlier asynchronous save, surfacing here
      raise self._write_error(step, e) from None

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - an asynchronous save that failed
      raise self._write_error(None, e) from None

  def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
    saved = ", ".join(map(str, self.steps())) or "none"
    what = f"saving checkpoint {step}" if step is not None else "a checkpoint save"
    return CheckpointWriteError(f"{what} in {self.folder} failed ({_why(e)}); the checkpoints saved before it are "
                                f"intact (steps: {saved}): free space or fix the folder, then rerun the same command "
                                f"to resume")

  def restore_latest(self, abstract_state: Any, config: dict) -> tuple[int, Any, dict] | None:
    """(step, state placed as ``abstract_state``'s shardings, data-iterator state) of the newest checkpoint that
    reads completely, or None when there is none. Unreadable ones are moved aside (see the module docstring);
    InputError when a readable one is from another run, or when none can be read."""
    tried = []
    for step in reversed(self.steps()):
      try:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        failure = None
      except Exception as e:  # noqa: BLE001 - unreadable metadata or config
        failure = e
      if failure is None:
        diffs = [f"{k}: checkpoint {_get(saved, k)!r} vs config {_get(config, k)!r}" for k in IDENTITY
                 if _get(saved, k) != _get(config, k)]
        if diffs:
          raise InputError(f"the workdir's checkpoint (step {step}) is from a different run: " + "; ".join(diffs))
        try:
          out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - see _MISFIT for the errors that are not damage
          if isinstance(e, ValueError) and any(m in str(e) for m in _MISFIT):
            raise InputError(f"the workdir's checkpoint (step {step}) does not fit this config: "
                             f"{str(e).splitlines()[0]}") from None
          failure = e
      if not hosts.any_host(failure is not None):  # every host restores the same step
        return step, out["state"], out["data"]
      tried.append(step)
      self._move_aside(step, failure)
    if tried:
      raise InputError(f"no checkpoint in {self.folder} can be read (tried steps {', '.join(map(str, tried))}; moved "
                       f"to {self.aside}): start over with a new --workdir, or restore the checkpoint files")
    return None

  def _move_aside(self, step: int, failure: BaseException | None) -> None:
    """Out of Orbax's sight (so it is neither read again nor garbage-collected), never deleted."""
    dest = self.aside / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      reason = _why(failure) if failure is not None else "another host could not read it"
      print(f"warning: checkpoint {step} in {self.folder} cannot be read ({reason}); moved to {dest}; trying the "
            f"previous one", file=sys.stderr, flush=True)
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.folder / str(step)), str(dest))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"elite_jax moved checkpoint {step} aside")
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()
