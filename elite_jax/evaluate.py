"""Evaluate ELITE on DreamBench (or any folder laid out like it): CLIP-T, CLIP-I and DINO-I.

  python -m elite_jax.evaluate --benchmark /data/dreambench --global-mapper checkpoints/global_mapper.pt \
    --output outputs/dreambench --steps 100 --num-images 4

For every subject: one real photo (``--reference``, the first by default) is encoded; K images are generated for each
of the subject's prompts; they are scored against all the subject's real photos (``elite_jax.metrics``). Writes
``OUTPUT/images/<subject>/<prompt>_<sample>.png``, ``OUTPUT/grids/<subject>.png`` (rows = prompts, columns = samples),
``OUTPUT/results.json`` and ``OUTPUT/results.md``. Images already on disk from a run with the same generation settings
(``OUTPUT/generation.json``) are reused, so an interrupted run resumes and a larger ``--num-images`` adds samples.

**Benchmark layout.** ``PATH/prompts_and_classes.txt`` (DreamBench's file: the ``subject_name,class`` table, the
"Object Prompts" and "Live Subject Prompts" lists of ``'a {0} {1} ...'.format(unique_token, class_token)``) and one
folder of photos per subject, under ``PATH/images/`` or directly under ``PATH``. Live subjects are those of class cat
or dog (DreamBench's 9 live subjects); a file with a single prompt list uses it for every subject. Without the
prompts file the command stops with an error.

**Prompts.** The unique token is the placeholder: ``'a {0} {1} in the jungle'.format('S', 'dog')`` = 'a S dog in the
jungle'; the concept words go at the placeholder's token (``placeholder_index="token"``: on DreamBench's prompts, where
every word before S is one CLIP token, the same position as the official whitespace rule). CLIP-T scores 'a dog in
the jungle' (``metrics.strip_placeholder``).

**Local branch.** DreamBench has no masks. ``--local-input off`` (default) generates global-only (w0 injected, no
local mapper is loaded); ``full`` feeds the local mapper the whole photo as the object (a mask of ones) with weight
``--lambda``. Which of these (and which lambda) the paper's tables used is not stated (spec 9); say which when
reporting a number.

**Noise.** Image (prompt p, sample k) starts from latents drawn with ``fold_in(fold_in(key(seed), p), k)``: the same
for every subject, independent of batching, resuming and K.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from elite_jax.errors import InputError, exit_code

if TYPE_CHECKING:  # heavy imports (jax, models) wait until a command needs them: errors come back fast
  from elite_jax.metrics import MetricModels
  from elite_jax.pipeline import ElitePipeline

LIVE_CLASSES = ("cat", "dog")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROMPTS_FILE = "prompts_and_classes.txt"
GRID_CELL = 256  # grid thumbnails are at most this many pixels a side
RANDOM_NOTE = "RANDOM WEIGHTS: tiny untrained models; the images are noise and the scores mean nothing"


# ---------------------------------------------------------------------------------------------------------------
# The benchmark folder
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subject:
  name: str
  cls: str  # the class noun of the prompts ('dog', 'stuffed animal')
  live: bool
  photos: tuple[Path, ...]  # sorted real photos


@dataclasses.dataclass(frozen=True)
class Benchmark:
  root: Path
  subjects: tuple[Subject, ...]
  object_templates: tuple[str, ...]
  live_templates: tuple[str, ...]

  def prompts(self, subject: Subject, token: str) -> list[str]:
    """The subject's prompts with ``token`` as DreamBench's unique token: 'a {token} {class} in the jungle'."""
    templates = self.live_templates if subject.live else self.object_templates
    return [t.format(token, subject.cls) for t in templates]


_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


def read_prompts_file(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
  """DreamBench's prompts_and_classes.txt -> ({subject: class}, object templates, live templates)."""
  if not path.is_file():
    raise InputError(f"no {PROMPTS_FILE} in {path.parent}: a benchmark folder needs DreamBench's prompts file "
                     f"(a 'subject_name,class' table and the prompt lists)")
  classes: dict[str, str] = {}
  sections: dict[str, list[str]] = {"object": [], "live": []}
  section, in_table = "object", False
  for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
    stripped = line.strip()
    if stripped.replace(" ", "").lower() == "subject_name,class":
      in_table = True
      continue
    if in_table:
      if stripped.count(",") == 1 and "'" not in stripped:
        name, cls = (s.strip() for s in stripped.split(","))
        classes[name] = cls
        continue
      in_table = False
    if stripped.lower().startswith("live subject prompts"):
      section = "live"
    elif stripped.lower().startswith("object prompts"):
      section = "object"
    m = _TEMPLATE.match(line)
    if m:
      sections[section].append(m.group(2))
  if not classes:
    raise InputError(f"{path} has no 'subject_name,class' table")
  objects, live = sections["object"] or sections["live"], sections["live"] or sections["object"]
  if not objects:
    raise InputError(f"{path} has no prompts (lines like 'a {{0}} {{1}} in the snow'.format(unique_token, "
                     f"class_token))")
  for t in objects + live:
    if "{0}" not in t:
      raise InputError(f"{path}: the prompt {t!r} has no {{0}} (the unique token)")
  return classes, objects, live


def read_benchmark(path: str | os.PathLike, subjects: Sequence[str] | None = None) -> Benchmark:
  """A DreamBench-like folder; ``subjects`` selects some (in the given order), default all with photos."""
  root = Path(os.path.expanduser(str(path)))
  if not root.is_dir():
    raise InputError(f"benchmark folder not found: {root}")
  classes, objects, live = read_prompts_file(root / PROMPTS_FILE)
  images = root / "images" if (root / "images").is_dir() else root
  found = {d.name: d for d in sorted(images.iterdir()) if d.is_dir() and _photos(d)}
  if not found:
    raise InputError(f"no subject folders with photos in {images}")
  names = list(found) if not subjects else list(dict.fromkeys(subjects))
  unknown = [n for n in names if n not in found]
  if unknown:
    raise InputError(f"no photos for subject(s) {', '.join(unknown)} in {images} (there are: {', '.join(found)})")
  no_class = [n for n in names if n not in classes]
  if no_class:
    raise InputError(f"subject(s) {', '.join(no_class)} have no class in {root / PROMPTS_FILE}")
  chosen = tuple(Subject(n, classes[n], classes[n] in LIVE_CLASSES, _photos(found[n])) for n in names)
  return Benchmark(root, chosen, tuple(objects), tuple(live))


def _photos(folder: Path) -> tuple[Path, ...]:
  return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))


def reference_photo(subject: Subject, reference: str | None) -> Path:
  """The photo to encode: a file name in the subject's folder, an index into its sorted photos, or the first."""
  if reference is None:
    return subject.photos[0]
  if reference.isdigit():
    i = int(reference)
    if i >= len(subject.photos):
      raise InputError(f"--reference {i}: subject {subject.name} has only {len(subject.photos)} photos")
    return subject.photos[i]
  for p in subject.photos:
    if p.name == reference:
      return p
  raise InputError(f"--reference {reference}: no such photo for subject {subject.name} "
                   f"({', '.join(p.name for p in subject.photos)})")


# ---------------------------------------------------------------------------------------------------------------
# Images on disk and the grid
# ---------------------------------------------------------------------------------------------------------------

def image_path(output: Path, subject: str, prompt_index: int, sample: int) -> Path:
  return output / "images" / subject / f"{prompt_index:02d}_{sample}.png"


def _readable(path: Path, size: tuple[int, int]) -> bool:
  """An image file of (height, width) that decodes (a crash mid-write leaves none under the real name anyway)."""
  from PIL import Image
  if not path.is_file():
    return False
  try:
    with Image.open(path) as im:
      im.load()
      return (im.height, im.width) == tuple(size)
  except Exception:
    return False


def _save_png(image: np.ndarray, path: Path) -> None:
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written image to be reused


def image_grid(images: Sequence[np.ndarray], rows: int, cols: int, labels: Sequence[str] | None = None,
               cell: int = GRID_CELL):
  """A PIL image: ``rows`` x ``cols`` thumbnails (row-major ``images``), each row labelled on the left if given."""
  from PIL import Image, ImageDraw
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


# ---------------------------------------------------------------------------------------------------------------
# Generation (resumable) and scoring
# ---------------------------------------------------------------------------------------------------------------

def init_latents(seed: int, prompt_index: np.ndarray, sample: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """Standard-normal NCHW latents (N, C, h, w) for images (prompt_index[i], sample[i]); ``shape`` is (h, w, C)."""
  import jax
  base = jax.random.key(seed)
  keys = jax.vmap(lambda p, k: jax.random.fold_in(jax.random.fold_in(base, p), k))(
      np.asarray(prompt_index, np.uint32), np.asarray(sample, np.uint32))
  z = jax.vmap(lambda key: jax.random.normal(key, shape, np.float32))(keys)
  return np.asarray(z).transpose(0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """Everything that decides the images, stored as OUTPUT/generation.json: reuse needs an exact match."""
  pretrained: str
  image_encoder: str
  global_mapper: str | None
  local_mapper: str | None
  local_input: str
  lam: float | None
  placeholder: str
  words: str
  scheduler: str
  steps: int
  guidance: float
  seed: int
  height: int
  width: int
  dtype: str
  reference: str | None
  random_weights: bool


def check_settings(output: Path, settings: GenerationSettings) -> None:
  """Write OUTPUT/generation.json, or check the one there: images from other settings are never mixed in."""
  path = output / "generation.json"
  want = dataclasses.asdict(settings)
  if path.is_file():
    try:
      have = json.loads(path.read_text())
    except json.JSONDecodeError:
      raise InputError(f"{path} is not valid JSON; remove it (and the images beside it) or use another --output") \
          from None
    diff = [f"{k} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
      raise InputError(f"{output} holds images made with other settings ({'; '.join(diff)}); use another --output "
                       f"or remove {output / 'images'} and {path}")
    return
  output.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(want, indent=2) + "\n")


def missing_images(output: Path, bench: Benchmark, num_images: int, placeholder: str, size: tuple[int, int],
                   ) -> dict[str, list[tuple[int, int]]]:
  """{subject: [(prompt index, sample)]} of the images not yet on disk."""
  todo = {}
  for s in bench.subjects:
    n = len(bench.prompts(s, placeholder))
    todo[s.name] = [(p, k) for p in range(n) for k in range(num_images)
                    if not _readable(image_path(output, s.name, p, k), size)]
  return todo


def generate_subject(pipe: "ElitePipeline", subject: Subject, prompts: list[str], todo: list[tuple[int, int]], *,
                     output: Path, settings: GenerationSettings, batch_size: int, bar: Any = None) -> None:
  """Encode the reference photo, generate the ``todo`` images in batches of ``batch_size`` and save them."""
  concept = pipe.encode_concept(reference_photo(subject, settings.reference))
  lam = settings.lam if settings.local_input == "full" else 0.0
  f = pipe.vae_scale_factor
  shape = (settings.height // f, settings.width // f, pipe.unet.config.in_channels)
  size = min(batch_size, len(todo))
  for s in range(0, len(todo), size):
    chunk = todo[s:s + size]
    jobs = chunk + [chunk[-1]] * (size - len(chunk))  # pad the last batch: one compiled shape per run
    p_idx, k_idx = np.array([p for p, _ in jobs]), np.array([k for _, k in jobs])
    images = pipe.generate(concept, [prompts[p] for p in p_idx], num_images=1, scheduler=settings.scheduler,
                           steps=settings.steps, guidance=settings.guidance, lam=lam,
                           init_latents=init_latents(settings.seed, p_idx, k_idx, shape), height=settings.height,
                           width=settings.width, words=settings.words, placeholder_index="token", progress=False)
    for (p, k), image in zip(chunk, images):
      _save_png(image, image_path(output, subject.name, p, k))
    if bar is not None:
      bar.update(len(chunk))


def score_subject(models: "MetricModels", subject: Subject, prompts: list[str], generated: np.ndarray,
                  num_images: int, placeholder: str) -> dict:
  """CLIP-T, CLIP-I, DINO-I of one subject (overall and per prompt); ``generated`` is prompt-major."""
  from elite_jax import metrics, preprocess
  real = [preprocess.load_image(p) for p in subject.photos]
  texts = [metrics.strip_placeholder(p, placeholder) for p in prompts]
  text_emb = np.repeat(models.clip_text_features(texts), num_images, axis=0)
  clip_gen, clip_real = models.clip_image_features(generated), models.clip_image_features(real)
  dino_gen, dino_real = models.dino_features(generated), models.dino_features(real)
  per_prompt = []
  for p, (prompt, txt) in enumerate(zip(prompts, texts)):
    sl = slice(p * num_images, (p + 1) * num_images)
    per_prompt.append({"prompt": prompt, "clip_t_text": txt,
                       "clip_t": metrics.clip_t_score(clip_gen[sl], text_emb[sl]),
                       "clip_i": metrics.image_similarity(clip_gen[sl], clip_real),
                       "dino_i": metrics.image_similarity(dino_gen[sl], dino_real)})
  return {"class": subject.cls, "live": subject.live, "real_photos": [p.name for p in subject.photos],
          "num_generated": len(generated),
          "clip_t": metrics.clip_t_score(clip_gen, text_emb),
          "clip_i": metrics.image_similarity(clip_gen, clip_real),
          "dino_i": metrics.image_similarity(dino_gen, dino_real),
          "per_prompt": per_prompt}


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------

METRICS = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I"))


def write_reports(output: Path, results: dict) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------

def evaluate(args: argparse.Namespace) -> dict:
  """Run the evaluation the command line describes; returns what results.json holds."""
  from tqdm.auto import tqdm

  from elite_jax import metrics, preprocess
  bench = read_benchmark(args.benchmark, _split(args.subjects))
  if args.num_images < 1:
    raise InputError(f"--num-images must be >= 1, got {args.num_images}")
  if args.batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.steps < 1:
    raise InputError(f"--steps must be >= 1, got {args.steps}")
  if not 0.0 <= args.lam <= 2.0:
    raise InputError(f"--lambda must be in [0, 2], got {args.lam}")
  if args.height % 8 or args.width % 8 or args.height < 64 or args.width < 64:
    raise InputError(f"--height and --width must be multiples of 8 and at least 64, got {args.height}x{args.width}")
  if len(args.placeholder.split()) != 1:
    raise InputError(f"--placeholder must be one word, got {args.placeholder!r}")
  refs = {s.name: reference_photo(s, args.reference) for s in bench.subjects}  # bad --reference fails early
  if not args.random_weights:
    if not args.global_mapper:
      raise InputError("--global-mapper is required (the official global_mapper.pt or an elite-jax export)")
    if args.local_input == "full" and not args.local_mapper:
      raise InputError("--local-input full needs --local-mapper")
  if args.local_input == "off" and args.local_mapper and not args.random_weights:
    print("note: --local-input off: the local mapper is not used (global-only generation)", file=sys.stderr)
  if args.random_weights:
    print(f"{RANDOM_NOTE} (generation and metric models)", file=sys.stderr)
  output = Path(args.output)
  full = args.local_input == "full"
  settings = GenerationSettings(
      pretrained="RANDOM" if args.random_weights else str(args.pretrained),
      image_encoder="RANDOM" if args.random_weights else str(args.image_encoder),
      global_mapper="RANDOM" if args.random_weights else str(args.global_mapper),
      local_mapper=("RANDOM" if args.random_weights else str(args.local_mapper)) if full else None,
      local_input=args.local_input, lam=args.lam if full else None, placeholder=args.placeholder, words=args.words,
      scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, seed=args.seed, height=args.height,
      width=args.width, dtype=args.dtype, reference=args.reference, random_weights=args.random_weights)

  # The metric models first: small, and a wrong path fails before SD is loaded.
  models = metrics.random_metric_models() if args.random_weights else \
      metrics.load_metric_models(args.clip_model, args.dino_model)
  check_settings(output, settings)
  todo = missing_images(output, bench, args.num_images, args.placeholder, (args.height, args.width))
  total = sum(len(bench.prompts(s, args.placeholder)) * args.num_images for s in bench.subjects)
  pipe = _pipeline(args) if any(todo.values()) else None  # a rescoring run never loads Stable Diffusion
  results: dict[str, Any] = {"random_weights": bool(args.random_weights),
                             "settings": {**_renamed(dataclasses.asdict(settings)), **models.description,
                                          "num_images": args.num_images, "benchmark": str(bench.root),
                                          "placeholder_index": "token"},
                             "subjects": {}, "mean": {}}
  if args.random_weights:
    results["note"] = RANDOM_NOTE
  bar = tqdm(total=total, desc="images", unit="img")
  try:
    for s in bench.subjects:
      prompts = bench.prompts(s, args.placeholder)
      bar.set_postfix_str(s.name)
      bar.update(len(prompts) * args.num_images - len(todo[s.name]))  # already on disk
      if todo[s.name]:
        generate_subject(pipe, s, prompts, todo[s.name], output=output, settings=settings,
                         batch_size=args.batch_size, bar=bar)
      paths = [image_path(output, s.name, p, k) for p in range(len(prompts)) for k in range(args.num_images)]
      generated = np.stack([preprocess.load_image(p) for p in paths])
      r = score_subject(models, s, prompts, generated, args.num_images, args.placeholder)
      r["reference"] = refs[s.name].name
      r["images"] = [str(p.relative_to(output)) for p in paths]
      grid = output / "grids" / f"{s.name}.png"
      grid.parent.mkdir(parents=True, exist_ok=True)
      image_grid(list(generated), len(prompts), args.num_images, labels=prompts).save(grid)
      r["grid"] = str(grid.relative_to(output))
      results["subjects"][s.name] = r
      bar.write(f"{s.name}: " + ", ".join(f"{label} {r[k]:.4f}" for k, label in METRICS))
  finally:
    bar.close()
  results["mean"] = {k: float(np.mean([r[k] for r in results["subjects"].values()])) for k, _ in METRICS}
  results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  write_reports(output, results)
  print("mean: " + ", ".join(f"{label} {results['mean'][k]:.4f}" for k, label in METRICS))
  print(output / "results.md")
  return results


def _renamed(settings: dict) -> dict:
  return {("lambda" if k == "lam" else k): v for k, v in settings.items()}


def _split(names: Sequence[str] | None) -> list[str] | None:
  if not names:
    return None
  return [n for item in names for n in item.split(",") if n]


def _pipeline(args: argparse.Namespace) -> "ElitePipeline":
  from elite_jax.pipeline import ElitePipeline
  if args.random_weights:
    import jax.numpy as jnp
    from elite_jax.random_preset import random_pipeline
    pipe = random_pipeline(dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype])
    pipe.placeholder = args.placeholder
    return pipe
  local = args.local_mapper if args.local_input == "full" else None
  return ElitePipeline.from_pretrained(args.pretrained, image_encoder=args.image_encoder,
                                       global_mapper=args.global_mapper, local_mapper=local, dtype=args.dtype,
                                       placeholder=args.placeholder)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m elite_jax.evaluate", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--benchmark", required=True,
                 help="DreamBench folder: prompts_and_classes.txt and [images/]<subject>/ photo folders")
  p.add_argument("--subjects", nargs="+", help="evaluate only these subjects (names, space or comma separated)")
  p.add_argument("--reference", help="photo to encode per subject: a file name (00.jpg) or an index; default the "
                                     "first")
  p.add_argument("--num-images", type=int, default=4, help="images per prompt (DreamBench's protocol: 4)")
  p.add_argument("--local-input", default="off", choices=("off", "full"),
                 help="off: global-only; full: local mapper on the whole photo (mask of ones), weight --lambda")
  p.add_argument("--output", default="outputs/dreambench", help="folder for images, grids, results.json/.md")
  p.add_argument("--batch-size", type=int, default=8, help="images per denoising batch")
  p.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP for CLIP-T/CLIP-I (folder or id)")
  p.add_argument("--dino-model", default="facebook/dino-vits16", help="DINO ViT for DINO-I (folder or hub id)")
  p.add_argument("--pretrained", default="CompVis/stable-diffusion-v1-4", help="diffusers SD folder or hub repo id")
  p.add_argument("--image-encoder", default="openai/clip-vit-large-patch14", help="ELITE's CLIP image encoder")
  p.add_argument("--global-mapper", help="official global_mapper.pt or an elite-jax .safetensors mapper")
  p.add_argument("--local-mapper", help="official local_mapper.pt or an elite-jax mapper (with --local-input full)")
  p.add_argument("--lambda", dest="lam", type=float, default=0.8, help="weight of the local branch, in [0, 2]")
  p.add_argument("--placeholder", default="S", help="the concept's word, used as DreamBench's unique token")
  p.add_argument("--words", default="primary", choices=("primary", "all"), help="inject w0 only, or all words")
  p.add_argument("--scheduler", default="lms", choices=("lms", "ddim", "dpm++", "euler"))
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--seed", type=int, default=42)
  p.add_argument("--height", type=int, default=512)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="generation precision (the metric models run in float32)")
  p.add_argument("--random-weights", action="store_true",
                 help="RANDOM WEIGHTS, scores mean nothing: tiny in-memory SD, mappers, CLIP and DINO (offline check)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  return exit_code(evaluate, parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
