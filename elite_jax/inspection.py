"""What a concept's words encode, and where they act in the images they make.

- ``word_report``: for each mapper word (w0 first), its norm and its nearest vocabulary tokens by cosine in the text
  encoder's token-embedding table, the table whose row the words replace at the placeholder (spec 2.3).
- ``inspect``: images and their attention maps from one ``ElitePipeline.generate(..., attention_maps=True)`` call, the
  same sampling loop that makes the images. Per image and latent resolution (h, w):
  ``w0``: the probability of w0's token in the text attention, a = A[:, :, s_b] of spec 3.3 (global branch,
  conditional pass); ``local``: the weight of the local attention's output, lambda * M with M = a / max(a), the factor
  by which spec 3.3 adds ``(M * softmax(Q Kl^T / sqrt(d))) Vl``. Each is averaged over heads, over the attn2 layers of
  that resolution (down, mid and up blocks) and over the denoising steps.
- ``maps_figure``: an image with its maps as heat-map overlays beside it; ``write``: the files ``elite-inspect``
  writes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from elite_jax.concept import Concept
from elite_jax.options import GenerationOptions

TOP_K = 5  # nearest tokens listed per word
KINDS = (("w0", "w0 attention"), ("local", "local weight"))
OVERLAY = 0.6  # share of the heat map in an overlay (over the image in grey)
MIN_PANEL, MAX_PANEL = 128, 512  # side of a figure's panels, in pixels


@dataclasses.dataclass(frozen=True)
class WordReport:
  """One mapper word: its index (0 = w0), its norm, and the nearest tokens as (token, id, cosine), nearest first."""
  index: int
  norm: float
  neighbours: tuple[tuple[str, int, float], ...]


@dataclasses.dataclass(frozen=True)
class Inspection:
  """What ``inspect`` found: the images (prompt-major), their maps (``ElitePipeline.generate``'s layout), the words."""
  prompts: list[str]
  images: np.ndarray
  maps: dict[str, dict[tuple[int, int], np.ndarray]]
  words: list[WordReport]
  vocabulary_norm: float  # the median norm of the token-embedding table's rows, to compare the words' norms with
  options: GenerationOptions

  def maps_of(self, i: int) -> dict[str, dict[tuple[int, int], np.ndarray]]:
    """Image ``i``'s maps, (h, w) each."""
    return {kind: {res: m[i] for res, m in per_res.items()} for kind, per_res in self.maps.items()}


# ---------------------------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------------------------

def token_table(pipe: Any) -> np.ndarray:
  """The text encoder's token-embedding table (vocabulary, width), float32."""
  return np.asarray(pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"], np.float32)


def nearest_tokens(words: np.ndarray, table: np.ndarray, tokenizer: Any, top_k: int = TOP_K) -> list[WordReport]:
  """For each row of ``words`` (K, C): its norm and the ``top_k`` rows of ``table`` (V, C) nearest by cosine."""
  words, table = np.asarray(words, np.float32), np.asarray(table, np.float32)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = unit(words) @ unit(table).T  # (K, V)
  out = []
  for i, row in enumerate(cos):
    ids = np.argsort(-row, kind="stable")[:top_k]
    tokens = tokenizer.convert_ids_to_tokens([int(t) for t in ids])
    out.append(WordReport(i, float(np.linalg.norm(words[i])),
                          tuple((tok, int(t), float(row[t])) for tok, t in zip(tokens, ids))))
  return out


def word_report(pipe: Any, concept: Concept, top_k: int = TOP_K) -> list[WordReport]:
  """Every word of ``concept`` (w0 first) against the pipeline's vocabulary."""
  return nearest_tokens(np.asarray(concept.words[0], np.float32), token_table(pipe), pipe.sd.tokenizer, top_k)


def vocabulary_norm(pipe: Any) -> float:
  return float(np.median(np.linalg.norm(token_table(pipe), axis=-1)))


def format_words(words: Sequence[WordReport], vocab_norm: float | None = None) -> str:
  """A Markdown table: word, norm, nearest tokens with their cosines."""
  lines = ["| word | norm | nearest tokens (cosine) |", "|---|---|---|"]
  for w in words:
    near = ", ".join(f"`{tok}` {cos:.3f}" for tok, _, cos in w.neighbours)
    lines.append(f"| w{w.index} | {w.norm:.3f} | {near} |")
  if vocab_norm is not None:
    lines += ["", f"Median norm of a vocabulary token: {vocab_norm:.3f}."]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------------------------

def inspect(pipe: Any, concept: Concept, prompts: str | Sequence[str], options: GenerationOptions | None = None, *,
            top_k: int = TOP_K, progress: Any = True, **changes: Any) -> Inspection:
  """Images, their attention maps and the word report, from one ``generate`` call (``options`` and ``changes`` as
  there)."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  opts = pipe.options(options, **changes)
  images, maps = pipe.generate(concept, prompts, opts, progress=progress, attention_maps=True)
  return Inspection(prompts, images, maps, word_report(pipe, concept, top_k), vocabulary_norm(pipe), opts)


def heat_overlay(image: np.ndarray, m: np.ndarray) -> np.ndarray:
  """Map ``m`` (h, w) as a heat map (inferno) over ``image`` (H, W, 3) uint8 in grey: bilinearly resized to the
  image and scaled by its own maximum (so each panel spans the colours; the labels give the maximum)."""
  h, w = image.shape[:2]
  m = np.asarray(m, np.float32)
  peak = float(m.max())
  scaled = m / peak if peak > 0 else m
  big = np.asarray(Image.fromarray(scaled).resize((w, h), Image.BILINEAR))
  heat = cv2.applyColorMap(np.clip(np.round(big * 255), 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
  grey = np.asarray(Image.fromarray(image).convert("L"), np.float32)[..., None]
  return np.round((1 - OVERLAY) * grey + OVERLAY * heat.astype(np.float32)).astype(np.uint8)


def maps_figure(image: np.ndarray, maps: dict[str, dict[tuple[int, int], np.ndarray]], title: str = "") -> Image.Image:
  """One row: the image, then each map (w0 at each resolution, then the local weight) over it, labelled."""
  panels = [(image, "image")]
  for kind, name in KINDS:
    for (h, w), m in maps.get(kind, {}).items():
      panels.append((heat_overlay(image, m), f"{name} {h}x{w}, max {float(np.max(m)):.3g}"))
  side = int(np.clip(max(image.shape[:2]), MIN_PANEL, MAX_PANEL))
  scale = side / max(image.shape[:2])
  pw, ph = round(image.shape[1] * scale), round(image.shape[0] * scale)
  font = _font(12)
  top, label = (18 if title else 0), 34
  fig = Image.new("RGB", (pw * len(panels), top + ph + label), "white")
  draw = ImageDraw.Draw(fig)
  if title:
    draw.text((4, 2), title, fill="black", font=font)
  for j, (panel, text) in enumerate(panels):
    fig.paste(Image.fromarray(panel).resize((pw, ph), Image.BICUBIC), (j * pw, top))
    for k, line in enumerate(_split_label(text)):
      draw.text((j * pw + 3, top + ph + 2 + 15 * k), line, fill="black", font=font)
  return fig


def write(result: Inspection, output: str | Path, *, note: str = "") -> list[Path]:
  """``output``/: image_I.png, image_I_maps.png (the figure), maps.npz (w0_HxW, local_HxW: (N, h, w)), words.md and
  words.json. Returns the paths written."""
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  paths = []
  per_prompt = len(result.images) // len(result.prompts)
  for i, img in enumerate(result.images):
    Image.fromarray(img).save(output / f"image_{i}.png")
    title = f"{result.prompts[i // per_prompt]}  (image {i})" + (f"  {note}" if note else "")
    maps_figure(img, result.maps_of(i), title).save(output / f"image_{i}_maps.png")
    paths += [output / f"image_{i}.png", output / f"image_{i}_maps.png"]
  np.savez(output / "maps.npz", **{f"{kind}_{h}x{w}": m for kind, per_res in result.maps.items()
                                   for (h, w), m in per_res.items()})
  (output / "words.md").write_text((f"**{note}**\n\n" if note else "") +
                                   format_words(result.words, result.vocabulary_norm) + "\n")
  (output / "words.json").write_text(json.dumps({
      "words": [{"word": f"w{w.index}", "norm": w.norm,
                 "nearest": [{"token": t, "id": i, "cosine": c} for t, i, c in w.neighbours]} for w in result.words],
      "vocabulary_median_norm": result.vocabulary_norm, "prompts": result.prompts,
      "options": result.options.record(), "note": note}, indent=2) + "\n")
  return paths + [output / "maps.npz", output / "words.md", output / "words.json"]


def _split_label(text: str) -> list[str]:
  head, _, tail = text.partition(", ")
  return [head, tail] if tail else [head]


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()
