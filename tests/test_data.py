"""elite_jax.data: TFDS records of OpenImages and photo folders, the official transforms, the grain loader.

The references restate the official code (datasets.py, data_scripts/cal_bbox_by_seg.py) in a few lines each, on an
OpenImages-layout fixture made of the bundled DreamBench photos, ellipse masks and a few broken files.
"""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from elite_jax.data import augment, folder, openimages, records
from elite_jax.data import loader as loader_lib
from elite_jax.data.loader import make_loader
from elite_jax.errors import InputError
from elite_jax.preprocess import CLIP_MEAN, CLIP_STD
from tests.openimages_fixture import BBOXES, MASKS, ellipse_mask as _ellipse_mask, write_openimages as _write_openimages  # noqa: F401

DATA = Path(__file__).parent / "data" / "dreambench"
RES = 64

STAGE1_BUILD = {"examples": 5, "filtered": {"box_area": 2},
                "skipped": {"missing_image": 1, "unreadable_image": 2}}
STAGE2_BUILD = {"examples": 5, "filtered": {"box_aspect": 1, "box_too_small": 1, "no_box": 1},
                "skipped": {"missing_image": 1, "missing_mask": 1, "unreadable_image": 1, "unreadable_mask": 1}}


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Both OpenImages configs built once: (manual_dir, {stage: builder})."""
  tmp = tmp_path_factory.mktemp("openimages")
  root = _write_openimages(tmp / "open_images")
  return root, {s: openimages.build(root, tmp / "tfds", stage=s) for s in (1, 2)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from transformers import CLIPTokenizer
  from elite_jax.tiny import write_tokenizer
  path = tmp_path_factory.mktemp("tokenizer")
  write_tokenizer(path)
  return CLIPTokenizer.from_pretrained(str(path))


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------------
# The official preprocessing, restated.


def _official_stage1_crop(root: Path, image_id: str, box) -> np.ndarray:
  """datasets.py:290-307 restated: PIL RGB, box scaled to pixels in float64 (pandas' dtype), 10 px padding clamped
  at the border, each end truncated by int()."""
  image = np.array(Image.open(root / "images" / "test" / f"{image_id}.jpg").convert("RGB"))
  height, width = image.shape[:2]
  x0, x1 = np.float64(box[0]) * width, np.float64(box[1]) * width
  y0, y1 = np.float64(box[2]) * height, np.float64(box[3]) * height
  cols = slice(int(x0 - min(10, x0)), int(x1 + min(10, width - x1)))
  rows = slice(int(y0 - min(10, y0)), int(y1 + min(10, height - y1)))
  return image[rows, cols]


def _official_bbox(root: Path, mask_path: str):
  """data_scripts/cal_bbox_by_seg.py restated for one mask: [hs, he, ws, we] or None."""
  image = cv2.imread(str(root / "images" / "test" / (mask_path.split("_")[0] + ".jpg")))
  seg = cv2.imread(str(root / "segs" / "test" / mask_path))
  seg = cv2.resize(seg, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)[:, :, 0]
  contours = cv2.findContours(seg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]  # OpenCV 3 returns 3 values
  if not contours:
    return None
  points = np.concatenate(contours).reshape(-1, 2)  # (x, y) of every external contour
  if len(points) < 2:
    return None
  (ws, hs), (we, he) = points.min(axis=0), points.max(axis=0)
  h, w = seg.shape
  if (he - hs) % 2:  # an odd side grows by one, at the far end when it stays inside the image
    he, hs = (he + 1, hs) if he + 1 <= h else (he, hs - 1 if hs >= 1 else hs)
  if (we - ws) % 2:
    we, ws = (we + 1, ws) if we + 1 <= w else (we, ws - 1 if ws >= 1 else ws)
  return None if he - hs < 2 or we - ws < 2 else [hs, he, ws, we]


def _official_stage2_crop(root: Path, mask_path: str, bbox, pad: int):
  """datasets.py:494-507 restated with a given pad: (image crop RGB uint8, mask crop 3-channel float64); the start
  is clamped at 0, the end left to numpy's slicing."""
  bgr = cv2.imread(str(root / "images" / "test" / (mask_path.split("_")[0] + ".jpg")))
  image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  seg = cv2.imread(str(root / "segs" / "test" / mask_path)).astype(np.float64)
  seg = cv2.resize(seg, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
  hs, he, ws, we = (int(v) for v in bbox)
  rows, cols = slice(max(hs - pad, 0), he + pad), slice(max(ws - pad, 0), we + pad)
  return image[rows, cols], seg[rows, cols]


# ---------------------------------------------------------------------------------------------------------------------
# Builders.


def test_openimages_stage1_counts_and_bit_exact_crops(built):
  root, builders = built
  assert builders[1].info.metadata["build"] == STAGE1_BUILD
  source = tfds.data_source("open_images_elite/stage1", split="train", data_dir=builders[1].data_dir_root)
  assert len(source) == STAGE1_BUILD["examples"]
  kept = {f"bbox{n}": row for n, row in enumerate(BBOXES)}
  seen = set()
  for i in range(len(source)):
    record = source[i]
    row = kept[record["id"].decode()]
    seen.add(row)
    assert record["image_id"].decode() == row[0]
    np.testing.assert_array_equal(record["box"], np.float32(row[1:]))
    np.testing.assert_array_equal(record["image"], _official_stage1_crop(root, row[0], row[1:]))
  assert seen == {BBOXES[i] for i in (0, 3, 4, 5, 6)}


def test_openimages_stage2_counts_boxes_and_every_padding(built):
  root, builders = built
  assert builders[2].info.metadata["build"] == STAGE2_BUILD
  source = builders[2].as_data_source(split="train")
  ids = sorted(source[i]["id"].decode() for i in range(len(source)))
  assert ids == sorted(["dog00_m01_a.png", "dog01_m01_b.png", "wide00_m01_e.png", "teapot02_m01_f.png",
                        "teapot03_m01_l.png"])
  for i in range(len(source)):
    record = source[i]
    mask_path = record["id"].decode()
    bbox = _official_bbox(root, mask_path)
    top, _, left, _ = record["crop_box"]
    assert [int(v) for v in record["box"] + [top, top, left, left]] == [int(v) for v in bbox], mask_path
    assert set(np.unique(record["mask"])) <= {0, 255}
    for pad in records.STAGE2_PADS:
      image, seg = _official_stage2_crop(root, mask_path, bbox, pad)
      crop, mask = records.padded_crop(record["image"], record["mask"][:, :, 0], record["box"], pad)
      np.testing.assert_array_equal(crop, image, err_msg=f"{mask_path} pad {pad}")
      np.testing.assert_array_equal(mask, seg[:, :, 0], err_msg=f"{mask_path} pad {pad}")


def test_openimages_layout_errors(tmp_path):
  with pytest.raises(InputError, match="not found"):
    openimages.build(tmp_path / "nowhere", tmp_path / "tfds", stage=1)
  (tmp_path / "oi" / "annotations").mkdir(parents=True)
  (tmp_path / "oi" / "annotations" / "test-annotations-bbox.csv").write_text("ImageID,XMin\n")
  with pytest.raises(InputError, match=r"lacks images/test"):
    openimages.build(tmp_path / "oi", tmp_path / "tfds", stage=1)
  (tmp_path / "oi" / "images" / "test").mkdir(parents=True)
  with pytest.raises(InputError, match=r"lacks the column\(s\) LabelName, XMax, YMin, YMax"):
    openimages.build(tmp_path / "oi", tmp_path / "tfds", stage=1)
  with pytest.raises(InputError, match=r"lacks annotations/oidv6-class-descriptions.csv, annotations/test-annotations-"
                                       r"object-segmentation.csv, segs/test"):
    openimages.build(tmp_path / "oi", tmp_path / "tfds", stage=2)


def test_folder_builder(tmp_path):
  photos = tmp_path / "photos"
  photos.mkdir()
  shutil.copy(DATA / "dog" / "00.jpg", photos / "dog.jpg")
  cv2.imwrite(str(photos / "dog_mask.png"), _ellipse_mask((512, 512), [((250, 260), (100, 140))]))
  shutil.copy(DATA / "teapot" / "00.jpg", photos / "teapot.jpg")
  cv2.imwrite(str(photos / "teapot_bg.png"), _ellipse_mask((512, 512), [((256, 256), (90, 90))]))
  Image.open(DATA / "dog" / "01.jpg").crop((0, 0, 300, 200)).save(photos / "wide.png")  # no mask
  (photos / "broken.jpg").write_bytes((DATA / "dog" / "03.jpg").read_bytes()[:5000])
  (photos / "notes.txt").write_text("ignored")
  stage1 = folder.build(photos, tmp_path / "tfds", stage=1)
  assert stage1.info.metadata["build"] == {"examples": 3, "filtered": {}, "skipped": {"unreadable_image": 1}}
  src = stage1.as_data_source(split="train")
  by_id = {src[i]["id"].decode(): src[i] for i in range(len(src))}
  assert sorted(by_id) == ["dog", "teapot", "wide"]
  np.testing.assert_array_equal(by_id["wide"]["image"], np.array(Image.open(photos / "wide.png").convert("RGB")))
  np.testing.assert_array_equal(by_id["dog"]["crop_box"], [0, 512, 0, 512])

  stage2 = folder.build(photos, tmp_path / "tfds", stage=2)
  assert stage2.info.metadata["build"]["examples"] == 3
  src = stage2.as_data_source(split="train")
  by_id = {src[i]["id"].decode(): src[i] for i in range(len(src))}
  for name, mask_file in (("dog", "dog_mask.png"), ("teapot", "teapot_bg.png")):
    mask = cv2.imread(str(photos / mask_file))[:, :, 0]
    box = records.tight_box(mask)
    record = by_id[name]
    top, _, left, _ = record["crop_box"]
    assert tuple(int(v) for v in record["box"] + [top, top, left, left]) == box
    crop, seg = records.padded_crop(record["image"], record["mask"][:, :, 0], record["box"], 19)
    assert crop.shape[:2] == (box[1] - box[0] + 38, box[3] - box[2] + 38)
  wide = by_id["wide"]  # no mask: the whole photo, a full mask
  assert wide["image"].shape == (200, 300, 3) and (wide["mask"] == 255).all()
  np.testing.assert_array_equal(wide["box"], [0, 200, 0, 300])

  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="empty"):
    folder.build(tmp_path / "empty", tmp_path / "tfds2", stage=1)
  (tmp_path / "empty" / "notes.txt").write_text("no photos")
  with pytest.raises(InputError, match="has no photos"):
    folder.build(tmp_path / "empty", tmp_path / "tfds2", stage=1)


# ---------------------------------------------------------------------------------------------------------------------
# Transforms.


def test_prompts_and_placeholder_index(tokenizer):
  assert augment.prompt_text("the photo of a {}", "a", "S") == "ahe photo of a S"
  assert augment.prompt_text("a photo of a {}", "zoomed in", "S") == "zoomed in photo of a S"
  official = augment.make_prompts(tokenizer, 1, "S", "whitespace")
  fixed = augment.make_prompts(tokenizer, 1, "S", "token")
  s_token = tokenizer("s", add_special_tokens=False)["input_ids"][0]
  plain, close_up = ("a", 0), ("a", augment.TEMPLATES.index("a close-up photo of a {}"))
  assert official.index[plain] == fixed.index[plain] == 5
  # "close-up" is three tokens: the whitespace rule points at "a" (6), the placeholder's token is 8.
  assert official.index[close_up] == 6 and fixed.index[close_up] == 8
  assert official.ids[close_up][8] == s_token and official.ids[close_up].dtype == np.int32
  stage2 = augment.make_prompts(tokenizer, 2, "S", "whitespace")
  assert len(stage2.ids) == 5 * 27
  with pytest.raises(InputError, match="placeholder_index"):
    augment.make_prompts(tokenizer, 1, "S", "words")


def test_custom_aug_branches():
  image = np.array(Image.open(DATA / "teapot" / "01.jpg").resize((150, 130)))
  seen = set()
  for seed in range(60):
    pixels, mask, caption = augment.custom_aug(image, np.random.default_rng(seed), RES)
    assert pixels.shape == (RES, RES, 3) and pixels.dtype == np.float32
    assert mask.shape == (RES // 8, RES // 8, 1) and mask.dtype == np.float32
    if caption in augment.FAR_CAPTIONS:
      # Pasted square of an even side < 0.6 res on a zero canvas (no uint8 maps to exactly 0 in [-1, 1]).
      rows, cols = np.nonzero(np.abs(pixels).sum(axis=2))
      r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
      scale = r1 - r0
      assert scale == c1 - c0 and scale % 2 == 0 and scale < 0.6 * RES
      small = np.asarray(Image.fromarray(image).resize((scale, scale), Image.BICUBIC)) / 127.5 - 1.0
      np.testing.assert_array_equal(pixels[r0:r1, c0:c1], small.astype(np.float32))
      expected = np.zeros((RES // 8, RES // 8), np.float32)
      expected[r0 // 8 + 1:r1 // 8 - 1, c0 // 8 + 1:c1 // 8 - 1] = 1
      np.testing.assert_array_equal(mask[:, :, 0], expected)
    elif caption in augment.NEAR_CAPTIONS:
      assert (mask == 1).all()
      found = False
      for scale in range(int(1.2 * RES), int(1.4 * RES) + 1, 2):
        big = (np.asarray(Image.fromarray(image).resize((scale, scale), Image.BICUBIC)) / 127.5 - 1.0)
        big = big.astype(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(big, (RES, RES, 3))[:, :, 0]
        found |= bool((windows == pixels).all(axis=(2, 3, 4)).any())
      assert found
    else:
      assert caption == "a" and (mask == 1).all()
      full = np.asarray(Image.fromarray(image).resize((RES, RES), Image.BICUBIC)) / 127.5 - 1.0
      np.testing.assert_array_equal(pixels, full.astype(np.float32))
    seen.add(caption)
  assert seen == set(augment.CAPTIONS[2])


class _FixedRng:
  """A generator stand-in whose draws all take one branch."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value

  def uniform(self, low, high):
    return low + (high - low) * self.value

  def choice(self, options):
    return options[-1]

  def integers(self, low, high=None, size=None):
    return low if high is None else high - 1


def test_clip_augment_ops():
  crop = np.array(Image.open(DATA / "dog" / "04.jpg").resize((180, 150)))
  none = augment.clip_augment(crop, _FixedRng(0.99))  # every p-draw fails: only the resize
  np.testing.assert_array_equal(none, cv2.resize(crop, (224, 224), interpolation=cv2.INTER_LINEAR))
  every = augment.clip_augment(crop, _FixedRng(0.0))  # flip, rotate -20, blur 7, elastic
  assert every.shape == (224, 224, 3) and every.dtype == np.uint8 and not np.array_equal(every, none)
  flipped = augment.clip_augment(crop, np.random.default_rng(0))
  assert flipped.shape == (224, 224, 3)
  ndimage = pytest.importorskip("scipy.ndimage")  # the elastic field's smoothing, against scipy when installed
  field = np.random.RandomState(0).rand(224, 224) * 2 - 1
  np.testing.assert_allclose(augment.gaussian_filter(field, 50.0), ndimage.gaussian_filter(field, 50.0),
                             rtol=0, atol=1e-12)


class _ScriptedRng:
  """A generator stand-in that returns scripted draws in order (to force each branch of a transform)."""

  def __init__(self, *draws):
    self.draws = list(draws)

  def integers(self, low, high=None, size=None):
    value = self.draws.pop(0)
    return np.asarray(value) if size is not None else value

  def choice(self, options):
    return self.draws.pop(0)


def test_stage2_example_against_the_official_steps(built, tokenizer):
  """Forced draws (pad 12, scale = res, template 3, resize to 240 + window (5, 9), rotate 17, shift (-20, 33)) against
  datasets.py:499-527 and aug_cv2 restated with those values, on a real record and its source files."""
  root, builders = built
  source = builders[2].as_data_source(split="train")
  record = next(source[i] for i in range(len(source)) if source[i]["id"] == b"teapot03_m01_l.png")
  prompts = augment.make_prompts(tokenizer, 2)
  rng = _ScriptedRng(12, 0, RES, 3, 0, 240, (5, 9), 0, 17, 0, (-20, 33))
  out = augment.stage2_example(record["image"], record["mask"][:, :, 0], record["box"], rng, prompts, RES)
  assert not rng.draws

  image, seg = _official_stage2_crop(root, "teapot03_m01_l.png", _official_bbox(root, "teapot03_m01_l.png"), 12)
  pixels = (np.array(Image.fromarray(image).resize((RES, RES), Image.BICUBIC)) / 127.5 - 1.0).astype(np.float32)
  obj = cv2.resize(image * (seg / 255), (224, 224), interpolation=cv2.INTER_CUBIC).astype("uint8")
  ref = cv2.resize(image, (224, 224), interpolation=cv2.INTER_CUBIC)
  mask = cv2.resize(seg, (224, 224), interpolation=cv2.INTER_NEAREST).astype("uint8")
  obj = cv2.resize(obj, (240, 240), interpolation=cv2.INTER_CUBIC)[5:229, 9:233]
  mask = cv2.resize(mask, (240, 240), interpolation=cv2.INTER_NEAREST)[5:229, 9:233]
  rotation = cv2.getRotationMatrix2D((112, 112), 17, 1)
  shift = np.float32([[1, 0, -20], [0, 1, 33]])
  for matrix in (rotation, shift):
    obj = cv2.warpAffine(obj, matrix, (224, 224), flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(mask, matrix, (224, 224), flags=cv2.INTER_NEAREST)
  norm = lambda x: ((x.astype(np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD))  # noqa: E731
  np.testing.assert_array_equal(out["pixel_values"], pixels)
  np.testing.assert_array_equal(out["mask_values"], np.ones((RES // 8, RES // 8, 1), np.float32))
  np.testing.assert_array_equal(out["pixel_values_clip"], norm(ref))
  np.testing.assert_array_equal(out["pixel_values_obj"], norm(obj))
  # train_local.py's F.interpolate(seg, (16, 16), 'nearest') reads rows and columns 0, 14, 28, ... of channel 0.
  np.testing.assert_array_equal(out["token_mask"], (mask[::14, ::14, 0] / np.float32(255)).reshape(256))
  np.testing.assert_array_equal(out["input_ids"], prompts.ids[("a", 3)])
  assert out["index"] == prompts.index[("a", 3)] == 5  # "ahe photo of a S"


# ---------------------------------------------------------------------------------------------------------------------
# Loader.


def _check_batch(batch, stage, batch_size):
  lo = (0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD) - 1e-5
  hi = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD) + 1e-5
  expected = {"pixel_values": ((RES, RES, 3), np.float32), "pixel_values_clip": ((224, 224, 3), np.float32),
              "input_ids": ((77,), np.int32), "index": ((), np.int32), "record": ((), np.int32)}
  if stage == 2:
    expected |= {"pixel_values_obj": ((224, 224, 3), np.float32), "token_mask": ((256,), np.float32),
                 "mask_values": ((RES // 8, RES // 8, 1), np.float32)}
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == (batch_size,) + shape and batch[key].dtype == dtype, key
  assert np.abs(batch["pixel_values"]).max() <= 1.0
  for key in ("pixel_values_clip", "pixel_values_obj") if stage == 2 else ("pixel_values_clip",):
    assert (batch[key] >= lo).all() and (batch[key] <= hi).all(), key
  assert ((batch["index"] >= 0) & (batch["index"] < 77)).all()
  for b in range(batch_size):  # no sample of zeros (the official loader's error value)
    assert np.abs(batch["pixel_values"][b]).max() > 0 and batch["pixel_values_clip"][b].std() > 0
  if stage == 2:
    assert set(np.unique(batch["token_mask"])) <= {0.0, 1.0}
    assert set(np.unique(batch["mask_values"])) <= {0.0, 1.0}


@pytest.mark.parametrize("stage", [1, 2])
def test_loader_batches(built, tokenizer, stage):
  builder = built[1][stage]
  with make_loader(builder, tokenizer=tokenizer, batch_size=3, resolution=RES, seed=1, process_index=0,
                   process_count=1) as loader:
    for batch in _take(loader, 3):
      _check_batch(batch, stage, 3)
    assert loader.skipped == 0 and loader.position == 9
  # By name from data_dir, with the whitespace index; same stream whatever the thread count.
  by_name = make_loader(f"open_images_elite/stage{stage}", data_dir=builder.data_dir_root, tokenizer=tokenizer,
                        batch_size=3, resolution=RES, seed=1, process_index=0, process_count=1, read_threads=1)
  again = make_loader(builder, tokenizer=tokenizer, batch_size=3, resolution=RES, seed=1, process_index=0,
                      process_count=1, read_threads=3)
  _assert_same(_take(by_name, 2), _take(again, 2))
  by_name.close()
  again.close()
  with pytest.raises(InputError, match="stage"):
    make_loader(builder, tokenizer=tokenizer, batch_size=2, stage=3 - stage, process_index=0, process_count=1)
  with pytest.raises(InputError, match="resolution"):
    make_loader(builder, tokenizer=tokenizer, batch_size=2, resolution=60, process_index=0, process_count=1)


def test_loader_order_determinism_and_epochs(built, tokenizer):
  builder = built[1][1]
  n = len(builder.as_data_source(split="train"))

  def records_of(seed, count):
    with make_loader(builder, tokenizer=tokenizer, batch_size=1, resolution=RES, seed=seed, process_index=0,
                     process_count=1) as loader:
      return np.concatenate([b["record"] for b in _take(loader, count)])

  order = records_of(5, 4 * n).reshape(4, n)
  for epoch in order:
    assert sorted(epoch) == list(range(n))
  assert len({tuple(e) for e in order}) > 1  # another order each epoch
  np.testing.assert_array_equal(records_of(5, 2 * n), order[:2].ravel())
  assert not np.array_equal(records_of(6, n), order[0])


@pytest.mark.parametrize("per_host,micro", [(1, 1), (4, 2)])
def test_loader_two_hosts(built, tokenizer, per_host, micro):
  """Two hosts' batches, concatenated micro-batch by micro-batch in process order, are the single host's batches."""
  builder = built[1][2]
  n = len(builder.as_data_source(split="train"))
  kwargs = dict(tokenizer=tokenizer, resolution=RES, seed=2, micro_batches=micro)
  single = make_loader(builder, **kwargs, batch_size=2 * per_host, process_index=0, process_count=1)
  hosts = [make_loader(builder, **kwargs, batch_size=per_host, process_index=h, process_count=2) for h in (0, 1)]
  steps = max(2, n // per_host)
  stream, per_host_batches = _take(single, steps), [_take(h, steps) for h in hosts]
  m = per_host // micro
  for s in range(steps):
    for a in range(micro):
      joined = {k: np.concatenate([per_host_batches[h][s][k][a * m:(a + 1) * m] for h in (0, 1)])
                for k in stream[s]}
      _assert_same([joined], [{k: v[2 * a * m:2 * (a + 1) * m] for k, v in stream[s].items()}])
  assert sorted(np.concatenate([b["record"] for b in stream])[:n]) == list(range(n))  # an epoch: every record
  # the hosts' slots: disjoint, and together every slot
  slots = [hosts[h].layout.slot(i) for h in (0, 1) for i in range(steps * per_host)]
  assert sorted(slots) == list(range(2 * steps * per_host))
  for loader in [single] + hosts:
    loader.close()
  assert hosts[1].get_state() == hosts[0].get_state() == single.get_state()  # the state is the run's, not a host's


def test_loader_exact_resume(built, tokenizer):
  kwargs = dict(tokenizer=tokenizer, batch_size=2, resolution=RES, seed=7, process_index=0, process_count=1)
  first = make_loader(built[1][2], **kwargs)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  assert state["slots"] == 6 and state["format"] == "elite_jax.loader/2"
  expected = _take(first, 2)
  resumed = make_loader(built[1][2], **{**kwargs, "batch_size": 1})
  resumed.set_state(state)
  got = _take(resumed, 4)
  _assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(got[::2], got[1::2])], expected)
  assert resumed.get_state() == first.get_state()
  with pytest.raises(InputError, match="seed 7"):
    make_loader(built[1][2], **{**kwargs, "seed": 8}).set_state(state)
  first.close()
  resumed.close()


def test_loader_skips_a_corrupt_record(built, tokenizer, monkeypatch):
  """A record that fails is skipped and counted; its slot takes a substitute record, every other slot is the clean
  stream's, sample for sample."""
  builder = built[1][1]
  raw = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  bad = raw[1]["image"]
  kwargs = dict(tokenizer=tokenizer, batch_size=2, resolution=RES, seed=3, process_index=0, process_count=1)
  clean = make_loader(builder, **kwargs)
  clean_batches = _take(clean, 8)
  decode = records.decode_png

  def failing(data, channels):
    if data == bad:
      raise ValueError("corrupt PNG")
    return decode(data, channels)

  monkeypatch.setattr(records, "decode_png", failing)
  loader = make_loader(builder, **kwargs)
  batches = _take(loader, 8)
  stream = np.concatenate([b["record"] for b in clean_batches])
  got = np.concatenate([b["record"] for b in batches])
  hit = stream == 1
  # each slot of record 1 failed at least once (a substitute, drawn at random, may be record 1 again)
  assert hit.sum() >= 2 and loader.skipped >= hit.sum()
  assert (got[hit] != 1).all()  # substitutes
  for j in np.flatnonzero(~hit):
    for k in batches[0]:
      np.testing.assert_array_equal(batches[j // 2][k][j % 2], clean_batches[j // 2][k][j % 2])
  for batch in batches:
    _check_batch(batch, 1, 2)
  assert loader.get_state()["skipped"] == loader.skipped
  clean.close()
  loader.close()


def test_loader_all_records_failing_raises(built, tokenizer, monkeypatch):
  def failing(data, channels):
    raise ValueError("corrupt PNG")

  monkeypatch.setattr(records, "decode_png", failing)
  monkeypatch.setattr(loader_lib, "MAX_CONSECUTIVE_SKIPS", 12)
  with make_loader(built[1][1], tokenizer=tokenizer, batch_size=2, resolution=RES, process_index=0,
                   process_count=1) as loader:
    with pytest.raises(RuntimeError, match="12 records in a row failed"):
      next(loader)


@pytest.mark.full
def test_loader_worker_processes(built, tokenizer):
  """grain worker processes give the same stream as threads alone, and the state moves between the two."""
  kwargs = dict(tokenizer=tokenizer, batch_size=2, resolution=RES, seed=4, process_index=0, process_count=1)
  with make_loader(built[1][2], **kwargs) as threads:
    expected = _take(threads, 4)
  with make_loader(built[1][2], **kwargs, worker_count=2) as workers:
    _assert_same(_take(workers, 2), expected[:2])
    state = workers.get_state()
  with make_loader(built[1][2], **kwargs) as resumed:
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), expected[2:])
