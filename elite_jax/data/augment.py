"""The official training-time transforms (spec 4.3, 5.2, 5.3; datasets.py), restated with numpy, cv2 and PIL.

Every random draw comes from the ``np.random.Generator`` passed in, so a sample is a pure function of (record, rng).
The draws have the official distributions, not its random streams (it mixes ``random``, ``np.random`` and
albumentations' own state).

- Text: ``caption + template.format(placeholder)[1:]`` with a random template of ``TEMPLATES`` (datasets.py:259-260;
  "the photo of a S" becomes "ahe photo of a S", as officially). Stage 1's caption is "a"; stage 2's comes from
  ``custom_aug``.
- Stage 1: ``pixel_values`` is the crop squashed to res x res with cv2 INTER_CUBIC in [-1, 1]; ``pixel_values_clip``
  goes through albumentations 1.3.0's chain (``clip_augment``) and CLIP normalisation.
- Stage 2: a random padding 10..19 (``records.padded_crop``), ``custom_aug`` (scale, caption, valid-latent mask),
  the unaugmented crop for CLIP, and the masked crop plus its mask through ``aug_cv2`` for the local mapper.

Images are float32 NHWC without the batch axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from elite_jax import text as text_lib
from elite_jax.data import records
from elite_jax.errors import InputError
from elite_jax.preprocess import CLIP_SIZE, TOKEN_GRID, clip_normalize, torch_nearest_resize

TEMPLATES = (  # imagenet_templates_small, datasets.py:17-45
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
FAR_CAPTIONS = ("a far away", "very small")
NEAR_CAPTIONS = ("zoomed in", "close up")
CAPTIONS = {1: ("a",), 2: FAR_CAPTIONS + NEAR_CAPTIONS + ("a",)}
INDEX_MODES = text_lib.INDEX_MODES


def prompt_text(template: str, caption: str, placeholder: str) -> str:
  """The official training text: the template's first character replaced by the caption (datasets.py:259-260)."""
  return caption + template.format(placeholder)[1:]


@dataclasses.dataclass(frozen=True)
class Prompts:
  """``input_ids`` (77,) int32 and the placeholder index of every (caption, template) text of a stage, tokenised
  once (so no tokenizer travels to the loader's workers)."""

  ids: dict[tuple[str, int], np.ndarray]
  index: dict[tuple[str, int], int]

  def draw(self, rng: np.random.Generator, caption: str) -> tuple[np.ndarray, np.ndarray]:
    key = (caption, int(rng.integers(len(TEMPLATES))))
    return self.ids[key], np.int32(self.index[key])


def make_prompts(tokenizer, stage: int, placeholder: str = "S", placeholder_index: str = "whitespace") -> Prompts:
  """Tokenises every training text of ``stage``.

  ``placeholder_index``: "whitespace" (the official rule, spec 2.2: wrong where a word before the placeholder is
  several tokens, e.g. "close-up") or "token" (the placeholder's own token).
  """
  if placeholder_index not in INDEX_MODES:
    raise InputError(f"placeholder_index must be one of {INDEX_MODES}, got {placeholder_index!r}")
  if not placeholder or " " in placeholder:
    raise InputError(f"placeholder must be one word, got {placeholder!r}")
  keys = [(c, t) for c in CAPTIONS[stage] for t in range(len(TEMPLATES))]
  texts = [prompt_text(TEMPLATES[t], c, placeholder) for c, t in keys]
  ids = text_lib.tokenize(tokenizer, texts)
  index = {}
  for key, text in zip(keys, texts):
    if placeholder_index == "token":
      found = text_lib.token_index(tokenizer, text, placeholder)
      if found is None:
        raise InputError(f"the placeholder {placeholder!r} is not a token of its own in the training text {text!r}")
      index[key] = found
    else:
      index[key] = text_lib.whitespace_index(text, placeholder)
  return Prompts({k: ids[i] for i, k in enumerate(keys)}, index)


# ---------------------------------------------------------------------------------------------------------------------
# What a sample holds.


def example_spec(stage: int, resolution: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of one training sample of ``stage`` (what ``stage1_example``/``stage2_example`` return;
  the loader stacks them into batches and adds ``record``)."""
  f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
  spec = {"pixel_values": ((resolution, resolution, 3), f32), "pixel_values_clip": ((CLIP_SIZE, CLIP_SIZE, 3), f32),
          "input_ids": ((text_lib.MAX_LENGTH,), i32), "index": ((), i32)}
  if stage == 2:
    spec.update(pixel_values_obj=((CLIP_SIZE, CLIP_SIZE, 3), f32), token_mask=((TOKEN_GRID * TOKEN_GRID,), f32),
                mask_values=((resolution // 8, resolution // 8, 1), f32))
  return spec


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1.


def stage1_example(crop: np.ndarray, rng: np.random.Generator, prompts: Prompts, resolution: int) -> dict:
  """One stage-1 sample of an (H, W, 3) uint8 crop (datasets.py:279-312)."""
  input_ids, index = prompts.draw(rng, "a")
  return {
      "pixel_values": diffusion_target(crop, resolution),
      "pixel_values_clip": clip_normalize(clip_augment(crop, rng)),
      "input_ids": input_ids,
      "index": index,
  }


def diffusion_target(image: np.ndarray, resolution: int) -> np.ndarray:
  """cv2 INTER_CUBIC squash to res x res, then /127.5 - 1 in float32 (datasets.py:245-250)."""
  img = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_CUBIC)
  return img.astype(np.float32) / 127.5 - 1.0


def clip_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """albumentations 1.3.0's ``Compose([Resize(224, 224), HorizontalFlip(), Rotate(limit=20), Blur(p=.3),
  ElasticTransform(p=.3)])`` (datasets.py:184-190) on (H, W, 3) uint8, with each op's defaults; (224, 224, 3) uint8.
  """
  img = image
  if img.shape[:2] != (CLIP_SIZE, CLIP_SIZE):  # A.Resize returns the input unchanged at the target size
    img = cv2.resize(img, (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_LINEAR)
  if rng.random() < 0.5:  # HorizontalFlip(p=0.5)
    img = cv2.flip(img, 1)
  if rng.random() < 0.5:  # Rotate(limit=20): p=0.5, angle ~ U(-20, 20), linear, reflect-101, about the pixel centre
    angle = rng.uniform(-20.0, 20.0)
    h, w = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)
    img = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  if rng.random() < 0.3:  # Blur(p=0.3): box filter, kernel 3, 5 or 7
    k = int(rng.choice((3, 5, 7)))
    img = cv2.blur(img, (k, k))
  if rng.random() < 0.3:  # ElasticTransform(p=0.3): its own RandomState seeded with randint(0, 10000)
    img = elastic_transform(img, np.random.RandomState(int(rng.integers(0, 10001))))
  return img


def elastic_transform(img: np.ndarray, state: np.random.RandomState, alpha: float = 1.0, sigma: float = 50.0,
                      alpha_affine: float = 50.0) -> np.ndarray:
  """albumentations 1.3.0 ``F.elastic_transform`` (approximate=False), drawing from ``state`` in its order: a random
  affine warp of three points by U(-alpha_affine, alpha_affine), then a displacement field of uniform noise smoothed
  by a Gaussian (scipy's ``gaussian_filter``, restated by ``gaussian_filter`` here). Linear, reflect-101 borders."""
  height, width = img.shape[:2]
  center = np.array((height, width), dtype=np.float32) // 2
  size = min((height, width)) // 3
  pts1 = np.array([center + size, [center[0] + size, center[1] - size], center - size], dtype=np.float32)
  pts2 = pts1 + state.uniform(-alpha_affine, alpha_affine, size=pts1.shape).astype(np.float32)
  matrix = cv2.getAffineTransform(pts1, pts2)
  img = cv2.warpAffine(img, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
  dx = np.float32(gaussian_filter(state.rand(height, width) * 2 - 1, sigma) * alpha)
  dy = np.float32(gaussian_filter(state.rand(height, width) * 2 - 1, sigma) * alpha)
  x, y = np.meshgrid(np.arange(width), np.arange(height))
  map_x, map_y = np.float32(x + dx), np.float32(y + dy)
  return cv2.remap(img, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
  """``scipy.ndimage.gaussian_filter(x, sigma)`` of a 2-D float64 array (truncate 4, mode 'reflect'), as two matrix
  products (scipy is not a dependency)."""
  return _gaussian_matrix(x.shape[0], sigma) @ x @ _gaussian_matrix(x.shape[1], sigma).T


@functools.lru_cache(maxsize=8)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
  radius = int(4.0 * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 / (sigma * sigma) * offsets.astype(np.float64) ** 2)
  weights /= weights.sum()
  # scipy's 'reflect' extends d c b a | a b c d | d c b a, i.e. period 2n.
  src = (np.arange(n)[:, None] + offsets[None, :]) % (2 * n)
  src = np.where(src >= n, 2 * n - 1 - src, src)
  matrix = np.zeros((n, n))
  np.add.at(matrix, (np.repeat(np.arange(n), len(offsets)), src.ravel()), np.tile(weights, n))
  return matrix


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2.


def stage2_example(crop: np.ndarray, mask: np.ndarray, box: Sequence[int], rng: np.random.Generator,
                   prompts: Prompts, resolution: int) -> dict:
  """One stage-2 sample of a stored record: (H, W, 3) uint8 crop, (H, W) uint8 mask, tight box in the crop
  (datasets.py:483-527)."""
  image, seg = records.padded_crop(crop, mask, box, int(rng.choice(records.STAGE2_PADS)))
  pixel_values, mask_values, caption = custom_aug(image, rng, resolution)
  input_ids, index = prompts.draw(rng, caption)
  # Official: image * (seg / 255) in float64, cv2 cubic to 224, then astype(uint8), which wraps the cubic over- and
  # undershoots modulo 256 (numpy's float->uint8 cast on x86): kept, so the local mapper sees the same inputs.
  obj = cv2.resize(image * (seg[:, :, None] / 255), (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_CUBIC)
  obj = obj.astype(np.int64).astype(np.uint8)
  seg = cv2.resize(seg, (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_NEAREST)
  obj, seg = aug_cv2(obj, seg, rng)
  # train_local.py:619-620: F.interpolate(ToTensor(seg), (16, 16), 'nearest')[:, 0], row-major.
  grid = torch_nearest_resize(seg.astype(np.float32) / np.float32(255), (TOKEN_GRID, TOKEN_GRID))
  return {
      "pixel_values": pixel_values,
      "pixel_values_clip": clip_normalize(cv2.resize(image, (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_CUBIC)),
      "pixel_values_obj": clip_normalize(obj),
      "input_ids": input_ids,
      "index": index,
      "token_mask": grid.reshape(TOKEN_GRID * TOKEN_GRID),
      "mask_values": mask_values,
  }


def draw_scale(rng: np.random.Generator, resolution: int) -> int:
  """custom_aug's scale: U{res//3..res} with p 2/3, else U{int(1.2 res)..int(1.4 res)-1}; made even."""
  if rng.integers(0, 3) < 2:
    scale = int(rng.integers(resolution // 3, resolution + 1))
  else:
    scale = int(rng.integers(int(1.2 * resolution), int(1.4 * resolution)))
  return scale + 1 if scale % 2 == 1 else scale


def custom_aug(image: np.ndarray, rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, np.ndarray, str]:
  """datasets.py:396-443 ("borrowed from custom diffusion"): (pixel_values (res, res, 3) float32 in [-1, 1],
  mask_values (res/8, res/8, 1) float32, caption).

  - scale < 0.6 res: "a far away" / "very small"; the crop, PIL-bicubic resized to scale x scale, is pasted centred at
    a random (row, col) on a zero canvas (0 is mid-grey in [-1, 1], as officially); the valid-latent mask is 1 inside
    the pasted square less one latent on each side, 0 elsewhere.
  - scale > res: "zoomed in" / "close up"; resized to scale x scale and a random res x res window taken; mask all 1.
  - otherwise: "a"; resized to res x res; mask all 1.
  """
  pil = Image.fromarray(image)
  scale = draw_scale(rng, resolution)
  half, latent = scale // 2, resolution // 8
  mask = np.ones((latent, latent), np.float32)
  if scale < 0.6 * resolution:
    caption = FAR_CAPTIONS[int(rng.integers(2))]
    cx = int(rng.integers(half, resolution - half + 1))
    cy = int(rng.integers(half, resolution - half + 1))
    small = (np.asarray(pil.resize((scale, scale), resample=Image.BICUBIC)) / 127.5 - 1.0).astype(np.float32)
    out = np.zeros((resolution, resolution, 3), np.float32)
    out[cx - half:cx + half, cy - half:cy + half] = small
    mask[:] = 0
    mask[(cx - half) // 8 + 1:(cx + half) // 8 - 1, (cy - half) // 8 + 1:(cy + half) // 8 - 1] = 1
  elif scale > resolution:
    caption = NEAR_CAPTIONS[int(rng.integers(2))]
    cx = int(rng.integers(resolution // 2, scale - resolution // 2 + 1))
    cy = int(rng.integers(resolution // 2, scale - resolution // 2 + 1))
    big = (np.asarray(pil.resize((scale, scale), resample=Image.BICUBIC)) / 127.5 - 1.0).astype(np.float32)
    out = big[cx - resolution // 2:cx + resolution // 2, cy - resolution // 2:cy + resolution // 2]
  else:
    caption = "a"
    out = (np.asarray(pil.resize((resolution, resolution), resample=Image.BICUBIC)) / 127.5 - 1.0).astype(np.float32)
  return np.ascontiguousarray(out), mask[:, :, None], caption


def aug_cv2(img: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """datasets.py:445-480 on a (224, 224, 3) uint8 object crop and its (224, 224) uint8 mask, jointly: each with p 1/2,
  resize to U{224..256} (cubic / nearest) and a random 224 window; rotate by U{-30..30} degrees about (112, 112);
  translate by U{-60..60}^2 px. Black borders."""
  if rng.integers(2) == 0:
    size = int(rng.integers(224, 257))
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
    seg = cv2.resize(seg, (size, size), interpolation=cv2.INTER_NEAREST)
    sx, sy = (int(v) for v in rng.integers(0, size - 224 + 1, size=2))
    img, seg = img[sx:sx + 224, sy:sy + 224], seg[sx:sx + 224, sy:sy + 224]
  h, w = img.shape[:2]
  if rng.integers(2) == 0:
    matrix = cv2.getRotationMatrix2D((112, 112), float(rng.integers(-30, 31)), 1)
    img = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_CUBIC)
    seg = cv2.warpAffine(seg, matrix, (w, h), flags=cv2.INTER_NEAREST)
  if rng.integers(2) == 0:
    tx, ty = (int(v) for v in rng.integers(-60, 61, size=2))
    matrix = np.float32([[1, 0, tx], [0, 1, ty]])
    img = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_CUBIC)
    seg = cv2.warpAffine(seg, matrix, (w, h), flags=cv2.INTER_NEAREST)
  return np.ascontiguousarray(img), np.ascontiguousarray(seg)
