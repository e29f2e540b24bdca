"""Orbax checkpoints of a training run: train state, data-iterator state and config, saved atomically.

Orbax writes each step to a temporary directory and renames it when complete, so a crash during a save leaves the
previous checkpoints intact; saves are asynchronous (training continues while arrays are written) and the last K are
kept. Restores go straight into the shardings of the current mesh, which may differ from the one that saved.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from elite_jax.errors import InputError

# Config fields that must match for a workdir's checkpoint to belong to this run.
IDENTITY = ("stage", "pretrained", "image_encoder", "global_mapper", "mapper.hidden_dim", "mapper.depth",
            "mapper.tapped_layers", "data.resolution")


def _get(d: dict, dotted: str):
  for part in dotted.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return list(d) if isinstance(d, tuple) else d


class Checkpointer:
  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           data=ocp.args.JsonSave(data_state),
                                                           config=ocp.args.JsonSave(config)), force=force)

  def restore(self, step: int, abstract_state: Any, config: dict) -> tuple[Any, dict]:
    """(state placed as ``abstract_state``'s shardings, data-iterator state); InputError if from another run.

    ``abstract_state``: ShapeDtypeStructs with shardings (``TrainProgram.abstract_state``).
    """
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    diffs = [f"{k}: checkpoint {_get(saved, k)!r} vs config {_get(config, k)!r}" for k in IDENTITY
             if _get(saved, k) != _get(config, k)]
    if diffs:
      raise InputError(f"the workdir's checkpoint (step {step}) is from a different run: " + "; ".join(diffs))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise InputError(f"the workdir's checkpoint (step {step}) does not fit this config: "
                       f"{str(e).splitlines()[0]}") from None
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

