"""What a training record holds, and the crop and box arithmetic that both dataset builders share.

Stage 1 stores the crop the official loader computes (datasets.py:296-307), so training sees exactly its pixels. Stage 2
pads a tight mask box by a random 10..19 px at training time, so the record stores the crop with the largest padding
(19 px, clamped at the image) and the tight box inside it; ``padded_crop`` then slices it as the official code slices
the whole image (clamped at 0 at top/left, cut by the array's end at bottom/right), which gives the same pixels for
every padding.

Images and masks are stored as PNG bytes (lossless) and decoded here, by the loader, so that an unreadable record is the
loader's to skip rather than an exception inside TFDS.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

log = logging.getLogger("elite_jax.data")

STAGE1_MIN_AREA, STAGE1_MAX_AREA = 0.02, 0.8  # normalised box area kept (datasets.py:210)
STAGE1_PAD = 10  # px around the box (datasets.py:302-305)
STAGE2_MIN_SIDE = 100  # px, tight box height and width (datasets.py:367)
STAGE2_MAX_ASPECT = 2.0  # height/width and width/height within [1/2, 2] (datasets.py:369)
STAGE2_PADS = tuple(range(10, 20))  # random padding drawn per sample (datasets.py:500)
STAGE2_MAX_PAD = STAGE2_PADS[-1]
_LOGGED_PER_REASON = 10


def features(stage: int) -> tfds.features.FeaturesDict:
  """The record of one training example (both builders).

  Stage 1: ``image`` (the padded box crop), ``box`` the normalised XMin, XMax, YMin, YMax of the annotation.
  Stage 2: ``image`` and ``mask`` (0..255, 255 = object) cropped with 19 px padding, ``box`` the tight box's top,
  bottom, left, right (exclusive ends, as the official slicing uses them) in crop coordinates.
  Both: ``crop_box`` top, bottom, left, right of the crop in the source image, ``image_size`` its height, width.
  """
  common = {
      "id": tfds.features.Text(),  # unique: bbox row or mask file name
      "image_id": tfds.features.Text(),
      "label": tfds.features.Text(),  # OpenImages LabelName (e.g. /m/0bt9lr); empty for folders
      "class_name": tfds.features.Text(),  # its DisplayName; unused by training, as in the official code
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
      "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
  }
  if stage == 1:
    common["box"] = tfds.features.Tensor(shape=(4,), dtype=np.float32)
  else:
    common["mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    common["box"] = tfds.features.Tensor(shape=(4,), dtype=np.int32)
  return tfds.features.FeaturesDict(common)


# ---------------------------------------------------------------------------------------------------------------------
# PNG bytes.


def encode_png(array: np.ndarray) -> bytes:
  """(H, W, 3) RGB or (H, W) grey uint8 -> PNG bytes."""
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
  if not ok:
    raise ValueError(f"cannot encode a {array.shape} {array.dtype} array as PNG")
  return buf.tobytes()


def decode_png(data: bytes, channels: int) -> np.ndarray:
  """PNG bytes -> (H, W, 3) RGB (channels=3) or (H, W) grey (channels=1) uint8; ValueError when unreadable."""
  flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
  array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  if array is None:
    raise ValueError(f"undecodable image bytes ({len(data)} bytes)")
  return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if channels == 3 else array


# ---------------------------------------------------------------------------------------------------------------------
# Reading source files at build time.


def check_readable(path: str) -> None:
  """Raises when PIL cannot decode the whole file (cv2 silently returns a truncated JPEG's partial picture)."""
  with Image.open(path) as img:
    img.load()


def read_rgb_pil(path: str) -> np.ndarray:
  """The stage-1 decoder: PIL ``convert("RGB")``, no EXIF rotation (datasets.py:294)."""
  with Image.open(path) as img:
    return np.array(img.convert("RGB"))


def read_rgb_cv2(path: str) -> np.ndarray:
  """The stage-2 decoder: ``cv2.imread`` (which applies EXIF rotation) then BGR->RGB (datasets.py:494-495)."""
  check_readable(path)
  array = cv2.imread(path)
  if array is None:
    raise ValueError(f"cv2 cannot read {path}")
  return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def read_mask_cv2(path: str, height: int, width: int) -> np.ndarray:
  """A segmentation PNG as the official code sees it: cv2.imread (3 channels), nearest resize to the image size,
  channel 0 (cal_bbox_by_seg.py:20-24, datasets.py:496-497). (H, W) uint8 in {0, 255}.

  Binarised (nonzero -> 255), which changes nothing for OpenImages' 0/255 masks; the official code would multiply
  the image by any other value / 255.
  """
  check_readable(path)
  array = cv2.imread(path)
  if array is None:
    raise ValueError(f"cv2 cannot read {path}")
  channel = cv2.resize(array, (width, height), interpolation=cv2.INTER_NEAREST)[:, :, 0]
  return np.where(channel > 0, 255, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Boxes.


def stage1_crop_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
  """Top, bottom, left, right of the official stage-1 crop of a normalised (XMin, XMax, YMin, YMax) box.

  As datasets.py:296-305: scale to pixels, pad by 10 clamped at the border, truncate with ``int`` (in float64).
  """
  x0, x1, y0, y1 = box[0] * width, box[1] * width, box[2] * height, box[3] * height
  left = int(x0 - min(STAGE1_PAD, x0 - 0))
  right = int(x1 + min(STAGE1_PAD, width - x1))
  top = int(y0 - min(STAGE1_PAD, y0 - 0))
  bottom = int(y1 + min(STAGE1_PAD, height - y1))
  return top, bottom, left, right


def stage1_keeps(box: tuple[float, float, float, float]) -> bool:
  """The official area rule (datasets.py:210): keep when the normalised area is within [0.02, 0.8]."""
  area = (box[1] - box[0]) * (box[3] - box[2])
  return not (area > STAGE1_MAX_AREA or area < STAGE1_MIN_AREA)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """(top, bottom, left, right) of a (H, W) uint8 mask as data_scripts/cal_bbox_by_seg.py computes it, or None where
  the official script drops the mask.

  The extreme points of the external contours (nonzero = object); the maxima are the last object row/column, not one
  past it. Each side is then made even by growing it by one, at the far end first, if that stays inside the image;
  a side shorter than 2 drops the mask.
  """
  found = cv2.findContours(np.ascontiguousarray(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  contours = found[0] if len(found) == 2 else found[1]
  if len(contours) == 0:
    return None
  points = np.vstack(contours) if len(contours) > 1 else contours[0]
  if len(points) < 2:
    return None
  hs, he = int(points[:, :, 1].min()), int(points[:, :, 1].max())
  ws, we = int(points[:, :, 0].min()), int(points[:, :, 0].max())
  h, w = mask.shape
  if (he - hs) % 2 == 1 and he + 1 <= h:
    he += 1
  if (he - hs) % 2 == 1 and hs - 1 >= 0:
    hs -= 1
  if (we - ws) % 2 == 1 and we + 1 <= w:
    we += 1
  if (we - ws) % 2 == 1 and ws - 1 >= 0:
    ws -= 1
  if he - hs < 2 or we - ws < 2:
    return None
  return hs, he, ws, we


def stage2_filter(box: tuple[int, int, int, int]) -> str | None:
  """Why the official stage-2 dataset drops a tight box (datasets.py:367-370), or None when it keeps it."""
  h, w = box[1] - box[0], box[3] - box[2]
  if h < STAGE2_MIN_SIDE or w < STAGE2_MIN_SIDE:
    return "box_too_small"
  if h / w < 1 / STAGE2_MAX_ASPECT or w / h < 1 / STAGE2_MAX_ASPECT:
    return "box_aspect"
  return None


def stage2_storage(image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]
                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], tuple[int, int, int, int]]:
  """The stored stage-2 crop: (image crop, mask crop, box inside the crop, crop box in the image).

  The crop is the tight box padded by 19 px and clamped at the image; with ``padded_crop`` it reproduces the official
  slicing for every padding 10..19 (the official top/left clamp at 0 lands on the crop's start; its bottom/right, cut
  by the image's end, land on the crop's end).
  """
  hs, he, ws, we = box
  height, width = mask.shape
  top, bottom = max(hs - STAGE2_MAX_PAD, 0), min(he + STAGE2_MAX_PAD, height)
  left, right = max(ws - STAGE2_MAX_PAD, 0), min(we + STAGE2_MAX_PAD, width)
  inner = (hs - top, he - top, ws - left, we - left)
  return image[top:bottom, left:right], mask[top:bottom, left:right], inner, (top, bottom, left, right)


def padded_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[int], pad: int) -> tuple[np.ndarray, np.ndarray]:
  """The official stage-2 crop with padding ``pad`` (datasets.py:499-507), from a stored crop."""
  top, bottom, left, right = (int(v) for v in box)
  rows = slice(max(top - pad, 0), bottom + pad)
  cols = slice(max(left - pad, 0), right + pad)
  return image[rows, cols], mask[rows, cols]


# ---------------------------------------------------------------------------------------------------------------------
# Build-time bookkeeping.


class BuildStats:
  """Counts of dropped examples by reason: ``skipped`` for unusable files, ``filtered`` for the official rules."""

  def __init__(self, name: str):
    self.name = name
    self.skipped: collections.Counter[str] = collections.Counter()
    self.filtered: collections.Counter[str] = collections.Counter()
    self.examples = 0

  def skip(self, reason: str, detail: str, count: int = 1) -> None:
    self.skipped[reason] += count
    if self.skipped[reason] <= _LOGGED_PER_REASON:
      log.warning("%s: skipping %d example(s), %s: %s", self.name, count, reason, detail)

  def filter(self, reason: str, count: int = 1) -> None:
    self.filtered[reason] += count

  def as_dict(self) -> dict:
    return {"examples": self.examples, "skipped": dict(sorted(self.skipped.items())),
            "filtered": dict(sorted(self.filtered.items()))}

  def log_summary(self) -> None:
    log.info("%s: %d examples; skipped %s; filtered %s", self.name, self.examples, dict(self.skipped),
             dict(self.filtered))
