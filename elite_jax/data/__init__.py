"""Training data: TFDS records (OpenImages as ELITE trains on it, or a folder of your photos), the official
augmentations, and a grain loader of per-host batches.

  from elite_jax import data
  builder = data.prepare("openimages", "/data/open_images", "/data/tfds", stage=1)   # once
  loader = data.make_loader(builder, tokenizer=tokenizer, batch_size=4, resolution=512, seed=0)
  batch = next(loader); state = loader.get_state()   # JSON; loader.set_state(state) resumes exactly

Modules: ``records`` (what a record holds; crop and box arithmetic), ``openimages`` and ``folder`` (the builders),
``augment`` (the official training transforms, and ``example_spec``: the shapes of what the loader yields),
``loader`` (the grain pipeline).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from elite_jax.data import folder, openimages
from elite_jax.data.augment import example_spec
from elite_jax.data.loader import Loader, make_loader
from elite_jax.errors import InputError

BUILDERS = {"openimages": openimages.build, "folder": folder.build}

__all__ = ["BUILDERS", "Loader", "example_spec", "make_loader", "prepare"]


def prepare(builder: str, source_dir: str | os.PathLike, data_dir: str | os.PathLike,
            stage: int) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) the records of ``stage`` from ``source_dir`` into ``data_dir``.

  ``builder``: "openimages" (an OpenImages V6 download in the official layout) or "folder" (your photos).
  """
  if builder not in BUILDERS:
    raise InputError(f"data builder must be one of {sorted(BUILDERS)}, got {builder!r}")
  return BUILDERS[builder](source_dir, data_dir, stage)
