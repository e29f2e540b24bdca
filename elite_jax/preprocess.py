"""Inference inputs of one concept image, computed exactly as the official ``CustomDatasetWithBG`` (spec 6.3).

- The image is squashed (no crop) to 224x224 with PIL BICUBIC and CLIP-normalised: ``pixel_values_clip``.
- The same on ``image * mask``: ``pixel_values_obj``, the local mapper's input.
- The mask, binarised with ``> 0``, resized with PyTorch's legacy nearest to 128x128 (the dataset) and then to 16x16
  (the validation code), channel 0, row-major: ``token_mask``, which zeroes background tokens of the local mapper.

Deviations from the official code, all on inputs it mishandles: EXIF orientation is applied (the official code shows
the model the sensor orientation); greyscale and palette masks are accepted (the official code needs a 3-channel mask);
16-bit greyscale images are scaled to 8 bits (PIL's ``convert("RGB")`` clips them to 255, i.e. almost white).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from elite_jax.errors import InputError
from elite_jax.models.layers import torch_nearest_indices

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224  # CLIP ViT-L/14 input
SEG_SIZE = 128  # the official dataset's mask size
TOKEN_GRID = 16  # 224 / 14 patches per side


class ConceptInputs(NamedTuple):
  """What the mappers need from one concept image (NHWC without the batch axis; a NamedTuple is a jax pytree)."""

  pixel_values_clip: np.ndarray  # (224, 224, 3) float32, CLIP-normalised whole image
  pixel_values_obj: np.ndarray | None  # (224, 224, 3) float32, CLIP-normalised image * mask; None without a mask
  token_mask: np.ndarray | None  # (256,) float32 in {0, 1}, 16x16 row-major; None without a mask


def load_image(path: str | os.PathLike) -> np.ndarray:
  """(H, W, 3) uint8 RGB of any image PIL reads, EXIF orientation applied.

  As the official code, non-RGB images go through PIL's ``convert("RGB")``: an alpha channel is dropped (the hidden
  colours show, nothing is composited over white), greyscale and palette images become grey / palette colours.
  """
  img = _open(path, "image")
  if img.mode.startswith("I;16"):
    # 16 bits per pixel: scale to 8 (PIL's convert would clip every value above 255 to white).
    grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.array(img)


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
  """(H, W, 3) bool foreground mask (pixel > 0 per channel, as the official ``np.where(mask > 0, 1, 0)``).

  Kept per channel because the official code multiplies each image channel by the same channel of the mask; greyscale
  and 1-bit masks give three identical channels, palette masks their palette colours. A mask with an alpha channel is
  accepted only when fully opaque (otherwise it is unclear whether the colour or the alpha is the mask). ``size`` is
  the image's (height, width); the mask must match it.
  """
  img = _open(path, "mask")
  if img.mode in ("RGBA", "LA", "PA"):
    alpha = np.asarray(img.getchannel("A"))
    if alpha.min() < 255:
      raise InputError(f"mask has transparent pixels, so it is ambiguous: {path} (save it as greyscale or RGB)")
    img = img.convert("L" if img.mode == "LA" else "RGB")
  if img.mode in ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
    arr = np.asarray(img)[:, :, None]
  else:
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
  mask = np.broadcast_to(arr > 0, arr.shape[:2] + (3,)).copy()
  if size is not None and mask.shape[:2] != tuple(size):
    raise InputError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {size[1]}x{size[0]}")
  if not mask.any():
    raise InputError(f"mask is empty (no pixel > 0): {path}")
  return mask


def control_image(image: str | os.PathLike | np.ndarray, height: int, width: int,
                  ) -> tuple[np.ndarray, tuple[int, int] | None]:
  """A ControlNet's conditioning image as diffusers' pipeline prepares it (``VaeImageProcessor`` with
  ``do_convert_rgb=True, do_normalize=False``): RGB, resized to (height, width) with PIL's Lanczos when its size
  differs, scaled to [0, 1].

  ``image``: a path (read by ``load_image``, EXIF orientation applied), an (H, W, 3) uint8 array, or an (H, W, 3)
  float array already in [0, 1] at the output size. Returns (pixels (height, width, 3) float32, the original
  (h, w) when it was resized, else None).
  """
  if not isinstance(image, np.ndarray):
    image = load_image(image)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    raise InputError(f"control image must be (H, W, 3) RGB, got shape {image.shape}")
  if image.dtype != np.uint8:
    if image.shape[:2] != (height, width) or not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
      raise InputError(f"a float control image must be in [0, 1] at the output size {width}x{height}, got "
                       f"{image.shape[1]}x{image.shape[0]}")
    return image.astype(np.float32), None
  original = None
  if image.shape[:2] != (height, width):
    original = image.shape[:2]
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), resample=Image.LANCZOS))
  return image.astype(np.float32) / np.float32(255), original


def ip_image(image: str | os.PathLike | np.ndarray) -> np.ndarray:
  """IP-Adapter's image input as its ``CLIPImageProcessor()`` makes it: shortest side to 224 (PIL bicubic, the long
  side truncated), centre crop 224 x 224, CLIP-normalised. (224, 224, 3) float32."""
  if not isinstance(image, np.ndarray):
    image = load_image(image)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    raise InputError(f"IP-Adapter image must be a non-empty (H, W, 3) uint8 RGB array, got shape {image.shape} "
                     f"{image.dtype}")
  h, w = image.shape[:2]
  short, long = min(h, w), max(h, w)
  new_long = int(CLIP_SIZE * long / short)
  size = (CLIP_SIZE, new_long) if w <= h else (new_long, CLIP_SIZE)  # (width, height)
  resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, resample=Image.BICUBIC))
  top, left = (resized.shape[0] - CLIP_SIZE) // 2, (resized.shape[1] - CLIP_SIZE) // 2
  return clip_normalize(resized[top:top + CLIP_SIZE, left:left + CLIP_SIZE])


def clip_normalize(x: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``, with torchvision's ToTensor + Normalize float32 rounding."""
  t = x.astype(np.float32) / np.float32(255)
  return (t - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def torch_nearest_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(H, W, ...) -> (h, w, ...) with ``F.interpolate(mode='nearest')``'s legacy indexing, floor(dst * in / out)."""
  rows = torch_nearest_indices(x.shape[0], size[0])
  cols = torch_nearest_indices(x.shape[1], size[1])
  return x[rows][:, cols]


def preprocess_concept(image: np.ndarray, mask: np.ndarray | None = None) -> ConceptInputs:
  """CLIP inputs and the 16x16 token mask of one concept image, bit-exact with the official inference dataset.

  ``image``: (H, W, 3) uint8 RGB (``load_image``). ``mask``: None, or (H, W) / (H, W, 1) / (H, W, 3) of any dtype,
  foreground where > 0 (``load_mask``).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    raise InputError(f"image must be a non-empty (H, W, 3) uint8 RGB array, got shape {image.shape} {image.dtype}")
  clip = clip_normalize(_pil_bicubic(image, CLIP_SIZE))
  if mask is None:
    return ConceptInputs(clip, None, None)
  mask = np.asarray(mask)
  if mask.ndim == 2:
    mask = mask[:, :, None]
  if mask.ndim != 3 or mask.shape[2] not in (1, 3):
    raise InputError(f"mask must be (H, W), (H, W, 1) or (H, W, 3), got shape {mask.shape}")
  if mask.shape[:2] != image.shape[:2]:
    raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                     f"{image.shape[1]}x{image.shape[0]}")
  mask = np.broadcast_to(mask > 0, image.shape)
  if not mask.any():
    raise InputError("mask is empty (no pixel > 0)")
  # Official: (image * {0,1}).astype(uint8), i.e. background pixels set to 0.
  obj = clip_normalize(_pil_bicubic(np.where(mask, image, np.uint8(0)), CLIP_SIZE))
  # Official: mask -> 128x128 in the dataset, -> 16x16 at the pipeline, channel 0, flattened row-major.
  grid = torch_nearest_resize(torch_nearest_resize(mask, (SEG_SIZE, SEG_SIZE)), (TOKEN_GRID, TOKEN_GRID))
  token_mask = grid[:, :, 0].reshape(TOKEN_GRID * TOKEN_GRID).astype(np.float32)
  return ConceptInputs(clip, obj, token_mask)


def _pil_bicubic(image: np.ndarray, size: int) -> np.ndarray:
  # PIL's BICUBIC (a = -0.5, antialiased when shrinking), not cv2's or jax's: the official 224 px inputs use it.
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), resample=Image.BICUBIC))


def _open(path: str | os.PathLike, what: str) -> Image.Image:
  """Opens and decodes an image file with its EXIF orientation applied; InputError for anything unreadable."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise InputError(f"{what} not found: {path}")
  if os.path.isdir(path):
    raise InputError(f"{what} is a directory, not an image file: {path}")
  try:
    with Image.open(path) as img:
      img.load()
      return ImageOps.exif_transpose(img)
  except Image.UnidentifiedImageError:
    raise InputError(f"not an image file: {path}") from None
  except Image.DecompressionBombError:
    raise InputError(f"image is too large (over PIL's decompression-bomb limit): {path}") from None
  except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, struct.error...
    raise InputError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from None
