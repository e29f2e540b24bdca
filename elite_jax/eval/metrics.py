"""CLIP-T, CLIP-I and DINO-I (spec 9): the models' preprocessing, batched jitted features, the scores.

- **Features.** CLIP ViT-B/32 image and text embeddings (``CLIPModel.get_image_features`` / ``get_text_features``,
  the projected pooled outputs) and the DINO ViT-S/16 CLS token after the final layer norm; all L2-normalised.
- **Preprocessing, as the models' authors do it** (torchvision on PIL images, restated with PIL + numpy, bit-exact):
  CLIP ``Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize(CLIP mean/std)`` (openai/CLIP's ``_transform``);
  DINO ``Resize(256, interpolation=3 = BICUBIC), CenterCrop(224), ToTensor, Normalize(ImageNet mean/std)`` (DINO's
  eval transform). Textual Inversion's ``clip_eval.py``, which ELITE's authors used, applies the CLIP resize to
  [-1, 1] tensors instead (torch bicubic, no antialiasing): scores from the saved PNGs differ from it slightly.
- **Scores**, as Textual Inversion's ``clip_eval.py`` computes them: CLIP-T is the mean cosine similarity between each
  generated image and the text of its own prompt with the placeholder word removed (``strip_placeholder``: 'a S dog
  in the jungle' -> 'a dog in the jungle'); CLIP-I and DINO-I are the mean cosine similarity over all (generated,
  real) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from elite_jax import text, tiny
from elite_jax.errors import InputError
from elite_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig
from elite_jax.models.vit import ViTConfig, ViTModel
from elite_jax.preprocess import CLIP_MEAN, CLIP_STD
from elite_jax.types import Params
from elite_jax.weights import pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE_RATIO = 256 / 224  # DINO's eval: Resize(256) then CenterCrop(224)
# DINO's ViTs use LayerNorm(eps=1e-6); the hub conversions (facebook/dino-vits16) left transformers' default 1e-12 in
# config.json. We follow torch.hub's dino_vits16, the model ELITE's authors name (cosines move by ~1e-6 at most).
DINO_LAYER_NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------

def resize_center_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """torchvision ``Resize(resize, BICUBIC)`` then ``CenterCrop(crop)`` on a PIL image: (crop, crop, 3) uint8.

  Resize scales the shorter side to ``resize`` and the longer to ``int(resize * long / short)`` (truncated), with
  PIL's antialiased bicubic; the crop offsets are Python's ``round`` (half to even) of half the excess.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
    raise InputError(f"image must be a non-empty (H, W, 3) uint8 RGB array, got shape {image.shape} {image.dtype}")
  if crop > resize:
    raise InputError(f"crop {crop} is larger than the resized side {resize}")
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize, int(resize * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  pil = Image.fromarray(np.ascontiguousarray(image))
  if (new_w, new_h) != (w, h):  # torchvision returns the image untouched when it has the size already
    pil = pil.resize((new_w, new_h), resample=Image.BICUBIC)
  top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
  return np.asarray(pil.crop((left, top, left + crop, top + crop)))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 -> float32 ``(x / 255 - mean) / std``, with torchvision's ToTensor + Normalize float32 rounding."""
  t = image.astype(np.float32) / np.float32(255)
  return (t - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_pixels(image: np.ndarray, size: int = 224) -> np.ndarray:
  """openai/CLIP's preprocess: (size, size, 3) float32, NHWC without the batch axis."""
  return normalize(resize_center_crop(image, size, size), CLIP_MEAN, CLIP_STD)


def dino_pixels(image: np.ndarray, size: int = 224) -> np.ndarray:
  """DINO's eval transform (Resize(256), CenterCrop(224), ImageNet normalisation), scaled to ``size``."""
  return normalize(resize_center_crop(image, int(round(size * DINO_RESIZE_RATIO)), size), IMAGENET_MEAN,
                   IMAGENET_STD)


# ---------------------------------------------------------------------------------------------------------------
# Scores: pure functions of embeddings
# ---------------------------------------------------------------------------------------------------------------

def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length (float64)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, M) cosine similarities between the rows of a (N, D) and b (M, D)."""
  return l2_normalize(a) @ l2_normalize(b).T


def clip_t_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
  """Mean cosine similarity of paired rows: image i with the text of its own prompt (text_embeds[i])."""
  image_embeds, text_embeds = np.asarray(image_embeds), np.asarray(text_embeds)
  if image_embeds.shape != text_embeds.shape:
    raise ValueError(f"CLIP-T pairs each image with its prompt: shapes {image_embeds.shape} and {text_embeds.shape}")
  return float(np.mean(np.sum(l2_normalize(image_embeds) * l2_normalize(text_embeds), axis=-1)))


def image_similarity(generated: np.ndarray, real: np.ndarray) -> float:
  """CLIP-I / DINO-I: mean cosine similarity over all (generated, real) pairs."""
  return float(np.mean(cosine_matrix(generated, real)))


def strip_placeholder(prompt: str, placeholder: str) -> str:
  """The prompt for CLIP-T: every space-separated word equal to the placeholder dropped, single spaces.

  'a S dog in the jungle' -> 'a dog in the jungle' (as Textual Inversion's clip_eval removes its '*').
  """
  return " ".join(w for w in prompt.split() if w != placeholder)


# ---------------------------------------------------------------------------------------------------------------
# Feature extraction: jitted, batched with padding to a few fixed sizes
# ---------------------------------------------------------------------------------------------------------------

# Float32 matmuls and convolutions at full precision: on GPUs XLA's default takes reduced-precision (TF32-like) passes,
# which moved single cosines by up to 2e-4 (subject means by up to 5e-5) against the CPU on an H200, real-size B/32
# and ViT-S/16 with random weights; "highest" brought that to 3e-7. The metric models are small next to generation.
METRIC_PRECISION = "highest"


@functools.partial(jax.jit, static_argnums=0)
def _clip_image(module: CLIPModel, params: Params, pixels: jax.Array) -> jax.Array:
  with jax.default_matmul_precision(METRIC_PRECISION):
    return module.apply({"params": params}, pixels, method=CLIPModel.get_image_features)


@functools.partial(jax.jit, static_argnums=0)
def _clip_text(module: CLIPModel, params: Params, ids: jax.Array) -> jax.Array:
  with jax.default_matmul_precision(METRIC_PRECISION):
    return module.apply({"params": params}, ids, method=CLIPModel.get_text_features)


@functools.partial(jax.jit, static_argnums=0)
def _dino(module: ViTModel, params: Params, pixels: jax.Array) -> jax.Array:
  with jax.default_matmul_precision(METRIC_PRECISION):
    return module.apply({"params": params}, pixels, method=ViTModel.cls_features)


def _batched(fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over the rows of ``inputs`` in batches padded to a power of two (at most ``batch_size``): few compilations."""
  n = len(inputs)
  size = min(batch_size, 1 << max(n - 1, 0).bit_length())
  out = []
  for s in range(0, n, size):
    chunk = inputs[s:s + size]
    pad = size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)], axis=0)
    out.append(np.asarray(fn(chunk), np.float32)[:size - pad])
  return np.concatenate(out, axis=0)


@dataclasses.dataclass
class MetricModels:
  """CLIP (with its tokenizer) and DINO, as Flax modules and parameters; features come out L2-normalised."""
  clip: CLIPModel
  clip_params: Params
  tokenizer: Any
  dino: ViTModel
  dino_params: Params
  clip_name: str = "openai/clip-vit-base-patch32"
  dino_name: str = "facebook/dino-vits16"
  random: bool = False  # tiny random models (offline checks): the scores mean nothing
  batch_size: int = 32

  def clip_image_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, projection_dim) float64, unit rows, from (H, W, 3) uint8 images."""
    size = self.clip.vision.image_size
    pixels = np.stack([clip_pixels(im, size) for im in images])
    return l2_normalize(_batched(functools.partial(_clip_image, self.clip, self.clip_params), pixels,
                                 self.batch_size))

  def clip_text_features(self, texts: Sequence[str]) -> np.ndarray:
    """(N, projection_dim) float64, unit rows; the texts are tokenised to 77 tokens (truncated), as CLIP's."""
    ids = text.tokenize(self.tokenizer, list(texts))
    return l2_normalize(_batched(functools.partial(_clip_text, self.clip, self.clip_params), ids, self.batch_size))

  def dino_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, hidden) float64, unit rows: DINO's CLS feature."""
    size = self.dino.config.image_size
    pixels = np.stack([dino_pixels(im, size) for im in images])
    return l2_normalize(_batched(functools.partial(_dino, self.dino, self.dino_params), pixels, self.batch_size))

  @property
  def description(self) -> dict:
    return {"clip_model": self.clip_name, "dino_model": self.dino_name,
            "dino_layer_norm_eps": self.dino.config.layer_norm_eps, "random_metric_models": self.random}


def load_metric_models(clip: str = "openai/clip-vit-base-patch32", dino: str = "facebook/dino-vits16",
                       batch_size: int = 32) -> MetricModels:
  """Both metric models from local folders or hub ids, in float32; DINO with LayerNorm eps 1e-6 as torch.hub's."""
  clip_folder = pretrained.resolve(clip)
  clip_module, clip_params = pretrained.load_clip(clip_folder)
  tokenizer = pretrained.load_tokenizer(clip_folder)
  dino_module, dino_params = pretrained.load_dino(pretrained.resolve(dino), layer_norm_eps=DINO_LAYER_NORM_EPS)
  put = lambda p: jax.tree.map(jnp.asarray, p)
  return MetricModels(clip_module, put(clip_params), tokenizer, dino_module, put(dino_params), clip_name=str(clip),
                      dino_name=str(dino), batch_size=batch_size)


def random_metric_models(seed: int = 0, batch_size: int = 32) -> MetricModels:
  """RANDOM WEIGHTS: a tiny CLIP shaped like ViT-B/32 (224 px, 32 px patches, legacy EOS pooling) and a tiny DINO-like
  ViT (224 px, 16 px patches), built in memory with the tiny tokenizer of ``elite_jax.tiny``. For offline checks."""
  tokenizer = tiny.tokenizer()
  text_cfg = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, eos_token_id=2, projection_dim=16)
  vis_cfg = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, projection_dim=16)
  clip = CLIPModel(text_cfg, vis_cfg, projection_dim=16)
  dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
  rng = np.random.default_rng(seed)
  clip_params = tiny.random_params(clip.param_shapes(), rng)
  dino_params = tiny.random_params(dino.param_shapes(), rng)
  return MetricModels(clip, clip_params, tokenizer, dino, dino_params, clip_name="RANDOM tiny CLIP (B/32-shaped)",
                      dino_name="RANDOM tiny DINO ViT (S/16-shaped)", random=True, batch_size=batch_size)
