"""TFDS builder of training records from a folder of your own concept photos, in the OpenImages records' format.

The folder holds ``<name>.jpg|jpeg|png`` and, optionally, a mask ``<name>_mask.png`` (or ``<name>_bg.png``, the
official test set's naming); nonzero mask pixels are the object. Other files are ignored.

- ``stage1``: the whole photo is the crop (no box).
- ``stage2``: the mask's tight box (computed as for OpenImages) stored with 19 px padding; a photo without a mask is
  its own box with a full mask. OpenImages' size and aspect filters are not applied: every usable photo is kept.

Photos are read with EXIF orientation applied and masks with ``elite_jax.preprocess``'s rules, as at inference. An
unreadable photo or mask skips that photo, counted in ``builder.info.metadata["build"]`` and logged.

  builder = build("my_photos/", "/tmp/tfds_my_photos", stage=1)
"""

from __future__ import annotations

import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from elite_jax import preprocess
from elite_jax.data import records
from elite_jax.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIXES = ("_mask.png", "_bg.png")  # the first found wins


class ConceptFolder(tfds.core.GeneratorBasedBuilder):
  """Records of a folder of concept photos (optional masks) for ELITE's two training stages."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Whole-photo crops (stage 1); mask tight box +19 px crops and masks (stage 2)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="stage1", description="Whole photos."),
      tfds.core.BuilderConfig(name="stage2", description="Mask crops, +19 px, with masks."),
  ]
  # Where TFDS looks for a checksums file; its own lookup needs the importlib_resources backport (not installed).
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  A folder of <name>.jpg|jpeg|png, each with an optional <name>_mask.png (or <name>_bg.png); nonzero = object.
  """

  def __init__(self, *, folder: str | os.PathLike | None = None, **kwargs):
    # The folder may be given here instead of through DownloadConfig(manual_dir=...).
    kwargs.setdefault("file_format", "array_record")
    self._source_dir = None if folder is None else os.fspath(folder)
    super().__init__(**kwargs)

  @property
  def stage(self) -> int:
    return int(self.builder_config.name[-1])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=records.features(self.stage),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = self._source_dir or os.fspath(dl_manager.manual_dir)
    return {"train": self._generate_examples(list_concepts(folder))}

  def _generate_examples(self, concepts: list[tuple[str, str, str | None]]):
    stats = records.BuildStats(f"{self.name}/{self.builder_config.name}")
    for name, image_path, mask_path in concepts:
      example = _example(name, image_path, mask_path, self.stage, stats)
      if example is not None:
        stats.examples += 1
        yield name, example
    stats.log_summary()
    self.info.metadata["build"] = stats.as_dict()


def build(folder: str | os.PathLike, data_dir: str | os.PathLike, stage: int) -> ConceptFolder:
  """Builds the ``stage`` records of a photo folder into ``data_dir`` (or reuses those already there); returns the
  builder.

  The records are named ``concept_folder/stage<N>`` whatever the folder: give each folder its own ``data_dir``.
  """
  if stage not in (1, 2):
    raise InputError(f"stage must be 1 or 2, got {stage!r}")
  builder = ConceptFolder(config=f"stage{stage}", data_dir=os.fspath(data_dir), folder=folder)
  if not builder.is_prepared():
    list_concepts(os.fspath(folder))  # fail early, before TFDS creates anything
    builder.download_and_prepare()
  return builder


def list_concepts(folder: str) -> list[tuple[str, str, str | None]]:
  """Sorted (name, image path, mask path or None) of the photos in ``folder``; InputError if there are none."""
  if not os.path.isdir(folder):
    raise InputError(f"concept folder not found: {folder}")
  files = sorted(os.listdir(folder))
  if not files:
    raise InputError(f"concept folder is empty: {folder}")
  names = set(files)
  concepts = []
  for file in files:
    stem, suffix = os.path.splitext(file)
    if suffix.lower() not in IMAGE_SUFFIXES or any(file.endswith(m) for m in MASK_SUFFIXES):
      continue
    if not os.path.isfile(os.path.join(folder, file)):
      continue
    mask = next((stem + m for m in MASK_SUFFIXES if stem + m in names), None)
    concepts.append((stem, os.path.join(folder, file), None if mask is None else os.path.join(folder, mask)))
  if not concepts:
    raise InputError(f"concept folder {folder} has no photos (.jpg, .jpeg or .png other than *_mask.png/*_bg.png)")
  return concepts


def _example(name: str, image_path: str, mask_path: str | None, stage: int, stats: records.BuildStats):
  try:
    image = preprocess.load_image(image_path)
  except Exception as e:  # noqa: BLE001 - InputError for unreadable files, anything else from the decoders
    stats.skip("unreadable_image", str(e))
    return None
  height, width = image.shape[:2]
  common = {"id": name, "image_id": name, "label": "", "class_name": "", "image_size": (height, width)}
  if stage == 1:
    return {**common, "image": records.encode_png(image), "box": (0.0, 1.0, 0.0, 1.0),
            "crop_box": (0, height, 0, width)}
  if mask_path is None:
    mask, box = np.full((height, width), 255, np.uint8), (0, height, 0, width)
  else:
    try:
      # Any channel > 0 is the object (a coloured mask's object need not be in channel 0).
      mask = np.where(preprocess.load_mask(mask_path, size=(height, width)).any(axis=2), 255, 0).astype(np.uint8)
    except Exception as e:  # noqa: BLE001
      stats.skip("unreadable_mask", str(e))
      return None
    box = records.tight_box(mask)
    if box is None:
      stats.skip("no_box", f"mask {mask_path} has no box of at least 2x2 px")
      return None
  crop, mask_crop, inner, crop_box = records.stage2_storage(image, mask, box)
  return {**common, "image": records.encode_png(crop), "mask": records.encode_png(mask_crop), "box": inner,
          "crop_box": crop_box}
