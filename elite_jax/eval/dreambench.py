"""Evaluate ELITE on DreamBench (or any folder laid out like it): CLIP-T, CLIP-I and DINO-I.

  results = evaluate(read_benchmark("/data/dreambench"), output=Path("outputs/dreambench"), options=options,
                     metric_models=load_metric_models(), pipeline=lambda: ElitePipeline.from_pretrained(...),
                     models={"pretrained": ..., "global_mapper": ...})

(the command is ``elite-evaluate``, elite_jax/cli/evaluate.py). For every subject: one real photo (``--reference``,
the first by default) is encoded; K images are generated for each of the subject's prompts; they are scored against
all the subject's real photos (``elite_jax.eval.metrics``). Writes ``OUTPUT/images/<subject>/<prompt>_<sample>.png``,
``OUTPUT/grids/<subject>.png`` (rows = prompts, columns = samples), ``OUTPUT/results.json`` and ``OUTPUT/results.md``.
Images already on disk from a run with the same generation settings (``OUTPUT/generation.json``) are reused, so an
interrupted run resumes and a larger ``--num-images`` adds samples.

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

import dataclasses
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from elite_jax import preprocess
from elite_jax.errors import InputError
from elite_jax.files import write_png
from elite_jax.eval import metrics, report
from elite_jax.eval.metrics import MetricModels
from elite_jax.options import GenerationOptions
from elite_jax.pipeline import ElitePipeline

LIVE_CLASSES = ("cat", "dog")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROMPTS_FILE = "prompts_and_classes.txt"


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
# Images on disk
# ---------------------------------------------------------------------------------------------------------------

def image_path(output: Path, subject: str, prompt_index: int, sample: int) -> Path:
  return output / "images" / subject / f"{prompt_index:02d}_{sample}.png"


def _readable(path: Path, size: tuple[int, int]) -> bool:
  """An image file of (height, width) that decodes (a crash mid-write leaves none under the real name anyway)."""
  if not path.is_file():
    return False
  try:
    with Image.open(path) as im:
      im.load()
      return (im.height, im.width) == tuple(size)
  except Exception:
    return False


# ---------------------------------------------------------------------------------------------------------------
# Generation (resumable) and scoring
# ---------------------------------------------------------------------------------------------------------------

def init_latents(seed: int, prompt_index: np.ndarray, sample: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """Standard-normal NHWC latents (N, h, w, C) for images (prompt_index[i], sample[i]); ``shape`` is (h, w, C)."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda p, k: jax.random.fold_in(jax.random.fold_in(base, p), k))(
      np.asarray(prompt_index, np.uint32), np.asarray(sample, np.uint32))
  return np.asarray(jax.vmap(lambda key: jax.random.normal(key, shape, np.float32))(keys))


def check_settings(output: Path, settings: dict) -> None:
  """Write OUTPUT/generation.json, or check the one there: images from other settings are never mixed in."""
  path = output / "generation.json"
  if path.is_file():
    try:
      have = json.loads(path.read_text())
    except json.JSONDecodeError:
      raise InputError(f"{path} is not valid JSON; remove it (and the images beside it) or use another --output") \
          from None
    diff = [f"{k} {have.get(k)!r} -> {v!r}" for k, v in settings.items() if have.get(k) != v]
    if diff:
      raise InputError(f"{output} holds images made with other settings ({'; '.join(diff)}); use another --output "
                       f"or remove {output / 'images'} and {path}")
    return
  output.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(settings, indent=2) + "\n")


def missing_images(output: Path, bench: Benchmark, num_images: int, placeholder: str, size: tuple[int, int],
                   ) -> dict[str, list[tuple[int, int]]]:
  """{subject: [(prompt index, sample)]} of the images not yet on disk."""
  todo = {}
  for s in bench.subjects:
    n = len(bench.prompts(s, placeholder))
    todo[s.name] = [(p, k) for p in range(n) for k in range(num_images)
                    if not _readable(image_path(output, s.name, p, k), size)]
  return todo


def generate_subject(pipe: ElitePipeline, subject: Subject, prompts: list[str], todo: list[tuple[int, int]], *,
                     output: Path, options: GenerationOptions, reference: str | None, batch_size: int,
                     bar: Any = None) -> None:
  """Encode the reference photo, generate the ``todo`` images in batches of ``batch_size`` and save them."""
  concept = pipe.encode_concept(reference_photo(subject, reference))
  f = pipe.sd.vae_scale_factor
  shape = (options.height // f, options.width // f, pipe.sd.unet.config.in_channels)
  size = min(batch_size, len(todo))
  for s in range(0, len(todo), size):
    chunk = todo[s:s + size]
    jobs = chunk + [chunk[-1]] * (size - len(chunk))  # pad the last batch: one compiled shape per run
    p_idx, k_idx = np.array([p for p, _ in jobs]), np.array([k for _, k in jobs])
    images = pipe.generate(concept, [prompts[p] for p in p_idx],
                           options.replace(num_images=1, batch_size=None,
                                           init_latents=init_latents(options.seed, p_idx, k_idx, shape)),
                           progress=False)
    for (p, k), image in zip(chunk, images):
      write_png(image_path(output, subject.name, p, k), image)  # atomic: never half-written under the name
    if bar is not None:
      bar.update(len(chunk))


def score_subject(models: MetricModels, subject: Subject, prompts: list[str], generated: np.ndarray,
                  num_images: int, placeholder: str) -> dict:
  """CLIP-T, CLIP-I, DINO-I of one subject (overall and per prompt); ``generated`` is prompt-major."""
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
# The whole evaluation
# ---------------------------------------------------------------------------------------------------------------

LOCAL_INPUTS = ("off", "full")


def evaluate(bench: Benchmark, *, output: Path, options: GenerationOptions, metric_models: MetricModels,
             pipeline: Callable[[], ElitePipeline], models: dict, local_input: str = "off",
             reference: str | None = None, batch_size: int = 8, random_weights: bool = False) -> dict:
  """Generate what ``output`` lacks, score every subject, write the reports; returns what results.json holds.

  ``options``: the generation settings (``num_images`` per prompt); with ``local_input="off"`` lambda is unused.
  ``pipeline`` is called only when images are missing (a rescoring run never loads Stable Diffusion). ``models``
  names the generation models, for the settings record.
  """
  if local_input not in LOCAL_INPUTS:
    raise InputError(f"local input must be one of {LOCAL_INPUTS}, got {local_input!r}")
  if batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {batch_size}")
  full = local_input == "full"
  options = options.replace(lam=options.lam if full else 0.0, placeholder_index="token").validate()
  refs = {s.name: reference_photo(s, reference) for s in bench.subjects}  # a bad --reference fails early
  settings = {**models, "local_input": local_input, "reference": reference,
              **{k: v for k, v in options.record().items() if k not in ("num_images", "batch_size")}}
  settings["lam"] = options.lam if full else None
  check_settings(output, settings)
  num_images = options.num_images
  todo = missing_images(output, bench, num_images, options.placeholder, (options.height, options.width))
  total = sum(len(bench.prompts(s, options.placeholder)) * num_images for s in bench.subjects)
  pipe = pipeline() if any(todo.values()) else None
  results: dict[str, Any] = {"random_weights": bool(random_weights),
                             "settings": {**_renamed(settings), **metric_models.description,
                                          "num_images": num_images, "benchmark": str(bench.root)},
                             "subjects": {}, "mean": {}}
  if random_weights:
    results["note"] = report.RANDOM_NOTE
  bar = tqdm(total=total, desc="images", unit="img")
  try:
    for s in bench.subjects:
      prompts = bench.prompts(s, options.placeholder)
      bar.set_postfix_str(s.name)
      bar.update(len(prompts) * num_images - len(todo[s.name]))  # already on disk
      if todo[s.name]:
        generate_subject(pipe, s, prompts, todo[s.name], output=output, options=options, reference=reference,
                         batch_size=batch_size, bar=bar)
      paths = [image_path(output, s.name, p, k) for p in range(len(prompts)) for k in range(num_images)]
      generated = np.stack([preprocess.load_image(p) for p in paths])
      r = score_subject(metric_models, s, prompts, generated, num_images, options.placeholder)
      r["reference"] = refs[s.name].name
      r["images"] = [str(p.relative_to(output)) for p in paths]
      grid = output / "grids" / f"{s.name}.png"
      grid.parent.mkdir(parents=True, exist_ok=True)
      report.image_grid(list(generated), len(prompts), num_images, labels=prompts).save(grid)
      r["grid"] = str(grid.relative_to(output))
      results["subjects"][s.name] = r
      bar.write(f"{s.name}: " + ", ".join(f"{label} {r[k]:.4f}" for k, label in report.METRICS))
  finally:
    bar.close()
  results["mean"] = {k: float(np.mean([r[k] for r in results["subjects"].values()])) for k, _ in report.METRICS}
  results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  report.write_reports(output, results)
  return results


def _renamed(settings: dict) -> dict:
  return {("lambda" if k == "lam" else k): v for k, v in settings.items()}
