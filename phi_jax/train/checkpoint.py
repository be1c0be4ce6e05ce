"""Orbax checkpoints of (train state, data-iterator state, run metadata) with async saves and keep-N.

Orbax writes each step into a temporary directory and renames it only when every host has finished, so a
crash mid-save leaves no directory that `latest_step` would return: only complete checkpoints are restored.
Restoring takes an abstract target with shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, save_interval_steps: int = 100, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, *, data_state: Optional[dict] = None, meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether a save started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
                              meta=ocp.args.JsonSave(meta or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); returns (state, data, meta)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored["state"], restored["data"], restored["meta"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
