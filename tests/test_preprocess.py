"""elite_jax.preprocess: bit-exact parity with the official inference inputs on real photographs, formats, errors.

The reference below restates ``CustomDatasetWithBG.__getitem__`` (datasets.py) and the validation step that takes the
mask to 16x16 (train_local.py), with PIL and torch; torchvision's ToTensor/Normalize are restated as torchvision 0.14+
computes them (torchvision is not a dependency).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elite_jax.errors import InputError
from elite_jax.preprocess import (CLIP_MEAN, CLIP_STD, ConceptInputs, clip_normalize, load_image, load_mask,
                                  preprocess_concept, torch_nearest_resize)

DATA = Path(__file__).parent / "data" / "dreambench"
PHOTOS = sorted(DATA.glob("dog/*.jpg")) + sorted(DATA.glob("teapot/*.jpg"))


# ---------------------------------------------------------------------------------------------------------------------
# The official pipeline, restated.


def _to_tensor(pic: Image.Image) -> torch.Tensor:
  """torchvision.transforms.ToTensor on an 8-bit PIL image."""
  img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
  img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
  img = img.permute((2, 0, 1)).contiguous()
  return img.to(dtype=torch.get_default_dtype()).div(255)


def _normalize(tensor: torch.Tensor) -> torch.Tensor:
  """torchvision.transforms.Normalize(CLIP_MEAN, CLIP_STD) (F.normalize, inplace=False)."""
  tensor = tensor.clone()
  mean = torch.as_tensor(CLIP_MEAN, dtype=tensor.dtype).view(-1, 1, 1)
  std = torch.as_tensor(CLIP_STD, dtype=tensor.dtype).view(-1, 1, 1)
  return tensor.sub_(mean).div_(std)


def official_inputs(image_path, mask_path=None):
  """(pixel_values_clip, pixel_values_obj, token mask) as HWC / flat numpy, as the official code computes them."""
  image = Image.open(image_path)
  if not image.mode == "RGB":
    image = image.convert("RGB")
  image_np = np.array(image)
  ref_image = Image.fromarray(image_np.astype("uint8")).resize((224, 224), resample=Image.Resampling.BICUBIC)
  clip = _normalize(_to_tensor(ref_image))
  if mask_path is None:
    return clip.permute(1, 2, 0).numpy(), None, None
  mask = np.array(Image.open(mask_path))
  mask = np.where(mask > 0, 1, 0)
  object_tensor = image_np * mask
  ref_object = Image.fromarray(object_tensor.astype("uint8")).resize((224, 224), resample=Image.Resampling.BICUBIC)
  obj = _normalize(_to_tensor(ref_object))
  seg = _to_tensor(Image.fromarray(mask.astype("uint8") * 255))
  seg = F.interpolate(seg.unsqueeze(0), size=(128, 128), mode="nearest").squeeze(0)
  # train_local.py validation: F.interpolate(pixel_values_seg, (16, 16), 'nearest')[:, 0].reshape(B, -1, 1)
  tokens = F.interpolate(seg.unsqueeze(0), (16, 16), mode="nearest")[:, 0].reshape(1, -1, 1)
  return clip.permute(1, 2, 0).numpy(), obj.permute(1, 2, 0).numpy(), tokens[0, :, 0].numpy()


def ours(image_path, mask_path=None) -> ConceptInputs:
  image = load_image(image_path)
  mask = None if mask_path is None else load_mask(mask_path, image.shape[:2])
  return preprocess_concept(image, mask)


def _assert_parity(got: ConceptInputs, want) -> None:
  clip, obj, tokens = want
  assert got.pixel_values_clip.dtype == np.float32 and got.pixel_values_clip.shape == (224, 224, 3)
  assert np.array_equal(got.pixel_values_clip, clip)  # bit-exact: max |diff| == 0
  if obj is None:
    assert got.pixel_values_obj is None and got.token_mask is None
    return
  assert got.pixel_values_obj.dtype == np.float32 and got.pixel_values_obj.shape == (224, 224, 3)
  assert np.array_equal(got.pixel_values_obj, obj)
  assert got.token_mask.dtype == np.float32 and got.token_mask.shape == (256,)
  assert np.array_equal(got.token_mask, tokens)
  assert set(np.unique(got.token_mask)) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic masks.


def _soft_ellipse(h: int, w: int, cx=0.5, cy=0.55, rx=0.32, ry=0.38) -> np.ndarray:
  """(h, w) uint8 with a soft edge (values 1..254 too), so binarisation at > 0 matters."""
  y, x = np.mgrid[0:h, 0:w]
  r = np.sqrt(((x + 0.5) / w - cx) ** 2 / rx ** 2 + ((y + 0.5) / h - cy) ** 2 / ry ** 2)
  return np.clip((1.05 - r) * 2000, 0, 255).astype(np.uint8)


def _save_rgb_mask(path: Path, grey: np.ndarray) -> Path:
  Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(path)
  return path


def _photo(tmp_path: Path, src: Path, size: tuple[int, int], fmt: str = "jpg") -> Path:
  """The photo squashed to size = (W, H), saved as a new file (the original file when the size is unchanged)."""
  img = Image.open(src)
  if img.size == size and fmt == "jpg":
    return src
  path = tmp_path / f"{src.parent.name}_{src.stem}_{size[0]}x{size[1]}.{fmt}"
  img.resize(size, Image.Resampling.BICUBIC).save(path, quality=93)
  return path


# ---------------------------------------------------------------------------------------------------------------------
# Parity.


# (W, H): the originals, non-square, heights that are not multiples of 16 or 128, small, exactly 224.
SIZES = [(512, 512), (399, 396), (300, 517), (640, 203), (183, 183), (224, 224), (97, 130), (275, 275), (384, 250),
         (242, 418)]


@pytest.mark.parametrize("i", range(len(PHOTOS)))
def test_parity_real_photos(tmp_path, i):
  size = SIZES[i % len(SIZES)]
  image_path = _photo(tmp_path, PHOTOS[i], size)
  mask_path = _save_rgb_mask(tmp_path / "m_bg.png", _soft_ellipse(size[1], size[0], cx=0.4 + 0.04 * i))
  _assert_parity(ours(image_path, mask_path), official_inputs(image_path, mask_path))
  _assert_parity(ours(image_path), official_inputs(image_path))


def test_photos_are_there():
  assert len(PHOTOS) == 10
  assert (DATA / "LICENSE").exists() and (DATA / "references_and_licenses.txt").exists()
  assert (DATA / "prompts_and_classes.txt").exists()


@pytest.mark.parametrize("fmt", ["rgba_png", "L_png", "L_jpg", "P_png", "LA_png", "rgb_png"])
def test_image_formats(tmp_path, fmt):
  src = Image.open(PHOTOS[3]).resize((333, 251), Image.Resampling.BICUBIC)
  rng = np.random.default_rng(0)
  mode, ext = fmt.split("_")
  if mode == "rgba":
    # Random alpha: the official convert("RGB") drops it (no compositing), so the colours must come back unchanged.
    img = Image.fromarray(np.dstack([np.array(src), rng.integers(0, 256, (251, 333), dtype=np.uint8)]))
  elif mode == "P":
    img = src.quantize(64)
  elif mode == "LA":
    img = src.convert("LA")
  else:
    img = src.convert(mode.upper())
  path = tmp_path / f"img.{ext}"
  img.save(path)
  loaded = load_image(path)
  assert loaded.dtype == np.uint8 and loaded.shape == (251, 333, 3)
  assert np.array_equal(loaded, np.array(Image.open(path).convert("RGB")))
  if mode in ("rgba", "rgb"):
    assert np.array_equal(loaded, np.array(src))
  mask_path = _save_rgb_mask(tmp_path / "m.png", _soft_ellipse(251, 333))
  _assert_parity(ours(path, mask_path), official_inputs(path, mask_path))


def test_16bit_png_is_scaled(tmp_path):
  # Deviation from the official convert("RGB"), which clips 16-bit values to 255.
  grey = np.array(Image.open(PHOTOS[0]).convert("L").resize((120, 90)), dtype=np.uint16) * 257
  path = tmp_path / "g16.png"
  Image.fromarray(grey).save(path)
  assert Image.open(path).mode == "I;16"
  loaded = load_image(path)
  assert loaded.shape == (90, 120, 3) and loaded.dtype == np.uint8
  assert np.array_equal(loaded[:, :, 0], grey // 257) and np.array_equal(loaded[:, :, 0], loaded[:, :, 2])


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation(tmp_path, orientation, k):
  upright = np.array(Image.open(PHOTOS[1]).resize((300, 400)))  # (H, W) = (400, 300)
  stored = np.ascontiguousarray(np.rot90(upright, -k))  # what a camera writes before tagging the orientation
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = tmp_path / "exif.jpg"
  Image.fromarray(stored).save(path, exif=exif, quality=95)
  raw = np.array(Image.open(path))  # the decoded pixels in sensor orientation
  loaded = load_image(path)
  assert np.array_equal(loaded, np.rot90(raw, k))
  assert loaded.shape == upright.shape
  assert np.abs(loaded.astype(int) - upright).mean() < 4  # it is the upright photo again (up to JPEG loss)
  # The mask path applies the orientation too, so a mask drawn on the upright view lines up.
  m = _soft_ellipse(400, 300)
  Image.fromarray(np.ascontiguousarray(np.rot90(m, -k))).save(tmp_path / "m.png", exif=exif)
  assert np.array_equal(load_mask(tmp_path / "m.png", loaded.shape[:2])[:, :, 0], m > 0)


def test_mask_formats(tmp_path):
  size = (347, 229)  # (W, H)
  image_path = _photo(tmp_path, PHOTOS[7], size)
  grey = _soft_ellipse(229, 347)
  want = official_inputs(image_path, _save_rgb_mask(tmp_path / "rgb.png", grey))
  # Greyscale, 1-bit, palette and opaque RGBA masks are read as the RGB mask with the same pixels.
  Image.fromarray(grey).save(tmp_path / "l.png")
  Image.fromarray(grey > 0).save(tmp_path / "one.png")
  # Index 0 is white: the palette colour counts, not the index.
  pal = Image.frombytes("P", (347, 229), (grey == 0).astype(np.uint8).tobytes())
  pal.putpalette([255, 255, 255, 0, 0, 0])
  pal.save(tmp_path / "p.png")
  Image.fromarray(np.dstack([np.repeat(grey[:, :, None], 3, 2), np.full_like(grey, 255)])).save(tmp_path / "a.png")
  Image.fromarray(np.dstack([grey, np.full_like(grey, 255)])).save(tmp_path / "la.png")
  for name in ["l.png", "one.png", "p.png", "a.png", "la.png"]:
    mask = load_mask(tmp_path / name, (229, 347))
    assert mask.dtype == bool and mask.shape == (229, 347, 3)
    _assert_parity(ours(image_path, tmp_path / name), want)
  # preprocess_concept takes (H, W) and (H, W, 1) masks of any dtype as well.
  image = load_image(image_path)
  _assert_parity(preprocess_concept(image, grey), want)
  _assert_parity(preprocess_concept(image, (grey > 0)[:, :, None]), want)
  # An RGB mask whose channels differ: each image channel uses its own mask channel, the tokens use channel 0.
  rgb = np.dstack([grey, _soft_ellipse(229, 347, cx=0.6), _soft_ellipse(229, 347, ry=0.2)])
  Image.fromarray(rgb).save(tmp_path / "rgb_diff.png")
  _assert_parity(ours(image_path, tmp_path / "rgb_diff.png"), official_inputs(image_path, tmp_path / "rgb_diff.png"))


def test_clip_normalize_all_values():
  x = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
  want = _normalize(_to_tensor(Image.fromarray(x))).permute(1, 2, 0).numpy()
  got = clip_normalize(x)
  assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("src,dst", [((396, 399), (128, 128)), ((128, 128), (16, 16)), ((517, 300), (128, 128)),
                                     ((7, 5), (16, 16)), ((8, 8), (16, 16)), ((224, 224), (16, 16)),
                                     ((203, 640), (37, 11))])
def test_torch_nearest_resize(src, dst):
  x = np.random.default_rng(0).standard_normal(src + (3,)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="nearest")[0].permute(1, 2, 0)
  assert np.array_equal(torch_nearest_resize(x, dst), want.numpy())
  assert np.array_equal(torch_nearest_resize(x[:, :, 0], dst), want.numpy()[:, :, 0])


# ---------------------------------------------------------------------------------------------------------------------
# Errors.


def test_errors(tmp_path):
  image_path = _photo(tmp_path, PHOTOS[0], (300, 200))
  image = load_image(image_path)
  (tmp_path / "notes.txt").write_text("not an image\n")
  with pytest.raises(InputError, match="not found: .*missing.jpg"):
    load_image(tmp_path / "missing.jpg")
  with pytest.raises(InputError, match="not an image file: .*notes.txt"):
    load_image(tmp_path / "notes.txt")
  with pytest.raises(InputError, match="directory"):
    load_image(tmp_path)
  data = image_path.read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
  with pytest.raises(InputError, match="cut.jpg"):
    load_image(tmp_path / "cut.jpg")
  with pytest.raises(InputError, match="not found: .*missing_bg.png"):
    load_mask(tmp_path / "missing_bg.png", (200, 300))
  with pytest.raises(InputError, match="not an image file: .*notes.txt"):
    load_mask(tmp_path / "notes.txt")
  _save_rgb_mask(tmp_path / "big.png", _soft_ellipse(512, 512))
  with pytest.raises(InputError, match=r"big.png is 512x512 \(WxH\) but the image is 300x200"):
    load_mask(tmp_path / "big.png", image.shape[:2])
  _save_rgb_mask(tmp_path / "empty.png", np.zeros((200, 300), np.uint8))
  with pytest.raises(InputError, match="empty.*empty.png"):
    load_mask(tmp_path / "empty.png", image.shape[:2])
  alpha = np.dstack([np.full((200, 300, 3), 255, np.uint8), _soft_ellipse(200, 300)])
  Image.fromarray(alpha).save(tmp_path / "cutout.png")
  with pytest.raises(InputError, match="transparent.*cutout.png"):
    load_mask(tmp_path / "cutout.png", image.shape[:2])
  # preprocess_concept checks arrays too.
  with pytest.raises(InputError, match="mask is 512x512 .* image is 300x200"):
    preprocess_concept(image, np.ones((512, 512), bool))
  with pytest.raises(InputError, match="empty"):
    preprocess_concept(image, np.zeros((200, 300, 3), np.uint8))
  with pytest.raises(InputError, match="uint8"):
    preprocess_concept(image.astype(np.float32), None)
  with pytest.raises(InputError, match="uint8"):
    preprocess_concept(image[:, :, :2], None)
  with pytest.raises(InputError, match="shape"):
    preprocess_concept(image, np.ones((200, 300, 2), bool))
