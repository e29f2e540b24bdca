"""TFDS builder of ELITE's training data from a local OpenImages V6 download (spec 5.1-5.3).

Two configs, one example per official training sample:

- ``stage1``: one per bbox row whose normalised area is in [0.02, 0.8]; the crop padded by 10 px (datasets.py:168-320).
- ``stage2``: one per segmentation mask whose tight box (data_scripts/cal_bbox_by_seg.py) is at least 100 px high and
  wide with an aspect in [1/2, 2]; the image and mask cropped with 19 px padding (datasets.py:323-543).

As the official scripts, the OpenImages *test* split is the training data. A missing or unreadable image or mask
skips its examples, counted by reason in ``builder.info.metadata["build"]`` and logged; it never stops the build.

  builder = build("/data/open_images", "/data/tfds", stage=2)     # or OpenImagesElite(config="stage2", ...)
"""

from __future__ import annotations

import csv
import os

from etils import epath
import tensorflow_datasets as tfds

from elite_jax.data import records
from elite_jax.errors import InputError

SET = "test"  # hard-coded by the official scripts (train_global.py:571, train_local.py:534)
CLASSES_CSV = os.path.join("annotations", "oidv6-class-descriptions.csv")
BBOX_CSV = os.path.join("annotations", f"{SET}-annotations-bbox.csv")
SEG_CSV = os.path.join("annotations", f"{SET}-annotations-object-segmentation.csv")
IMAGES = os.path.join("images", SET)
SEGS = os.path.join("segs", SET)
# What each stage reads (the class names only label the records; stage 1 uses them when present).
_LAYOUT = {1: (BBOX_CSV, IMAGES), 2: (CLASSES_CSV, SEG_CSV, IMAGES, SEGS)}
_COLUMNS = {BBOX_CSV: ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"), SEG_CSV: ("MaskPath", "LabelName"),
            CLASSES_CSV: ("LabelName", "DisplayName")}

_CITATION = """@inproceedings{wei2023elite,
  title={ELITE: Encoding Visual Concepts into Textual Embeddings for Customized Text-to-Image Generation},
  author={Wei, Yuxiang and Zhang, Yabo and Ji, Zhilong and Bai, Jinfeng and Zhang, Lei and Zuo, Wangmeng},
  booktitle={ICCV}, year={2023}}
@article{OpenImages, author={Kuznetsova, Alina and others}, title={The Open Images Dataset V4}, journal={IJCV},
  year={2020}}"""


class OpenImagesElite(tfds.core.GeneratorBasedBuilder):
  """ELITE's stage-1 box crops and stage-2 mask crops of OpenImages V6 (test split)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official ELITE sample lists; PNG crops (stage 1: +10 px; stage 2: +19 px and mask)."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="stage1", description="Box crops, +10 px (global mapper training)."),
      tfds.core.BuilderConfig(name="stage2", description="Mask crops, +19 px, with masks (local mapper training)."),
  ]
  # Where TFDS looks for a checksums file; its own lookup needs the importlib_resources backport (not installed).
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download OpenImages V6 ({SET} split) as the ELITE README says and lay it out as:
    <manual_dir>/{CLASSES_CSV}
    <manual_dir>/{BBOX_CSV}
    <manual_dir>/{SEG_CSV}
    <manual_dir>/{IMAGES}/<ImageID>.jpg
    <manual_dir>/{SEGS}/<MaskPath>          (the extracted mask PNGs)
  The official test_bbox_dict.npy is not needed: the tight boxes are computed here.
  """

  def __init__(self, *, manual_dir: str | os.PathLike | None = None, **kwargs):
    # The source folder may be given here instead of through DownloadConfig(manual_dir=...).
    kwargs.setdefault("file_format", "array_record")
    self._source_dir = None if manual_dir is None else os.fspath(manual_dir)
    super().__init__(**kwargs)

  @property
  def stage(self) -> int:
    return int(self.builder_config.name[-1])

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=records.features(self.stage),
        homepage="https://storage.googleapis.com/openimages/web/index.html", citation=_CITATION,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._source_dir or os.fspath(dl_manager.manual_dir)
    check_layout(root, self.stage)
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root: str):
    stats = records.BuildStats(f"{self.name}/{self.builder_config.name}")
    yield from (_stage1_examples if self.stage == 1 else _stage2_examples)(root, stats)
    stats.log_summary()
    self.info.metadata["build"] = stats.as_dict()  # written with the dataset info, after the last example


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, stage: int) -> OpenImagesElite:
  """Builds the ``stage`` records of an OpenImages download into ``data_dir`` (or reuses those already there);
  returns the builder."""
  if stage not in (1, 2):
    raise InputError(f"stage must be 1 or 2, got {stage!r}")
  builder = OpenImagesElite(config=f"stage{stage}", data_dir=os.fspath(data_dir), manual_dir=manual_dir)
  if not builder.is_prepared():
    check_layout(os.fspath(manual_dir), stage)
    builder.download_and_prepare()
  return builder


def check_layout(root: str, stage: int) -> None:
  """InputError naming what the official layout lacks (files and folders ``stage`` reads, CSV columns)."""
  if not os.path.isdir(root):
    raise InputError(f"OpenImages folder not found: {root}")
  missing = [p for p in _LAYOUT[stage] if not os.path.exists(os.path.join(root, p))]
  if missing:
    raise InputError(f"OpenImages folder {root} lacks {', '.join(missing)} (see OpenImagesElite."
                     f"MANUAL_DOWNLOAD_INSTRUCTIONS for the layout)")
  for path in _LAYOUT[stage]:
    if path in _COLUMNS:
      _header(os.path.join(root, path), _COLUMNS[path])


# ---------------------------------------------------------------------------------------------------------------------
# Examples.


def _stage1_examples(root: str, stats: records.BuildStats):
  classes = _classes(root) if os.path.exists(os.path.join(root, CLASSES_CSV)) else {}
  by_image: dict[str, list] = {}  # decode each image once, for all its boxes
  for n, row in enumerate(_rows(os.path.join(root, BBOX_CSV))):
    try:
      box = tuple(float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
    except ValueError:
      stats.skip("bad_row", f"{BBOX_CSV} row {n + 2}: {row}")
      continue
    if not records.stage1_keeps(box):
      stats.filter("box_area")
      continue
    by_image.setdefault(row["ImageID"], []).append((n, row["LabelName"], box))
  for image_id, items in by_image.items():
    image = _read_image(root, image_id, records.read_rgb_pil, stats, len(items))
    if image is None:
      continue
    height, width = image.shape[:2]
    for n, label, box in items:
      top, bottom, left, right = records.stage1_crop_box(box, height, width)
      crop = image[top:bottom, left:right]
      if crop.size == 0:
        stats.skip("empty_crop", f"{BBOX_CSV} row {n + 2}")
        continue
      stats.examples += 1
      yield f"bbox{n}", {
          "id": f"bbox{n}", "image_id": image_id, "label": label, "class_name": classes.get(label, ""),
          "image": records.encode_png(crop), "box": box, "crop_box": (top, bottom, left, right),
          "image_size": (height, width)}


def _read_image(root: str, image_id: str, reader, stats: records.BuildStats, count: int):
  """The decoded image, or None after counting its ``count`` examples as skipped (missing or unreadable file)."""
  path = os.path.join(root, IMAGES, image_id + ".jpg")
  if not os.path.isfile(path):
    stats.skip("missing_image", path, count)
    return None
  try:
    return reader(path)
  except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, ...) is an unreadable file
    stats.skip("unreadable_image", f"{path}: {type(e).__name__}: {e}", count)
    return None


def _stage2_examples(root: str, stats: records.BuildStats):
  classes = _classes(root)
  by_image: dict[str, list] = {}
  for row in _rows(os.path.join(root, SEG_CSV)):
    mask_path = row["MaskPath"]
    # As the official code: the image id is the mask file name's first '_' field (not the ImageID column).
    by_image.setdefault(mask_path.split("_")[0], []).append((mask_path, row["LabelName"]))
  for image_id, items in by_image.items():
    image = _read_image(root, image_id, records.read_rgb_cv2, stats, len(items))
    if image is None:
      continue
    height, width = image.shape[:2]
    for mask_path, label in items:
      seg_path = os.path.join(root, SEGS, mask_path)
      if not os.path.isfile(seg_path):
        stats.skip("missing_mask", seg_path)
        continue
      try:
        mask = records.read_mask_cv2(seg_path, height, width)
      except Exception as e:  # noqa: BLE001
        stats.skip("unreadable_mask", f"{seg_path}: {type(e).__name__}: {e}")
        continue
      box = records.tight_box(mask)
      if box is None:
        stats.filter("no_box")
        continue
      why = records.stage2_filter(box)
      if why:
        stats.filter(why)
        continue
      crop, mask_crop, inner, crop_box = records.stage2_storage(image, mask, box)
      stats.examples += 1
      yield mask_path, {
          "id": mask_path, "image_id": image_id, "label": label, "class_name": classes.get(label, ""),
          "image": records.encode_png(crop), "mask": records.encode_png(mask_crop), "box": inner,
          "crop_box": crop_box, "image_size": (height, width)}


# ---------------------------------------------------------------------------------------------------------------------
# CSVs.


def _header(path: str, columns: tuple[str, ...]) -> list[str]:
  with open(path, newline="", encoding="utf-8") as f:
    header = next(csv.reader(f), [])
  missing = [c for c in columns if c not in header]
  if missing:
    raise InputError(f"{path} lacks the column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})")
  return header


def _rows(path: str):
  with open(path, newline="", encoding="utf-8") as f:
    yield from csv.DictReader(f)


def _classes(root: str) -> dict[str, str]:
  return {row["LabelName"]: row["DisplayName"] for row in _rows(os.path.join(root, CLASSES_CSV))}
