"""Each image encoder's own preprocessing, as transformers' (PIL-backed) image processors compute it.

``ImageProcessorConfig`` holds what a ``preprocessor_config.json`` says (resize to a shortest edge or to a fixed
size with a PIL filter, centre crop, rescale, normalise); without the file, the family's transformers defaults
(``FAMILY_DEFAULTS``). ``process`` equals ``CLIPImageProcessorPil`` / ``BitImageProcessorPil`` (DINOv2) /
``SiglipImageProcessorPil`` to float32 rounding (tests/test_encoders.py). transformers 5's default
``AutoImageProcessor`` classes resize with torchvision instead of PIL, which rounds differently (~1/255).

Concept inputs (``concept_inputs``): CLIP ViT-L/14-shaped encoders keep ELITE's official preprocessing
(``preprocess.preprocess_concept``: a 224 px squash, what the official mappers were trained on); every other encoder
takes its processor's geometry, the object image (image x mask) the same, and the token mask follows the same resize
and crop down to the encoder's patch grid. Training batches come from ELITE's augmentation (224 px, CLIP-normalised);
``training_pixels`` re-normalises them for the encoder (and resizes them if it takes another size).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from elite_jax import preprocess
from elite_jax.errors import InputError
from elite_jax.models import encoders
from elite_jax.models.layers import torch_nearest_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  shortest_edge: int = 0  # resize so that the short side is this (aspect kept); 0: to (height, width)
  height: int = 224
  width: int = 224
  resample: int = 3  # PIL's codes: 2 bilinear, 3 bicubic
  do_resize: bool = True
  do_center_crop: bool = False
  crop_height: int = 224
  crop_width: int = 224
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = preprocess.CLIP_MEAN
  image_std: tuple[float, ...] = preprocess.CLIP_STD

  @classmethod
  def from_dict(cls, d: dict, base: "ImageProcessorConfig | None" = None) -> "ImageProcessorConfig":
    """From a preprocessor_config.json dict; keys it leaves out keep ``base``'s values."""
    out = dataclasses.asdict(base or cls())
    size = d.get("size")
    if isinstance(size, dict):
      if "shortest_edge" in size:
        out.update(shortest_edge=int(size["shortest_edge"]))
      elif "height" in size and "width" in size:
        out.update(shortest_edge=0, height=int(size["height"]), width=int(size["width"]))
      else:
        raise InputError(f"preprocessor config: unsupported size {size!r}")
    elif isinstance(size, int):
      out.update(shortest_edge=size)
    crop = d.get("crop_size")
    if isinstance(crop, dict):
      out.update(crop_height=int(crop["height"]), crop_width=int(crop["width"]))
    elif isinstance(crop, int):
      out.update(crop_height=crop, crop_width=crop)
    for key in ("resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize"):
      if key in d and d[key] is not None:
        out[key] = type(out[key])(d[key])
    for key in ("image_mean", "image_std"):
      if d.get(key) is not None:
        v = d[key]
        out[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    if int(out["resample"]) not in RESAMPLE:
      raise InputError(f"preprocessor config: unknown resample {out['resample']!r}")
    return cls(**out)

  @property
  def output_size(self) -> tuple[int, int]:
    if self.do_center_crop:
      return self.crop_height, self.crop_width
    if self.shortest_edge:
      raise InputError("a processor that resizes to a shortest edge without a centre crop has no fixed size")
    return self.height, self.width

  def resize_size(self, h: int, w: int) -> tuple[int, int]:
    """(height, width) after the resize (transformers' get_resize_output_image_size, default_to_square=False)."""
    if not self.do_resize:
      return h, w
    if not self.shortest_edge:
      return self.height, self.width
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(self.shortest_edge * long / short)
    return (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)

  def geometry(self, image: np.ndarray, resample: int) -> np.ndarray:
    """The resize and centre crop of an (H, W, C) uint8 array, with PIL filter ``resample``."""
    h, w = self.resize_size(*image.shape[:2])
    if (h, w) != image.shape[:2]:
      image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample=RESAMPLE[resample]))
    if self.do_center_crop:
      ch, cw = self.crop_height, self.crop_width
      if ch > h or cw > w:
        raise InputError(f"image of {w}x{h} after resizing is smaller than the {cw}x{ch} crop")
      top, left = (h - ch) // 2, (w - cw) // 2
      image = image[top:top + ch, left:left + cw]
    return image

  def process(self, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (h, w, 3) float32, as the transformers processor (PIL backend)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
      raise InputError(f"image must be a non-empty (H, W, 3) uint8 RGB array, got shape {image.shape} {image.dtype}")
    x = self.geometry(image, self.resample)
    if self.do_rescale:
      x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
    else:
      x = x.astype(np.float32)
    if self.do_normalize:
      x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return x


def family_defaults(family: str, image_size: int) -> ImageProcessorConfig:
  """transformers' processor defaults for a family at the encoder's input size (no preprocessor_config.json)."""
  if family == "clip":  # CLIPImageProcessor
    return ImageProcessorConfig(shortest_edge=image_size, do_center_crop=True, crop_height=image_size,
                                crop_width=image_size)
  if family == "dinov2":  # BitImageProcessor as facebook/dinov2-* configure it: 256 then a 224 crop
    return ImageProcessorConfig(shortest_edge=int(round(image_size * 256 / 224)), do_center_crop=True,
                                crop_height=image_size, crop_width=image_size, image_mean=IMAGENET_MEAN,
                                image_std=IMAGENET_STD)
  if family == "siglip":  # SiglipImageProcessor
    return ImageProcessorConfig(height=image_size, width=image_size, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  raise InputError(f"unknown image encoder family {family!r}; expected one of {encoders.FAMILIES}")


def read_config(folder: Path, family: str, image_size: int) -> ImageProcessorConfig:
  """The folder's preprocessor_config.json over the family's defaults."""
  base = family_defaults(family, image_size)
  path = Path(folder) / "preprocessor_config.json"
  if not path.is_file():
    return base
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"not a valid JSON file: {path} ({e})") from None
  return ImageProcessorConfig.from_dict(d, base)


def uses_elite_preprocessing(encoder) -> bool:
  """CLIP encoders of ViT-L/14's geometry (224 px, 16x16 patches) take ELITE's official concept preprocessing."""
  return encoders.family(encoder) == "clip" and encoders.input_size(encoder) == preprocess.CLIP_SIZE and \
      encoders.grid(encoder) == preprocess.TOKEN_GRID


def concept_inputs(encoder, processor: ImageProcessorConfig | None, image: np.ndarray,
                   mask: np.ndarray | None = None) -> preprocess.ConceptInputs:
  """The mappers' inputs of one concept image for ``encoder`` (see the module docstring); ``processor`` None: the
  family's defaults."""
  if uses_elite_preprocessing(encoder):
    return preprocess.preprocess_concept(image, mask)
  processor = processor or family_defaults(encoders.family(encoder), encoders.input_size(encoder))
  size, g = encoders.input_size(encoder), encoders.grid(encoder)
  if processor.output_size != (size, size):
    raise InputError(f"the image processor makes {processor.output_size[1]}x{processor.output_size[0]} images but "
                     f"the image encoder takes {size}x{size}")
  pixels = processor.process(image)
  if mask is None:
    return preprocess.ConceptInputs(pixels, None, None)
  mask = np.asarray(mask)
  if mask.ndim == 2:
    mask = mask[:, :, None]
  if mask.ndim != 3 or mask.shape[2] not in (1, 3) or mask.shape[:2] != image.shape[:2]:
    raise InputError(f"mask must be (H, W[, 1 or 3]) of the image's size, got shape {mask.shape}")
  fg = np.broadcast_to(mask > 0, image.shape)
  if not fg.any():
    raise InputError("mask is empty (no pixel > 0)")
  obj = processor.process(np.where(fg, image, np.uint8(0)))
  m = processor.geometry(np.ascontiguousarray(fg[:, :, 0]).astype(np.uint8) * 255, 0)  # nearest, same geometry
  grid_mask = preprocess.torch_nearest_resize(m > 0, (g, g))
  return preprocess.ConceptInputs(pixels, obj, grid_mask.reshape(g * g).astype(np.float32))


def training_pixels(encoder, processor: ImageProcessorConfig | None, pixels: jax.Array) -> jax.Array:
  """ELITE's 224 px CLIP-normalised training crops -> the encoder's normalisation and size (identity for CLIP L/14)."""
  if uses_elite_preprocessing(encoder):
    return pixels
  processor = processor or family_defaults(encoders.family(encoder), encoders.input_size(encoder))
  mean, std = jnp.asarray(processor.image_mean, jnp.float32), jnp.asarray(processor.image_std, jnp.float32)
  x = pixels.astype(jnp.float32) * jnp.asarray(preprocess.CLIP_STD) + jnp.asarray(preprocess.CLIP_MEAN)
  size = encoders.input_size(encoder)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "cubic")
  return ((x - mean) / std).astype(pixels.dtype)


def training_token_mask(encoder, token_mask: jax.Array) -> jax.Array:
  """The augmentation's 16x16 token mask (B, 256) -> the encoder's grid, nearest (identity at 16)."""
  g = encoders.grid(encoder)
  side = int(round(token_mask.shape[1] ** 0.5))
  if g == side:
    return token_mask
  m = token_mask.reshape(-1, side, side)
  rows = jnp.asarray(torch_nearest_indices(side, g))
  m = jnp.take(jnp.take(m, rows, axis=1), rows, axis=2)
  return m.reshape(-1, g * g)
