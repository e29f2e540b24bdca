"""The evaluation's reports: results.json, results.md (per subject and overall, with every setting) and image grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

GRID_CELL = 256  # grid thumbnails are at most this many pixels a side
RANDOM_NOTE = "RANDOM WEIGHTS: tiny untrained models; the images are noise and the scores mean nothing"


def image_grid(images: Sequence[np.ndarray], rows: int, cols: int, labels: Sequence[str] | None = None,
               cell: int = GRID_CELL) -> Image.Image:
  """A PIL image: ``rows`` x ``cols`` thumbnails (row-major ``images``), each row labelled on the left if given."""
  if len(images) != rows * cols:
    raise ValueError(f"{len(images)} images do not fill {rows} x {cols}")
  h, w = images[0].shape[:2]
  scale = min(1.0, cell / max(h, w))
  th, tw = max(1, round(h * scale)), max(1, round(w * scale))
  label_w = 240 if labels else 0
  grid = Image.new("RGB", (label_w + cols * tw, rows * th), "white")
  draw = ImageDraw.Draw(grid)
  for i, im in enumerate(images):
    r, c = divmod(i, cols)
    grid.paste(Image.fromarray(np.asarray(im)).resize((tw, th), Image.BICUBIC), (label_w + c * tw, r * th))
  for r, label in enumerate(labels or []):
    lines = _wrap(label, 38)
    for j, line in enumerate(lines[: max(1, th // 12)]):
      draw.text((4, r * th + 4 + 12 * j), line, fill="black")
  return grid


def _wrap(label: str, width: int) -> list[str]:
  lines, line = [], ""
  for word in label.split():
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return lines + [line] if line else lines


METRICS = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I"))


def write_reports(output: Path, results: dict) -> None:
  """results.json and results.md in ``output``."""
  (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (output / "results.md").write_text(markdown_report(results))


def markdown_report(results: dict) -> str:
  lines = ["# ELITE on DreamBench: CLIP-T, CLIP-I, DINO-I", ""]
  if results["random_weights"]:
    lines += [f"**{RANDOM_NOTE}.**", ""]
  lines += ["| setting | value |", "|---|---|"]
  for k, v in results["settings"].items():
    lines.append(f"| {k} | {'-' if v is None else v} |")
  lines += ["", "| subject | class | reference | CLIP-T | CLIP-I | DINO-I |", "|---|---|---|---|---|---|"]
  for name, r in results["subjects"].items():
    lines.append(f"| {name} | {r['class']} | {r['reference']} | " + " | ".join(f"{r[k]:.4f}" for k, _ in METRICS)
                 + " |")
  m = results["mean"]
  lines.append(f"| **mean** ({len(results['subjects'])} subjects) | | | "
               + " | ".join(f"**{m[k]:.4f}**" for k, _ in METRICS) + " |")
  lines += ["", "CLIP-T: mean cosine similarity of CLIP image and text embeddings, the prompt without the placeholder "
            "word. CLIP-I / DINO-I: mean cosine similarity over all (generated, real photo) pairs of the subject, "
            "every real photo included. The mean weighs subjects equally.", ""]
  return "\n".join(lines)
