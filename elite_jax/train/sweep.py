"""A grid of short trainings on the same data and seed, compared on one held-out measure (``elite-sweep``).

A sweep config (configs/sweep_*.py) gives ``base``, a training config every run starts from (data, seed, mesh,
steps, validation), and ``grid``, a tuple of (axis, values): any dotted training-config key (``image_encoder``,
``mapper.hidden_dim``, ``mapper.depth``, ``stage``...) and two of its own:

- ``taps``: a tap scheme resolved at the encoder's depth L: "elite" (``encoders.default_taps``: L, L/6 .. 4/6 L),
  "spread" (L, L/5 .. 4/5 L), "deep" (L, L-1 .. L-4), or an explicit tuple of layer indices;
- ``words``: how many words (the first K taps of the scheme).

Stage-2 runs take the exported global mapper of the stage-1 run with the same other settings (which the grid must
hold). Every run trains in SWEEP/runs/<name> with the training loop (so it resumes from its checkpoints) and, done,
leaves result.json; a rerun skips finished runs. Results: SWEEP/results.csv and results.md (trainable parameters,
FLOPs per step from XLA's cost analysis, samples/s, training and held-out loss at ``eval_steps``) and two plots,
held-out loss against trainable parameters and against training compute (FLOPs/step x steps), as PNG.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from elite_jax.errors import InputError
from elite_jax.models import encoders
from elite_jax.train import config as config_lib
from elite_jax.weights import pretrained

TAP_SCHEMES = ("elite", "spread", "deep")
OWN_AXES = ("taps", "words")


def taps(scheme: str | Sequence[int], depth: int, words: int | None = None) -> tuple[int, ...]:
  """The tapped layers of ``scheme`` at an encoder of ``depth`` layers, cut to the first ``words``."""
  if isinstance(scheme, str):
    if scheme == "elite":
      t = encoders.default_taps(depth)
    elif scheme == "spread":
      t = (depth,) + tuple(int(round(k * depth / 5)) for k in range(1, 5))
    elif scheme == "deep":
      t = tuple(max(depth - k, 0) for k in range(5))
    else:
      raise InputError(f"sweep taps {scheme!r}: expected one of {TAP_SCHEMES} or a tuple of layer indices")
  else:
    t = tuple(int(x) for x in scheme)
  if words is not None:
    if not 1 <= int(words) <= len(t):
      raise InputError(f"sweep words={words}: the tap scheme {scheme!r} has {len(t)} layers")
    t = t[:int(words)]
  if max(t) > depth:
    raise InputError(f"sweep taps {t} reach past the image encoder's {depth} layers")
  return t


def encoder_depth(image_encoder: str) -> int:
  """Layers of an image encoder, from its config alone (nothing is loaded)."""
  if image_encoder.startswith("random-tiny-"):
    from elite_jax import tiny  # noqa: PLC0415
    return tiny.image_encoder(image_encoder[len("random-tiny-"):], with_params=False).config.num_hidden_layers
  cfg = pretrained.read_json(pretrained.resolve(image_encoder) / "config.json")
  return int(cfg.get("vision_config", cfg)["num_hidden_layers"])


def _set(cfg, key: str, value) -> None:
  node = cfg
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  node[last] = tuple(value) if isinstance(value, list) else value


def _get(cfg, key: str):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def _short(value) -> str:
  s = "-".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
  s = s.rsplit("/", 1)[-1].replace("random-tiny-", "tiny")
  return re.sub(r"[^A-Za-z0-9.-]+", "", s) or "x"


def _axis_name(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def plan(sweep) -> list[dict[str, Any]]:
  """Every run of the grid: {"name", "settings" (axis -> value), "config"}, stage-1 runs first."""
  grid = [(str(k), tuple(v)) for k, v in sweep.grid]
  if not grid:
    raise InputError("sweep config: grid is empty")
  for key, values in grid:
    if not values:
      raise InputError(f"sweep config: axis {key!r} has no values")
    if key not in OWN_AXES:
      try:
        _get(sweep.base, key)
      except (KeyError, AttributeError):
        raise InputError(f"sweep config: axis {key!r} is not a training config key (nor one of {OWN_AXES})") from None
  runs = []
  for combo in itertools.product(*[values for _, values in grid]):
    settings = dict(zip([k for k, _ in grid], combo))
    cfg = copy.deepcopy(sweep.base)
    cfg.unlock()
    for key, value in settings.items():
      if key not in OWN_AXES:
        _set(cfg, key, value)
    # Resolved here, so that the table says which layers each run read.
    depth = encoder_depth(str(cfg.image_encoder))
    scheme = settings.get("taps", tuple(cfg.mapper.tapped_layers) or "elite")
    cfg.mapper.tapped_layers = taps(scheme, depth, settings.get("words"))
    name = ",".join(f"{_axis_name(k)}={_short(v)}" for k, v in settings.items())
    runs.append({"name": name, "settings": settings, "config": cfg})
  names = {r["name"] for r in runs}
  if len(names) != len(runs):
    raise InputError("sweep config: two runs of the grid have the same name (repeated axis values?)")
  return sorted(runs, key=lambda r: int(r["config"].stage))


def _stage1_twin(run: dict, runs: list[dict]) -> dict:
  want = {k: v for k, v in run["settings"].items() if k != "stage"}
  for other in runs:
    if int(other["config"].stage) == 1 and {k: v for k, v in other["settings"].items() if k != "stage"} == want:
      return other
  raise InputError(f"sweep run {run['name']}: stage 2 needs a stage-1 run with the same settings in the grid")


def run_sweep(sweep, workdir: str | os.PathLike, *, train_fn=None) -> list[dict]:
  """Run (or resume) every run of the grid, then write the table and plots; returns the results."""
  from elite_jax.train.loop import train  # noqa: PLC0415 (the loop imports the whole training stack)
  train_fn = train_fn or train
  root = Path(workdir)
  (root / "runs").mkdir(parents=True, exist_ok=True)
  runs = plan(sweep)
  eval_steps = tuple(int(s) for s in sweep.eval_steps)
  results = []
  for run in runs:
    folder = root / "runs" / run["name"]
    done = folder / "result.json"
    if done.is_file():
      results.append(json.loads(done.read_text()))
      continue
    cfg = run["config"]
    if not cfg.data.data_dir:
      cfg.data.data_dir = str(root / "tfds")  # the records are built once for every run
    if int(cfg.stage) == 2:
      cfg.global_mapper = str(root / "runs" / _stage1_twin(run, runs)["name"] / "global_mapper.safetensors")
    config_lib.validate(cfg)
    if max(eval_steps) > cfg.num_train_steps:
      raise InputError(f"sweep eval_steps {eval_steps} go past num_train_steps={cfg.num_train_steps}")
    if cfg.validation.every == 0 or any(s % cfg.validation.every for s in eval_steps):
      raise InputError(f"sweep eval_steps {eval_steps} must be multiples of base.validation.every "
                       f"({cfg.validation.every}, which must be > 0)")
    print(f"sweep: {run['name']}", flush=True)
    train_fn(cfg, folder)
    result = _result(run, folder, eval_steps, cfg)
    if jax.process_index() == 0:
      done.write_text(json.dumps(result))
    results.append(result)
  if jax.process_index() == 0:
    write_outputs(results, root, eval_steps, random_weights=sweep.base.pretrained == "random-tiny")
  return results


def _result(run: dict, folder: Path, eval_steps: tuple[int, ...], cfg) -> dict:
  stats = json.loads((folder / "step_stats.json").read_text())
  records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
  by_step = {r["step"]: r for r in records}
  rates = [r["samples_per_sec"] for r in records if "samples_per_sec" in r][1:] or \
      [r["samples_per_sec"] for r in records if "samples_per_sec" in r]
  out = {"name": run["name"], "settings": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in run["settings"].items()},
         "tapped_layers": list(cfg.mapper.tapped_layers), "stage": int(cfg.stage),
         "trainable_params": int(stats["trainable_params"]), "flops_per_step": float(stats["flops"]),
         "samples_per_sec": float(np.median(rates)) if rates else float("nan"), "steps": int(cfg.num_train_steps)}
  for s in eval_steps:
    r = by_step.get(s, {})
    out[f"train_loss@{s}"] = r.get("loss", float("nan"))
    out[f"val_loss@{s}"] = r.get("val_loss", float("nan"))
  return out


def write_outputs(results: list[dict], root: Path, eval_steps: tuple[int, ...], *, random_weights: bool) -> None:
  cols = ["name", "stage", "tapped_layers", "trainable_params", "flops_per_step", "samples_per_sec"]
  cols += [f"train_loss@{s}" for s in eval_steps] + [f"val_loss@{s}" for s in eval_steps]
  with open(root / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in results:
      w.writerow([" ".join(map(str, r[c])) if isinstance(r[c], list) else r[c] for c in cols])
  fmt = lambda v: (f"{v:.4g}" if isinstance(v, float) else " ".join(map(str, v)) if isinstance(v, list) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in results]
  note = "RANDOM WEIGHTS (tiny models): the numbers test the tool, not the encoders.\n\n" if random_weights else ""
  (root / "results.md").write_text(note + "\n".join(lines) + "\n")
  last = eval_steps[-1]
  tag = " - RANDOM WEIGHTS" if random_weights else ""
  for stage in sorted({r["stage"] for r in results}):
    rs = [r for r in results if r["stage"] == stage]
    pts = [(r["trainable_params"], r[f"val_loss@{last}"], r["name"]) for r in rs]
    scatter_png(root / f"val_loss_vs_params_stage{stage}.png", pts, "trainable parameters",
                f"held-out loss @ step {last}", f"stage {stage}{tag}")
    pts = [(r["flops_per_step"] * r["steps"], r[f"val_loss@{last}"], r["name"]) for r in rs]
    scatter_png(root / f"val_loss_vs_compute_stage{stage}.png", pts, "training compute (FLOPs)",
                f"held-out loss @ step {last}", f"stage {stage}{tag}")


def scatter_png(path: Path, points: list[tuple[float, float, str]], xlabel: str, ylabel: str, title: str) -> None:
  """A labelled scatter plot, log-scale x, drawn with PIL (no plotting dependency)."""
  w, h, left, right, top, bottom = 900, 600, 90, 30, 50, 70
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  pts = [(x, y, n) for x, y, n in points if x > 0 and math.isfinite(y)]
  d.text((left, 8), title, fill="black")
  d.text((w // 2 - 60, h - 30), xlabel + " (log)", fill="black")
  d.text((left, top - 18), ylabel, fill="black")
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  if pts:
    lx = [math.log10(x) for x, _, _ in pts]
    ys = [y for _, y, _ in pts]
    x0, x1 = min(lx) - 0.1, max(lx) + 0.1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    px = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)
    py = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)
    for k in range(math.ceil(x0 * 4), math.floor(x1 * 4) + 1):  # ticks at quarter decades
      x = px(k / 4)
      d.line([x, h - bottom, x, h - bottom + 5], fill="black")
      d.text((x - 20, h - bottom + 8), f"{10 ** (k / 4):.3g}", fill="black")
    for k in range(5):
      v = y0 + (y1 - y0) * k / 4
      d.line([left - 5, py(v), left, py(v)], fill="black")
      d.text((5, py(v) - 6), f"{v:.4g}", fill="black")
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (x, y, name) in enumerate(pts):
      cx, cy, col = px(math.log10(x)), py(y), palette[i % len(palette)]
      d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=col)
      d.text((cx + 8, cy - 6), name, fill=col)
  img.save(path)


def load_sweep_config(path: str) -> ml_collections.ConfigDict:
  """A configs/sweep_*.py file's get_config() (for tests and notebooks; the CLI uses config_flags)."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
